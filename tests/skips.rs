//! A skipped test is said, with its reason, in the last lines of `scripts/test`: a machine without a recent
//! systemd (faked here) gets "SKIPPED" and why, never a silent `ok`.

mod support;

use std::path::Path;
use std::process::Command;

#[test]
fn an_old_systemd_is_a_reason_to_skip_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("systemctl");
    support::script(&fake, "echo 'systemd 252 (252.38-1~deb12u1)'\n");
    let why = support::systemd::unavailable_with(&fake).expect("systemd 252 must not be enough");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(
            why,
            "systemd 252 is older than 253 (run scripts/install-systemd)"
        );
    } else {
        assert!(why.contains("not root"), "{why}");
    }
}

fn summary(output: &str, skips: &str, failed_steps: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, log) = (dir.path().join("out"), dir.path().join("skips"));
    std::fs::write(&out, output).unwrap();
    std::fs::write(&log, skips).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/summary");
    let o = Command::new(script)
        .arg(&out)
        .arg(&log)
        .args(failed_steps)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn the_summary_names_what_was_skipped_and_why() {
    let output = "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s\n\
                  test result: ok. 9 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2s\n";
    let skips = "real-systemd test reloads: systemd 252 is older than 253 (run scripts/install-systemd)\n\
                 real-systemd test verify: systemd 252 is older than 253 (run scripts/install-systemd)\n";
    let (ok, text) = summary(output, skips, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("SKIPPED"), "{text}");
    assert!(
        text.contains("real-systemd test reloads: systemd 252 is older than 253"),
        "{text}"
    );
    assert!(
        text.ends_with("tests: 14 passed, 0 failed, 2 skipped\n"),
        "{text}"
    );

    let failing = "test a::b ... FAILED\ntest result: FAILED. 3 passed; 1 failed; 0 ignored\n";
    let (ok, text) = summary(failing, "", &["cargo fmt --all -- --check"]);
    assert!(!ok, "{text}");
    assert!(text.contains("  failed: a::b\n"), "{text}");
    assert!(text.contains("step failed: cargo fmt"), "{text}");
    assert!(
        text.ends_with("tests: 3 passed, 1 failed, 0 skipped\n"),
        "{text}"
    );
}
