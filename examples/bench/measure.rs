//! Small measuring tools: percentiles, process memory and descriptors, and a sampler of resident memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The `p` quantile (0..=1) of sorted values, nearest rank.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i])
}

/// The median of unsorted durations.
pub fn median(values: &[Duration]) -> Option<Duration> {
    let mut v = values.to_vec();
    v.sort();
    percentile(&v, 0.5)
}

/// Milliseconds with two decimals, or `-`.
pub fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1000.0))
}

/// Resident memory of `pid` in bytes (`/proc/PID/statm`), if it exists.
pub fn rss(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(pages * page)
}

/// The children of every thread of `pid` (an upgrade forks from whichever thread runs it).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

/// Open descriptors of `pid`: all of them, and those that are not client connections (connections come and
/// go with the clients; the rest must stay flat across upgrades). A socket counts as a connection unless it
/// is a TCP listener or a Unix socket: a TCP socket that has just closed is in no table at all.
pub fn fds(pid: u32) -> (usize, Vec<String>) {
    // A descriptor closed while the directory was read has no target: it is gone.
    let all: Vec<(i32, String)> = super::support::open_fds(pid)
        .into_iter()
        .filter(|(_, t)| !t.is_empty())
        .collect();
    let mut kept = std::collections::BTreeSet::new();
    for (table, listening_only) in [
        ("tcp", true),
        ("tcp6", true),
        ("unix", false),
        ("udp", false),
    ] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let inode = match table {
                // Num RefCount Protocol Flags Type St Inode Path
                "unix" => cols.get(6),
                // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
                _ => cols.get(9),
            };
            let listening = cols.get(3) == Some(&"0A");
            if let Some(inode) = inode {
                if !listening_only || listening {
                    kept.insert(format!("socket:[{inode}]"));
                }
            }
        }
    }
    let fixed = all
        .iter()
        .filter(|(_, t)| !t.starts_with("socket:") || kept.contains(t))
        .map(|(fd, t)| format!("{fd} -> {t}"))
        .collect();
    (all.len(), fixed)
}

/// Samples the summed resident memory of a set of processes every millisecond until stopped; reports the
/// peak. The set is the watched pids, plus, with `find_child`, the first child any of their threads starts
/// (the new process is the old one's child; once it is found only `statm` files are read, so that the
/// sampler costs the machine as little as it can while it is being measured).
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    pids: Arc<Mutex<Vec<u32>>>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(pids: &[u32], find_child: bool) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let pids = Arc::new(Mutex::new(pids.to_vec()));
        let thread = {
            let (stop, pids) = (stop.clone(), pids.clone());
            std::thread::spawn(move || {
                let mut peak = 0;
                let mut child = None;
                let mut execed = false;
                while !stop.load(Ordering::Relaxed) {
                    let mut set = pids.lock().unwrap().clone();
                    if find_child && child.is_none() {
                        child = set.iter().flat_map(|&p| children(p)).next();
                    }
                    // Until it has called exec, the child shares the old process's memory (it is started
                    // with vfork semantics) and carries the name of the library thread that started it:
                    // counting it then would count the old process twice.
                    if !execed {
                        execed = child.is_some_and(|c| {
                            std::fs::read_to_string(format!("/proc/{c}/comm"))
                                .is_ok_and(|n| n.trim_end() != "exuvia-upgrade")
                        });
                    }
                    set.extend(child.filter(|_| execed));
                    let sum: u64 = set.iter().filter_map(|&p| rss(p)).sum();
                    peak = peak.max(sum);
                    std::thread::sleep(Duration::from_millis(1)); // the sampling period
                }
                peak
            })
        };
        RssSampler { stop, pids, thread }
    }

    /// Adds a process that is not a child of a watched one (a separately started successor).
    pub fn watch(&self, pid: u32) {
        self.pids.lock().unwrap().push(pid);
    }

    /// Stops sampling; the peak summed resident memory in bytes.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}
