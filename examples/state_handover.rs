//! Handing application state to the next generation: here a secret key (think TLS session-ticket keys, so
//! that resumed sessions survive the upgrade) and a counter of connections served by earlier generations.
//!
//! Run it:
//!
//! ```text
//! cargo run --example state_handover -- --listen 127.0.0.1:7001
//! nc 127.0.0.1 7001 </dev/null          # generation=0 served_before=0 key=<hex>
//! kill -HUP <pid>
//! nc 127.0.0.1 7001 </dev/null          # generation=1 served_before=1 key=<the same hex>
//! ```
//!
//! The state is whatever bytes the application chooses (at most 1 MiB), produced at upgrade time by the
//! closure given to `Builder::state` and read in the new process with `Upgrader::inherited_state`. Version the
//! format yourself: the new binary may be a different version of the application.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The state's format: a version byte, then the key (32 bytes), then the counter (u64 LE).
const STATE_VERSION: u8 = 1;

fn encode(key: &[u8; 32], served: u64) -> Vec<u8> {
    let mut v = vec![STATE_VERSION];
    v.extend_from_slice(key);
    v.extend_from_slice(&served.to_le_bytes());
    v
}

fn decode(bytes: &[u8]) -> Option<([u8; 32], u64)> {
    if bytes.len() != 41 || bytes[0] != STATE_VERSION {
        return None;
    }
    let key: [u8; 32] = bytes[1..33].try_into().ok()?;
    let served = u64::from_le_bytes(bytes[33..41].try_into().ok()?);
    Some((key, served))
}

fn fresh_key() -> std::io::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    let listen = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [flag, addr] if flag == "--listen" => addr.clone(),
        [] => "127.0.0.1:7001".to_string(),
        _ => return Err("usage: state_handover [--listen ADDR]".into()),
    };
    // The state closure runs at each upgrade; it reads what the running process holds now.
    let key: Arc<OnceLock<[u8; 32]>> = Arc::default();
    let served = Arc::new(AtomicU64::new(0));
    let upgrader = {
        let (key, served) = (key.clone(), served.clone());
        exuvia::Upgrader::builder()
            .state(move || encode(key.get().unwrap_or(&[0; 32]), served.load(Ordering::SeqCst)))
            .build()?
    };
    // Take over the state, or start afresh. A state this version cannot read is not fatal: start afresh.
    let (k, before) = match upgrader.inherited_state().map(decode) {
        Some(Some(s)) => s,
        Some(None) => {
            tracing::warn!("inherited state in an unknown format; starting with a new key");
            (fresh_key()?, 0)
        }
        None => (fresh_key()?, 0),
    };
    let _ = key.set(k);
    served.store(before, Ordering::SeqCst);
    let listener = upgrader.listen_tcp("state", listen.as_str())?;
    upgrader.handle_signals()?;
    upgrader.ready()?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, pid = std::process::id(), generation = upgrader.generation(), served_before = before, "serving");
    let u = upgrader.clone();
    std::thread::spawn(move || {
        for conn in u.incoming(listener) {
            let Ok(mut conn) = conn else { continue };
            let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
            let n = served.fetch_add(1, Ordering::SeqCst);
            let _ = writeln!(
                conn,
                "generation={} served_before={n} key={hex}",
                u.generation()
            );
        }
    });
    upgrader.wait();
    upgrader.drain();
    Ok(())
}
