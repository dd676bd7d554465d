#!/usr/bin/env python3
"""WebSocket clients for the moving-connections tests, written with Python's `websockets` library (Debian's
python3-websockets): a client library nobody in this project wrote.

Each client opens one connection to URL and, every INTERVAL, sends its next number ("1", "2", ...) as a text
message and waits for the answer "<number> <count> <pid>". The server's <count> is how many messages this
client has sent on this connection: it must equal <number> at every message, whichever process answers
(the session's counter carried across upgrades). Any other answer, a closed connection or a timeout is
counted as an error, never retried.

Prints "connected <n>" once every client is connected, "all <pid>" once every client (still connected) has had
an answer from process <pid>, and runs until the file STOP exists, closes every
connection (a normal close) and prints one line of JSON with what it saw.

With a fifth argument "reconnect", a session the server ends with a normal close handshake and status 1001
("going away": sessions that cannot move) is counted in "going_away" and opened again (its count starts anew
on the new connection); any other end (another code, no close handshake: a reset) is still an error.
"""

import asyncio
import json
import os
import sys
import time

import websockets


def announce(stats):
    """Says "all <pid>" once every client still connected has had an answer from <pid>."""
    for pid, reached in stats["reached"].items():
        if pid not in stats["announced"] and len(reached | stats["dead"]) >= stats["clients"]:
            stats["announced"].add(pid)
            print(f"all {pid}", flush=True)


async def client(i, url, interval, stop, stats, connected, reconnect):
    first = True
    while True:
        try:
            ws = await websockets.connect(url, ping_interval=None, close_timeout=5, max_queue=None)
        except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
            stats["errors"].append(f"client {i}: connect: {e!r}")
            stats["dead"].add(i)
            if first:
                connected.release()
            return
        if first:
            connected.release()
            first = False
        if not await session(i, ws, interval, stop, stats, reconnect):
            return


async def session(i, ws, interval, stop, stats, reconnect):
    """One connection's messages; True when the server went away politely and the client should reconnect."""
    n = 0
    try:
        while not stop.is_set():
            n += 1
            sent = time.monotonic()
            await ws.send(str(n))
            answer = await asyncio.wait_for(ws.recv(), timeout=20)
            took = time.monotonic() - sent
            stats["latencies"].append(took)
            parts = answer.split(" ")
            if len(parts) != 3 or parts[0] != str(n) or parts[1] != str(n):
                stats["errors"].append(f"client {i}: sent {n}, answered {answer!r}")
                return
            stats["messages"] += 1
            pid = int(parts[2])
            stats["pids"].add(pid)
            if stats["last_pid"].get(i) != pid:
                stats["last_pid"][i] = pid
                stats["reached"].setdefault(pid, set()).add(i)
                announce(stats)
            await asyncio.sleep(interval)
    except websockets.ConnectionClosedOK as e:
        code = e.rcvd.code if e.rcvd is not None else None
        if reconnect and code == 1001 and not stop.is_set():
            stats["going_away"] += 1
            return True
        stats["disconnects"] += 1
        stats["errors"].append(f"client {i}: closed after {n - 1} answers: {e!r}")
        stats["dead"].add(i)
        announce(stats)
        return False
    except websockets.ConnectionClosed as e:
        stats["disconnects"] += 1
        stats["abnormal"] += 1
        stats["errors"].append(f"client {i}: closed after {n - 1} answers: {e!r}")
        stats["dead"].add(i)
        announce(stats)
        return False
    except Exception as e:  # noqa: BLE001
        stats["errors"].append(f"client {i}: after {n - 1} answers: {e!r}")
        stats["dead"].add(i)
        announce(stats)
        return False
    finally:
        stats["sent"][i] = stats["sent"].get(i, 0) + n
    await ws.close()
    return False


async def main():
    url, clients, interval_ms, stop_file = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    reconnect = len(sys.argv) > 5 and sys.argv[5] == "reconnect"
    stats = {
        "messages": 0,
        "disconnects": 0,
        "abnormal": 0,
        "going_away": 0,
        "errors": [],
        "latencies": [],
        "pids": set(),
        "last_pid": {},
        "sent": {},
        "reached": {},
        "announced": set(),
        "dead": set(),
        "clients": clients,
    }
    stop = asyncio.Event()
    connected = asyncio.Semaphore(0)
    started = time.monotonic()
    tasks = []
    for i in range(clients):
        tasks.append(asyncio.create_task(client(i, url, interval_ms / 1000, stop, stats, connected, reconnect)))
        if i % 50 == 49:
            await asyncio.sleep(0)  # let connections complete as they go
    for _ in range(clients):
        await connected.acquire()
    print(f"connected {clients}", flush=True)
    while not os.path.exists(stop_file):
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    lat = sorted(stats["latencies"])
    p = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None  # noqa: E731
    print(
        json.dumps(
            {
                "clients": clients,
                "messages": stats["messages"],
                "per_second": round(stats["messages"] / elapsed),
                "disconnects": stats["disconnects"],
                "abnormal": stats["abnormal"],
                "going_away": stats["going_away"],
                "errors": stats["errors"][:20],
                "error_count": len(stats["errors"]),
                "pids": sorted(stats["pids"]),
                # Of the clients that were never cut off.
                "last_pids": sorted({p for i, p in stats["last_pid"].items() if i not in stats["dead"]}),
                "p50_ms": p(0.5),
                "p99_ms": p(0.99),
                "max_ms": p(1.0),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
