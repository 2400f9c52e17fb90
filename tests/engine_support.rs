//! Helpers shared by the engine breadth tests (trees, fds, timers,
//! namespaces): running programs detached, snapshotting and resuming them
//! with the real `umlctl`, waiting on their output.
#![allow(dead_code)]

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common;

/// Skips unless we can ptrace arbitrary processes (root).
pub fn can_trace() -> bool {
    !common::skip_unless(
        common::is_root(),
        "the engine tests need root (ptrace of non-children, /proc/PID/map_files)",
    )
}

pub fn umlctl(args: &[&str]) -> Output {
    Command::new(common::umlctl())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run umlctl")
}

/// Starts `sh -c SCRIPT` in a session of its own (so that killing its group
/// kills the whole tree) with stdout and stderr appended to `out`, stdin
/// null and no descriptors beyond 0-2.
pub fn spawn_sh(script: &str, dir: &Path, out: &Path) -> Child {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .unwrap();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", script])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    // SAFETY: setsid and close_range are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn")
}

/// Polls `path` until `pred` holds for its text (30 s at most).
pub fn wait_for(path: &Path, pred: impl Fn(&str) -> bool, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; output so far:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn snapshot(pid: i32, dir: &Path, extra: &[&str]) -> Output {
    let d = dir.display().to_string();
    let p = pid.to_string();
    let mut args = vec!["snapshot", &p, "--out", &d];
    args.extend_from_slice(extra);
    umlctl(&args)
}

pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "umlctl failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `umlctl --json resume DIR EXTRA...`: the pids of the resumed processes.
pub fn resume(dir: &Path, extra: &[&str]) -> Vec<i32> {
    let mut args = vec!["resume", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    json_pids(&args)
}

/// `umlctl --json ARGS...` of a command that reports `pids` (resume, clone).
pub fn json_pids(args: &[&str]) -> Vec<i32> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = ok(&umlctl(&all));
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("umlctl prints JSON");
    v["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .map(|p| p.as_i64().unwrap() as i32)
        .collect()
}

pub use crate::common::alive;

pub fn status_field(pid: i32, key: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Kills every process in `pids` (and reaps nothing: they are not ours).
pub fn kill_all(pids: &[i32]) {
    for &p in pids {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

/// Kills and reaps a child we started.
pub fn kill_child(mut c: Child) {
    // SAFETY: kill has no memory preconditions; the group is the child's session.
    unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
    let _ = c.kill();
    let _ = c.wait();
}

/// Waits until `pid` is gone (up to 30 s); panics otherwise.
pub fn wait_gone(pid: i32, what: &str) {
    let t0 = Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < Duration::from_secs(30), "{what} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids an image holds, root first (from `umlctl image inspect`).
pub fn image_pids(img: &Path) -> Vec<i32> {
    let m = ok(&umlctl(&[
        "--json",
        "image",
        "inspect",
        img.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(m.trim()).expect("inspect prints JSON");
    v["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect()
}

/// Kills the given processes (and the sessions of the children) when
/// dropped, so that a failing test leaves nothing running.
pub struct Reaper {
    pub pids: Vec<i32>,
    pub children: Vec<std::process::Child>,
}

impl Reaper {
    pub fn pids(pids: Vec<i32>) -> Reaper {
        Reaper {
            pids,
            children: vec![],
        }
    }
    pub fn child(c: std::process::Child) -> Reaper {
        Reaper {
            pids: vec![],
            children: vec![c],
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_all(&self.pids);
        for c in self.children.drain(..) {
            kill_child(c);
        }
    }
}
