//! `umlctl bench fs` end to end, small: every figure is measured on every
//! setup (native, overlayfs, fuse-overlayfs, cowfs), the ratio and the
//! verdict follow from the values, and the report says how cowfs was
//! mounted. The figures themselves are not judged here (a timed test
//! would only measure this machine's noise); the benchmark is how the
//! targets are checked.

#[path = "common/mod.rs"]
mod common;
#[path = "cowfs_support.rs"]
mod support;

use serde_json::Value;
use support::{ok, s};

fn bench(dir: &std::path::Path, extra: &[&str]) -> String {
    let mut args = vec![
        "bench",
        "fs",
        "--size-mib",
        "8",
        "--files",
        "200",
        "--runs",
        "1",
        "--dir",
        s(dir),
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

fn value(f: &Value, setup: &str) -> Option<f64> {
    f["values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v[0] == setup)
        .and_then(|v| v[1].as_f64())
}

#[test]
fn every_figure_is_measured_on_every_setup_with_its_verdict() {
    if support::skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let report: Value = serde_json::from_str(&bench(t.path(), &["--json"])).unwrap();
    let mount = &report["cowfs_mount"];
    assert_eq!(mount["transport"], "auto", "{mount}");
    assert_eq!(mount["served_by"], "daemon", "{mount}");
    let over = if common::fuse_io_uring_on() {
        "io-uring"
    } else {
        "dev-fuse"
    };
    assert_eq!(mount["requests_over"], over, "{mount}");
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        report["wakeup_us"].as_f64().is_some_and(|w| w > 0.0),
        cpus > 1
    );

    let figures = report["figures"].as_array().unwrap();
    let names: Vec<&str> = figures
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    for want in [
        "first 4 KiB write + fsync",
        "sequential read 8 MiB, cold",
        "sequential read 8 MiB, warm",
        "sequential write 8 MiB + fsync",
        "4 KiB random writes",
        "create 200 small files + sync",
        "stat 200 base files, cold",
        "checkpoint with 8 MiB + 200 files changed",
        "rollback with 8 MiB + 200 files changed",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "no figure {want:?} in {names:?}"
        );
    }
    for f in figures {
        let cowfs = value(f, "cowfs").unwrap_or_else(|| panic!("no cowfs value: {f}"));
        assert!(cowfs > 0.0, "{f}");
        let target = f["target"].as_str().unwrap();
        let limit: f64 = target
            .split(' ')
            .nth(1)
            .and_then(|n| n.trim_end_matches('x').parse().ok())
            .unwrap_or_else(|| panic!("target {target:?}"));
        let Some(native) = value(f, "native") else {
            // Checkpoint and rollback are cowfs's own: an absolute limit.
            assert_eq!(f["met"], cowfs <= limit, "{f}");
            continue;
        };
        for setup in ["overlay", "fuse-overlayfs"] {
            assert!(value(f, setup).is_some_and(|v| v > 0.0), "{setup}: {f}");
        }
        let ratio = f["cowfs_vs_native"].as_f64().unwrap();
        assert!(
            (ratio - cowfs / native).abs() < 1e-9 * ratio.max(1.0),
            "{f}"
        );
        let met = match (f["unit"].as_str().unwrap(), target.starts_with(">=")) {
            ("ms", _) => cowfs <= limit,
            (_, true) => ratio >= limit,
            (_, false) => ratio <= limit,
        };
        assert_eq!(f["met"], met, "{f}");
    }
}

#[test]
fn the_table_says_how_cowfs_was_mounted() {
    if support::skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let out = bench(
        t.path(),
        &[
            "--only",
            "checkpoint",
            "--transport",
            "dev-fuse",
            "--in-process",
        ],
    );
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(
            "cowfs (in-process): requests over dev-fuse (transport dev-fuse), writeback cache"
        ),
        "{out}"
    );
    assert!(
        out.contains("checkpoint with 8 MiB + 200 files changed"),
        "{out}"
    );
    assert!(!out.contains("stat 200"), "--only ignored: {out}");
}
