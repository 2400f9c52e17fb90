//! POSIX conformance: pjdfstest (installed by tools/install-pjdfstest) on a
//! cowfs mount must fail no test that passes on the native filesystem.

#[path = "common/mod.rs"]
mod common;
#[path = "cowfs_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use support::{ok, s, Mounted};

fn pjdfstest() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([home.join(".cargo/bin")])
        .map(|d| d.join("pjdfstest"))
        .find(|p| p.exists())
}

/// Run the suite in `dir`; test name -> "ok" / "FAILED" / "skipped".
fn run(bin: &Path, dir: &Path) -> BTreeMap<String, String> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new(bin)
        .arg("-p")
        .arg(dir)
        .current_dir(dir)
        .output()
        .expect("run pjdfstest");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut results = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(result), None) = (words.next(), words.next(), words.next()) {
            if name.contains("::") {
                results.insert(name.to_string(), result.to_string());
            }
        }
    }
    assert!(results.len() > 300, "pjdfstest ran too few tests:\n{text}");
    results
}

#[test]
fn pjdfstest_fails_nothing_that_passes_natively() {
    if support::skip() {
        return;
    }
    let Some(bin) = pjdfstest() else {
        common::skip_unless(
            false,
            "pjdfstest is not installed (tools/install-pjdfstest)",
        );
        return;
    };
    if common::skip_unless(
        std::process::Command::new("id")
            .arg("tests")
            .output()
            .is_ok_and(|o| o.status.success()),
        "pjdfstest needs a user named tests (tools/install-pjdfstest)",
    ) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let native = t.path().join("native");
    fs::create_dir(&native).unwrap();
    let want = run(&bin, &native);

    // The suite runs inside a directory of the base, with base files
    // around, in each mode: the writeback cache over /dev/fuse,
    // passthrough (which writes through), and the default (the writeback
    // cache, requests taken by io_uring where the kernel offers it).
    fs::create_dir_all(t.path().join("base/work")).unwrap();
    fs::write(t.path().join("base/work/base-file"), "from the base").unwrap();
    let mut modes = vec![&["--transport", "dev-fuse"][..], &["--passthrough"][..]];
    if !common::skip_unless(
        common::fuse_io_uring_on(),
        "FUSE over io_uring is off: pjdfstest not run with requests over io_uring (tools/setup turns it on)",
    ) {
        modes.push(&[][..]);
    }
    for options in modes {
        let got = run_on_cowfs(&bin, t.path(), options);
        check(&want, &got, options);
    }
}

fn run_on_cowfs(bin: &Path, dir: &Path, options: &[&str]) -> BTreeMap<String, String> {
    let store = dir.join(format!("store{}", options.join("")));
    ok(&["fs", "create", s(&store), "--base", s(&dir.join("base"))]);
    let (m, _) = Mounted::with(&store, &dir.join("mnt"), options);
    let got = run(bin, &m.path("work"));
    m.umount();
    got
}

fn check(want: &BTreeMap<String, String>, got: &BTreeMap<String, String>, options: &[&str]) {
    let regressions: Vec<_> = want
        .iter()
        .filter(|(name, r)| *r == "ok" && got.get(*name).is_some_and(|g| g != "ok"))
        .map(|(name, _)| format!("{name}: {}", got[name]))
        .collect();
    let failed = got.values().filter(|r| *r == "FAILED").count();
    eprintln!(
        "pjdfstest: native {} ok; cowfs {options:?} {} ok, {failed} failed",
        want.values().filter(|r| *r == "ok").count(),
        got.values().filter(|r| *r == "ok").count()
    );
    // pathconf(_PC_LINK_MAX) is unknown to glibc for FUSE file systems, so
    // this one test is skipped (not failed) on every FUSE mount.
    let regressions: Vec<_> = regressions
        .into_iter()
        .filter(|r| r != "link::link_count_max: skipped")
        .collect();
    assert!(
        regressions.is_empty(),
        "pass natively, not on cowfs {options:?}: {regressions:#?}"
    );
    assert_eq!(failed, 0, "pjdfstest failures on cowfs {options:?}");
}
