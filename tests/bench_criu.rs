//! `umlctl bench table1`'s CRIU columns: measured beside ours when a working
//! CRIU is installed (tools/install-criu), and "not available (why)" with
//! no figures otherwise.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;

/// Where tools/install-criu puts CRIU.
fn installed_criu() -> PathBuf {
    let dir = std::env::var_os("UMLCTL_CRIU_DIR").unwrap_or_else(|| "/opt/umlctl/criu".into());
    PathBuf::from(dir).join("criu")
}

fn criu_works() -> bool {
    Command::new(installed_criu())
        .arg("check")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One small run of the benchmark with `args`; its JSON report.
fn table1(args: &[&str]) -> serde_json::Value {
    common::tool("workload");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::umlctl())
        .args(["--json", "bench", "table1", "--sizes", "16", "--runs", "1"])
        .args(["--clones", "2", "--clone-mib", "16"])
        .arg("--dir")
        .arg(dir.path())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

#[test]
fn criu_is_measured_beside_ours() {
    if common::skip_unless(common::is_root(), "root (ptrace of the workload)")
        || common::skip_unless(criu_works(), "a working CRIU (run tools/install-criu)")
    {
        return;
    }
    let criu = installed_criu();
    let report = table1(&["--criu", criu.to_str().unwrap()]);
    let c = &report["criu"];
    assert_eq!(c["status"], "measured", "{c}");
    assert!(c["lazy_unavailable"].is_null(), "{c}");
    let ours = &report["rows"][0];
    // The clones row: two clones of 16 MiB hold about one copy.
    let clones = report["clones"]["clones_vs_one"]
        .as_f64()
        .expect("clones row");
    assert!(clones > 0.5 && clones < 1.5, "{}", report["clones"]);
    let row = &c["rows"][0];
    assert_eq!(row["size_mib"], 16);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k}: {v}"));
    for k in [
        "dump_ms",
        "frozen_ms",
        "restore_ms",
        "lazy_restore_ms",
        "touch_after_lazy_ms",
    ] {
        assert!(f(row, k) > 0.0, "{k}: {row}");
    }
    // CRIU is stopped for part of its dump, and syncing adds to it.
    assert!(f(row, "frozen_ms") < f(row, "dump_ms"), "{row}");
    assert!(f(row, "dump_fsync_ms") >= f(row, "dump_ms"), "{row}");
    let ratio = f(ours, "snapshot_ms") / f(row, "dump_fsync_ms");
    assert!((f(row, "snapshot_vs_dump_fsync") - ratio).abs() < 1e-9);
    let ratio = f(ours, "lazy_resume_ms") / f(row, "lazy_restore_ms");
    assert!((f(row, "lazy_resume_vs_lazy_restore") - ratio).abs() < 1e-9);
}

#[test]
fn without_criu_the_report_says_why() {
    if common::skip_unless(common::is_root(), "root (ptrace of the workload)") {
        return;
    }
    let report = table1(&["--no-criu"]);
    assert_eq!(report["criu"]["status"], "not_available");
    assert_eq!(report["criu"]["reason"], "--no-criu");
    assert!(report["criu"]["rows"].is_null());
    let report = table1(&["--criu", "/nonexistent/criu"]);
    assert_eq!(report["criu"]["status"], "not_available");
    let reason = report["criu"]["reason"].as_str().unwrap();
    assert!(reason.contains("/nonexistent/criu"), "{reason}");
}
