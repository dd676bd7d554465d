//! Accept throughput through exuvia's Tokio layer (`exuvia::tokio::TcpIncoming`) against a plain
//! `tokio::net::TcpListener`, in the same process and runtime, rounds interleaved.
//!
//! The server accepts and drops each connection at once, so the accept path is nearly all the work; clients
//! on plain threads connect, wait for the close, and connect again. Each round binds a fresh listener.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Path {
    Plain,
    Exuvia,
}

/// Connections per second accepted in each round, in the order run.
pub struct Figures {
    pub rounds: Vec<(Path, f64)>,
}

impl Figures {
    pub fn median(&self, path: Path) -> f64 {
        let mut v: Vec<f64> = self
            .rounds
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, r)| *r)
            .collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return 0.0;
        }
        v[v.len() / 2]
    }

    /// The median over round pairs (plain, then exuvia) of exuvia's rate over plain Tokio's: pairing
    /// neighbours cancels the machine's slow drift, the median its outliers.
    pub fn ratio(&self) -> f64 {
        let mut r: Vec<f64> = self
            .rounds
            .chunks(2)
            .filter_map(|p| match p {
                [(Path::Plain, a), (Path::Exuvia, b)] if *a > 0.0 => Some(b / a),
                _ => None,
            })
            .collect();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied().unwrap_or(0.0)
    }
}

fn client(addr: SocketAddr, stop: &AtomicBool) {
    let mut buf = [0u8; 16];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        // The server closes at once: wait for that, so every connection is a full accept.
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// `rounds` rounds of each path, alternating, `secs` each, with `clients` connecting threads.
pub fn measure(rounds: usize, secs: f64, clients: usize) -> std::io::Result<Figures> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let upgrader = exuvia::Upgrader::builder()
        .build()
        .map_err(std::io::Error::from)?;
    let mut figures = Figures { rounds: Vec::new() };
    for round in 0..rounds * 2 {
        let path = if round % 2 == 0 {
            Path::Plain
        } else {
            Path::Exuvia
        };
        let count = Arc::new(AtomicU64::new(0));
        let (addr, task) = match path {
            Path::Plain => {
                let std = std::net::TcpListener::bind("127.0.0.1:0")?;
                std.set_nonblocking(true)?;
                let addr = std.local_addr()?;
                let _guard = rt.enter();
                let listener = tokio::net::TcpListener::from_std(std)?;
                let count = count.clone();
                let task = rt.spawn(async move {
                    loop {
                        if let Ok((s, _)) = listener.accept().await {
                            drop(s);
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                (addr, task)
            }
            Path::Exuvia => {
                let std = upgrader
                    .listen_tcp(&format!("accept-{round}"), "127.0.0.1:0")
                    .map_err(std::io::Error::from)?;
                let addr = std.local_addr()?;
                let _guard = rt.enter();
                let mut incoming = exuvia::tokio::TcpIncoming::new(&upgrader, std)?;
                let count = count.clone();
                let task = rt.spawn(async move {
                    while let Some(r) = incoming.accept().await {
                        if let Ok((s, _)) = r {
                            drop(s);
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                (addr, task)
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || client(addr, &stop))
            })
            .collect();
        // Warm up, then count over the round.
        std::thread::sleep(Duration::from_millis(100)); // warm-up interval
        let (n0, t0) = (count.load(Ordering::Relaxed), Instant::now());
        std::thread::sleep(Duration::from_secs_f64(secs)); // the measuring interval
        let rate = (count.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join(); // the server still accepts, so every client finishes its connection
        }
        task.abort();
        figures.rounds.push((path, rate));
    }
    Ok(figures)
}
