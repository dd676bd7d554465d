//! gRPC with tonic, through upgrades: tonic's own services served by `exuvia::hyper::serve`, and a stock
//! tonic client (`Channel`) that loses no call.
//!
//! ```text
//! cargo run --features hyper --example grpc_tonic -- --listen 127.0.0.1:50051 --stream-grace 1
//! cargo run --features hyper --example grpc_tonic -- client --connect http://127.0.0.1:50051
//! kill -HUP <server pid>   # unary calls go on; streams end with UNAVAILABLE and re-open on the new process
//! kill -INT <client pid>   # the client prints what it saw
//! ```
//!
//! Under systemd, use `units/exuvia-app.socket` + `units/exuvia-app.service` with `ExecStart=` pointing at the
//! built binary (`target/release/examples/grpc_tonic --stream-grace 1`): it adopts the socket named `http`
//! (gRPC runs over HTTP/2), and `systemctl reload` upgrades it. The command line is the same as the HTTP
//! examples' (see `examples/common`), with `--stream-grace SECS`.
//!
//! The server offers two services tonic ships with their generated code (no `protoc` needed): health
//! (`grpc.health.v1.Health`: unary `Check`, server-streaming `Watch`) and reflection
//! (`grpc.reflection.v1.ServerReflection`: the bidirectional `ServerReflectionInfo`). Every response carries
//! the serving process's pid in the `x-pid` header, so the client can tell which process answered.
//!
//! # What happens at an upgrade
//!
//! - **Unary calls**: each HTTP/2 connection gets GOAWAY (in two steps: no stream the client opened before it
//!   saw the GOAWAY is refused); calls in flight complete; the client opens a new connection, which the new
//!   process accepts. The server side loses nothing.
//! - **Streams** (server-streaming, bidirectional) still open `--stream-grace` seconds after the process
//!   started finishing ([`exuvia::Builder::stream_grace`]) are ended by the HTTP layer with the status the
//!   gRPC spec gives a server that is going away: `UNAVAILABLE`, with a message. The client re-opens its
//!   stream, on the new process. The old process exits then, not at the drain deadline.
//!
//! # The client's part: retrying calls that were never sent
//!
//! A tonic `Channel` (tonic 0.14, hyper 1) fails a call it never sent when a GOAWAY arrives while the call
//! waits in the connection's queue: `Cancelled: operation was canceled` (hyper's `Canceled`, "connection
//! closed": the queue is dropped when the connection shuts down), or `Internal: h2 protocol error` (the
//! stream could not be opened on a connection that has received GOAWAY, `NO_ERROR`). The server never saw
//! these calls (hyper cancels only what it never wrote; h2 refuses the stream before opening it, except in a
//! window of a few instructions where hyper opened it just before the GOAWAY was processed and then resets it),
//! so no server can answer them; gRPC's own retry design (gRFC A6, "transparent retry") has
//! clients re-send them by themselves, as grpc-go and grpc-java do, but tonic does not (and has no retry
//! policy; its `Status` keeps the transport error as its source). [`retryable`] recognises exactly these
//! two errors by that source, and [`unary`] re-sends a call after them, once the channel has reconnected. Any
//! server-side GOAWAY (a load balancer's `max_age`, a proxy recycling connections) causes the same, so a
//! tonic client should do this with or without exuvia.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::error::Error as _;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::ServerReflectionRequest;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("client") {
        return client::main();
    }
    common::main("grpc_tonic", serve)
}

/// The server: health and reflection, through exuvia's HTTP layer.
fn serve(args: common::Args) -> Result<(), Box<dyn std::error::Error>> {
    // Before the runtime: building the upgrader reads and removes environment variables.
    let upgrader = common::builder(&args).build()?;
    // Named "http" (gRPC runs over HTTP/2), as the shipped socket unit's `FileDescriptorName=` names it.
    let listener =
        upgrader.listen_tcp_with("http", args.listen.as_str(), &common::bind_options(&args))?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Runtime::new()?;
    {
        let _in_runtime = runtime.enter();
        upgrader.handle_signals_tokio()?;
    }
    common::initialise(&upgrader, &args)?;
    runtime.block_on(async move {
        let (_reporter, health) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let pid = std::process::id().to_string();
        let app = tonic::service::Routes::new(health)
            .add_service(reflection)
            .prepare()
            .into_axum_router()
            .layer(axum::middleware::map_response(
                move |mut response: axum::response::Response| {
                    let pid = pid.clone();
                    async move {
                        if let Ok(v) = pid.parse() {
                            response.headers_mut().insert("x-pid", v);
                        }
                        response
                    }
                },
            ));
        upgrader.ready()?;
        tracing::info!(%addr, version = %args.version, generation = upgrader.generation(), "serving gRPC");
        let report = exuvia::hyper::serve(&upgrader, listener, app).await?;
        tracing::info!(finish = ?upgrader.finishing(), drained = report.drained, left = report.left, "finished");
        Ok(())
    })
}

/// Whether a failed call was caught by a GOAWAY before the server could answer it: the two errors a tonic
/// `Channel` reports for a call that had not left the client (see the module docs). Told apart by the
/// status's source, never by its text. `Cancelled` (hyper never wrote the request) is safe to re-send for any
/// method; `Internal` with a GOAWAY almost always is (h2 refused to open the stream), but in a narrow window
/// the stream was opened and then reset by the client, so re-send it as is only for idempotent calls (as
/// health's `Check` here) or calls the server recognises as repeated.
pub fn retryable(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_canceled() {
                return true;
            }
        }
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            if e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// A call, sent again (up to 10 times) while it fails with an error [`retryable`] recognises. Returns the
/// outcome and the codes of the failures it re-sent the call after.
pub async fn unary<T, F, Fut>(mut call: F) -> (Result<T, Status>, Vec<tonic::Code>)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut resent = Vec::new();
    loop {
        match call().await {
            Err(status) if retryable(&status) && resent.len() < 10 && RESEND.load(Relaxed) => {
                resent.push(status.code());
                // The channel notices the closed connection at its next readiness check and reconnects; a
                // moment's pause keeps the next attempt from finding the old connection still queued.
                tokio::time::sleep(Duration::from_millis(resent.len() as u64)).await;
            }
            outcome => return (outcome, resent),
        }
    }
}

/// Off with the client's `--no-resend`: to see what the race costs a client that does not re-send.
static RESEND: AtomicBool = AtomicBool::new(true);

/// The pid in a response's `x-pid` header (0 without one).
fn pid_of(metadata: &tonic::metadata::MetadataMap) -> u32 {
    metadata
        .get("x-pid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

mod client {
    //! `grpc_tonic client --connect URL [--unary N] [--watch N] [--bidi N] [--no-resend]`: N tasks of each
    //! kind until SIGINT or SIGTERM (`--no-resend`: calls are not re-sent after [`retryable`] errors, to
    //! see what they cost). On stdout, one `key=value` line per event as it happens:
    //!
    //! - `open kind=watch|bidi pid=..` for each stream opened, with the pid of the process serving it;
    //! - `end kind=watch|bidi code=.. message=.. pid=..` for each stream the server ended;
    //! - `failure kind=unary|watch|bidi code=.. message=.. source=..` for each failed call or stream open;
    //!
    //! and at the end `unary ok=.. failed=.. resent=.. resent_cancelled=.. resent_internal=..`, then
    //! `unary_pid pid=.. calls=..` for each process that answered, then `done`.

    use super::*;

    /// What the tasks report to the printer.
    enum Event {
        Unary {
            outcome: Result<u32, Status>,
            resent: Vec<tonic::Code>,
        },
        Open {
            kind: &'static str,
            pid: u32,
        },
        OpenFailed {
            kind: &'static str,
            status: Status,
        },
        End {
            kind: &'static str,
            status: Status,
            pid: u32,
        },
    }

    pub(super) fn main() -> ExitCode {
        let mut connect = None;
        let (mut unary, mut watch, mut bidi) = (8usize, 4usize, 1usize);
        let mut it = std::env::args().skip(2);
        while let Some(flag) = it.next() {
            if flag == "--no-resend" {
                RESEND.store(false, Relaxed);
                continue;
            }
            let value = it.next();
            let number = || value.as_deref().and_then(|v| v.parse().ok());
            match (flag.as_str(), &value) {
                ("--connect", Some(v)) => connect = Some(v.clone()),
                ("--unary", Some(_)) if number().is_some() => unary = number().unwrap_or(0),
                ("--watch", Some(_)) if number().is_some() => watch = number().unwrap_or(0),
                ("--bidi", Some(_)) if number().is_some() => bidi = number().unwrap_or(0),
                _ => {
                    eprintln!(
                        "grpc_tonic client: bad argument {flag:?} (usage: grpc_tonic client --connect URL \
                         [--unary N] [--watch N] [--bidi N] [--no-resend])"
                    );
                    return ExitCode::from(2);
                }
            }
        }
        let Some(connect) = connect else {
            eprintln!("grpc_tonic client: --connect URL is required (e.g. http://127.0.0.1:50051)");
            return ExitCode::from(2);
        };
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("grpc_tonic client: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(run(connect, unary, watch, bidi)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("grpc_tonic client: {e}");
                ExitCode::FAILURE
            }
        }
    }

    async fn run(
        connect: String,
        unary: usize,
        watch: usize,
        bidi: usize,
    ) -> Result<(), Box<dyn std::error::Error>> {
        // One channel (one HTTP/2 connection at a time), shared by every task, as tonic's docs advise.
        let channel = Endpoint::from_shared(connect)?.connect().await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        for _ in 0..unary {
            tokio::spawn(unary_loop(channel.clone(), tx.clone()));
        }
        for _ in 0..watch {
            tokio::spawn(watch_loop(channel.clone(), tx.clone()));
        }
        for _ in 0..bidi {
            tokio::spawn(bidi_loop(channel.clone(), tx.clone()));
        }
        drop(tx);
        println!("started");
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut resent: BTreeMap<i32, u64> = BTreeMap::new();
        let mut pids: BTreeMap<u32, u64> = BTreeMap::new();
        loop {
            let event = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => break },
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
            };
            match event {
                Event::Unary {
                    outcome,
                    resent: codes,
                } => {
                    for code in codes {
                        *resent.entry(code as i32).or_default() += 1;
                    }
                    match outcome {
                        Ok(pid) => {
                            ok += 1;
                            *pids.entry(pid).or_default() += 1;
                        }
                        Err(status) => {
                            failed += 1;
                            println!("{}", failure("unary", &status));
                        }
                    }
                }
                Event::Open { kind, pid } => println!("open kind={kind} pid={pid}"),
                Event::OpenFailed { kind, status } => println!("{}", failure(kind, &status)),
                Event::End { kind, status, pid } => println!(
                    "end kind={kind} code={:?} message={:?} pid={pid}",
                    status.code(),
                    status.message(),
                ),
            }
        }
        let count = |c: tonic::Code| resent.get(&(c as i32)).copied().unwrap_or(0);
        println!(
            "unary ok={ok} failed={failed} resent={} resent_cancelled={} resent_internal={}",
            resent.values().sum::<u64>(),
            count(tonic::Code::Cancelled),
            count(tonic::Code::Internal)
        );
        for (pid, calls) in pids {
            println!("unary_pid pid={pid} calls={calls}");
        }
        println!("done");
        Ok(())
    }

    fn failure(kind: &str, status: &Status) -> String {
        let mut chain = Vec::new();
        let mut source = status.source();
        while let Some(e) = source {
            chain.push(format!("{e:?}"));
            source = e.source();
        }
        format!(
            "failure kind={kind} code={:?} message={:?} source={:?}",
            status.code(),
            status.message(),
            chain.join(" <- ")
        )
    }

    /// Health `Check` in a loop.
    async fn unary_loop(channel: Channel, tx: mpsc::UnboundedSender<Event>) {
        let client = HealthClient::new(channel);
        loop {
            let (outcome, resent) = unary(|| {
                let mut client = client.clone();
                async move {
                    let r = client.check(HealthCheckRequest::default()).await?;
                    Ok(pid_of(r.metadata()))
                }
            })
            .await;
            if tx.send(Event::Unary { outcome, resent }).is_err() {
                return;
            }
        }
    }

    /// One stream after another of one kind: opened (and re-sent, like a unary call, after the GOAWAY race),
    /// reported with the process serving it, run until the server ends it, reported with how it ended.
    async fn stream_loop<S, Open, Opened, Run, Ran>(
        kind: &'static str,
        tx: mpsc::UnboundedSender<Event>,
        mut open: Open,
        mut run: Run,
    ) where
        Open: FnMut() -> Opened,
        Opened: std::future::Future<Output = Result<(u32, S), Status>>,
        Run: FnMut(S) -> Ran,
        Ran: std::future::Future<Output = Status>,
    {
        loop {
            let (pid, stream) = match unary(&mut open).await.0 {
                Ok(opened) => opened,
                Err(status) => {
                    let _ = tx.send(Event::OpenFailed { kind, status });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if tx.send(Event::Open { kind, pid }).is_err() {
                return;
            }
            let status = run(stream).await;
            if tx.send(Event::End { kind, status, pid }).is_err() {
                return;
            }
        }
    }

    /// Health `Watch`, re-opened whenever the server ends it.
    async fn watch_loop(channel: Channel, tx: mpsc::UnboundedSender<Event>) {
        let client = HealthClient::new(channel);
        let open = || {
            let mut client = client.clone();
            async move {
                let r = client.watch(HealthCheckRequest::default()).await?;
                Ok((pid_of(r.metadata()), r.into_inner()))
            }
        };
        let run = |mut stream: tonic::Streaming<_>| async move {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break Status::ok("ended without a status"),
                    Err(status) => break status,
                }
            }
        };
        stream_loop("watch", tx, open, run).await;
    }

    /// Reflection's bidirectional stream: a `list_services` request every 10 ms, each answered; re-opened
    /// whenever the server ends it.
    async fn bidi_loop(channel: Channel, tx: mpsc::UnboundedSender<Event>) {
        let client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let open = || {
            let mut client = client.clone();
            let request = request.clone();
            async move {
                // The first request goes with the call, so that the server answers at once.
                let (requests_tx, requests_rx) = mpsc::channel(16);
                let _ = requests_tx.try_send(request);
                let r = client
                    .server_reflection_info(ReceiverStream::new(requests_rx))
                    .await?;
                Ok((pid_of(r.metadata()), (r.into_inner(), requests_tx)))
            }
        };
        let run = |(mut stream, requests_tx): (tonic::Streaming<_>, mpsc::Sender<_>)| {
            let request = request.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                loop {
                    tokio::select! {
                        m = stream.next() => match m {
                            Some(Ok(_)) => {}
                            Some(Err(status)) => break status,
                            None => break Status::ok("ended without a status"),
                        },
                        _ = tick.tick() => {
                            let _ = requests_tx.try_send(request.clone());
                        }
                    }
                }
            }
        };
        stream_loop("bidi", tx, open, run).await;
    }
}
