//! The benchmark stays runnable and honest: a short run of every part completes, prints its table and its
//! JSON, and no exuvia request failed (the bench exits non-zero otherwise, and says so in the JSON). The
//! baselines' failures are reported, not asserted: a short run may happen to miss them. Under `CI` the
//! systemctl scenario must have run on the real systemd (the bench fails if it had to skip it).

mod support;

#[test]
fn a_short_benchmark_run_completes_with_zero_exuvia_failures() {
    support::become_subreaper();
    let bench = support::example("bench");
    let out = std::process::Command::new(bench)
        .args([
            "--upgrades",
            "3",
            "--clients",
            "4",
            "--scaling",
            "2",
            "--listeners",
            "1,100",
            "--ballast-mib",
            "16",
            "--accept-rounds",
            "1",
            "--accept-secs",
            "0.2",
            "--soak",
            "20",
            "--soak-every",
            "10",
            "--json",
        ])
        .output()
        .expect("run the bench");
    let (json, table) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "bench failed:\n{table}\n{json}");
    assert!(json.trim_end().ends_with("\"correct\":true}"), "{json}");
    for scenario in [
        "control",
        "exuvia-sighup",
        "exuvia-sighup-bg",
        "exuvia-systemctl",
    ] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{scenario} ")))
            .unwrap_or_else(|| panic!("no {scenario} row:\n{table}"));
        if row.contains("SKIPPED") {
            assert!(!support::in_ci(), "{row}");
            eprintln!("{row}");
            continue;
        }
        let failed: u64 = row.split_whitespace().nth(5).unwrap().parse().unwrap();
        assert_eq!(failed, 0, "{row}");
    }
    // The rollback scenario: new processes that crash on probation are rolled back; nothing is refused.
    let row = table
        .lines()
        .find(|l| l.starts_with("exuvia-rollback "))
        .unwrap_or_else(|| panic!("no exuvia-rollback row:\n{table}"));
    let refused: u64 = row.split_whitespace().nth(6).unwrap().parse().unwrap();
    assert_eq!(refused, 0, "{row}");
    assert!(table.contains("each rolled back"), "{table}");
    assert!(table.contains("bench: no process left behind"), "{table}");
    for part in [
        "naive-restart",
        "reuseport-overlap",
        "handover with many sockets",
        "accept throughput",
        "soak: 20 consecutive upgrades",
        "targets:",
    ] {
        assert!(table.contains(part), "no {part:?} in:\n{table}");
    }
}
