//! The README's first command must keep working: the demo runs to completion, reports 0 failed requests for
//! every successful upgrade, and leaves no process behind.

mod support;

use std::process::Command;

#[test]
fn the_demo_runs_and_reports_zero_failures() {
    support::become_subreaper();
    let demo = support::example("demo");
    let out = Command::new(&demo).output().expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .contains("result: PASS (0 failed requests across 5 successful upgrades and 1 refused"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  failed by kind: refused 0, reset 0, timeout 0, short read 0"),
        "{stdout}"
    );
    assert!(stdout.contains("processes left behind: none"), "{stdout}");
    let upgrades = stdout
        .lines()
        .filter(|l| l.contains("serving after"))
        .count();
    assert_eq!(upgrades, 5, "{stdout}");
}
