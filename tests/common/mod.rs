//! Shared helpers for the integration tests: locating the real binaries and
//! skipping (or, under CI, failing) when the host lacks a capability.
#![allow(dead_code)]

use std::path::PathBuf;

/// The umlctl binary under test.
pub fn umlctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_umlctl"))
}

/// A binary of the `umlctl-tools` package (tools/src/bin), built beside
/// umlctl (cargo does not rebuild another package's binaries for a test, so
/// the first call of each test process makes sure they are current).
pub fn tool(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let dir = umlctl().parent().expect("target dir").to_path_buf();
    let path = dir.join(name);
    let mut fresh = false;
    BUILT.call_once(|| fresh = true);
    if fresh || !path.exists() {
        let release = dir.ends_with("release");
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "umlctl-tools"]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build for tools");
        assert!(st.success(), "building tool {name} failed");
    }
    path
}

/// Skip the calling test when `ok` is false: print why and return true.
/// Under CI (the variable `CI` set) a skip is a failure.
pub fn skip_unless(ok: bool, what: &str) -> bool {
    if ok {
        return false;
    }
    if std::env::var_os("CI").is_some() {
        panic!("required capability missing under CI: {what}");
    }
    eprintln!("SKIP: {what}");
    true
}

/// Whether FUSE over io_uring is switched on in this kernel
/// (`umlctl fs mount --io-uring` can work; tools/setup turns it on).
pub fn fuse_io_uring_on() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y")
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether process `pid` still runs: neither gone nor a zombie (whose
/// parent may never reap it).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}
