//! `umlctl clone`: many processes from one image that share the memory
//! they have not written, each computing exactly what the original would.

#[path = "common/mod.rs"]
mod common;
#[path = "engine_support.rs"]
mod engine_support;

use engine_support::*;
use std::fs;
use std::path::Path;

/// Starts the test workload (stdout appended to `out`) and waits until it
/// has filled its memory.
fn workload(args: &str, dir: &Path, out: &Path) -> std::process::Child {
    let w = common::tool("workload");
    let child = spawn_sh(&format!("exec {} {args}", w.display()), dir, out);
    wait_for(out, |t| t.contains("ready"), "workload ready");
    child
}

/// `umlctl --json clone DIR -n N`: the clones' pids.
fn clone(dir: &Path, n: usize) -> Vec<i32> {
    json_pids(&["clone", dir.to_str().unwrap(), "-n", &n.to_string()])
}

/// A field in KiB of /proc/PID/smaps_rollup.
fn rollup_kib(pid: i32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} for pid {pid}"))
}

#[test]
fn ten_clones_share_unwritten_memory_and_each_compute_correctly() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    // One step per millisecond: the clones write little before we measure.
    let child = workload("--mib 64 --threads 2 --sleep-every 1", tmp.path(), &out);
    let img = tmp.path().join("img");
    ok(&snapshot(child.id() as i32, &img, &["--kill"]));
    kill_child(child);
    let pids = clone(&img, 10);
    assert_eq!(pids.len(), 10);
    let shared_kib: u64 = pids.iter().map(|&p| rollup_kib(p, "Pss_Anon:")).sum();
    for &p in &pids {
        // Every clone has the whole image in memory, not just mapped.
        assert!(rollup_kib(p, "Rss:") >= 64 * 1024, "clone {p} lacks memory");
        assert_eq!(status_field(p, "PPid"), "1", "clone {p} is not reparented");
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
        let sid: i32 = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(3)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(sid, p, "clone {p} has no session of its own");
    }
    assert!(
        shared_kib < 64 * 1024 * 3 / 2,
        "ten clones of a 64 MiB image hold {shared_kib} KiB between them: not shared"
    );
    let len = fs::read_to_string(&out).unwrap().len();
    for &p in &pids {
        // SAFETY: signalling our clones.
        unsafe { libc::kill(p, libc::SIGUSR1) };
    }
    let text = wait_for(
        &out,
        |t| t[len..].matches("verify ").count() >= 20,
        "20 verifications (10 clones x 2 threads)",
    );
    kill_all(&pids);
    let lines: Vec<&str> = text[len..]
        .lines()
        .filter(|l| l.starts_with("verify"))
        .collect();
    assert!(lines.iter().all(|l| l.ends_with(" ok")), "{lines:#?}");
}

#[test]
fn clones_finish_like_an_uninterrupted_run() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let args = "--mib 8 --threads 2 --steps 3000 --sleep-every 1";
    let reference = tmp.path().join("ref.txt");
    let mut child = workload(args, tmp.path(), &reference);
    child.wait().unwrap();
    let done = |t: &str| {
        let mut v: Vec<String> = t
            .lines()
            .filter(|l| l.starts_with("done"))
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let want = done(&fs::read_to_string(&reference).unwrap());
    assert_eq!(want.len(), 2);

    let out = tmp.path().join("out.txt");
    let child = workload(args, tmp.path(), &out);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let img = tmp.path().join("img");
    ok(&snapshot(child.id() as i32, &img, &["--kill"]));
    kill_child(child);
    assert!(
        done(&fs::read_to_string(&out).unwrap()).is_empty(),
        "finished before the snapshot"
    );
    let pids = clone(&img, 3);
    for &p in &pids {
        wait_gone(p, "a clone");
    }
    let got = done(&fs::read_to_string(&out).unwrap());
    let mut expect: Vec<String> = want.iter().flat_map(|l| vec![l.clone(); 3]).collect();
    expect.sort();
    assert_eq!(got, expect);
}

#[test]
fn clone_refuses_what_clones_would_share_and_starts_nothing() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    // A FIFO held open by the process: an open file description (object).
    let child = spawn_sh(
        "mkfifo f && exec 3<>f && echo ready && exec sleep 1000",
        tmp.path(),
        &out,
    );
    wait_for(&out, |t| t.contains("ready"), "sleep ready");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let pid = child.id() as i32;
    let img = tmp.path().join("img");
    ok(&snapshot(pid, &img, &[]));
    let sleeps = || {
        let o = std::process::Command::new("pgrep")
            .args(["-c", "-x", "sleep"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let before = sleeps();
    let o = umlctl(&["clone", img.to_str().unwrap(), "-n", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("once per copy"), "{err}");
    assert_eq!(sleeps(), before, "a refused clone left a process");
    let o = umlctl(&["clone", img.to_str().unwrap(), "-n", "0"]);
    assert_eq!(o.status.code(), Some(2));
    let o = umlctl(&["clone", tmp.path().join("missing").to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    kill_child(child);
}
