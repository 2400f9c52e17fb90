//! Integration tests of the process engine through the real `umlctl`
//! binary: snapshot, kill, resume, and check that the process carries on
//! exactly where it was.

#[path = "common/mod.rs"]
mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::alive;

/// Skips unless we can ptrace arbitrary processes (root).
fn can_trace() -> bool {
    !common::skip_unless(
        common::is_root(),
        "the engine tests need root (ptrace of non-children, /proc/PID/map_files)",
    )
}

fn umlctl(args: &[&str]) -> Output {
    Command::new(common::umlctl())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run umlctl")
}

/// Starts a program with stdout and stderr appended to `out`, stdin null,
/// and no inherited descriptors beyond 0-2.
fn spawn(prog: &Path, args: &[&str], out: &Path, uid: Option<u32>) -> Child {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .unwrap();
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    if let Some(u) = uid {
        cmd.uid(u).gid(u);
    }
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn")
}

fn workload(args: &[&str], out: &Path) -> Child {
    let w = common::tool("workload");
    let child = spawn(&w, args, out, None);
    wait_for(out, |t| t.contains("ready"), "workload ready");
    child
}

/// Polls `path` until `pred` holds for its text (10 s at most).
fn wait_for(path: &Path, pred: impl Fn(&str) -> bool, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}; output so far:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, sig) };
}

fn status_field(pid: i32, key: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Counters of the `verify ... ok` lines (per thread), failing on any BAD.
fn verified(text: &str) -> Vec<(u64, u64)> {
    assert!(!text.contains("BAD"), "memory check failed:\n{text}");
    text.lines()
        .filter(|l| l.starts_with("verify") && l.ends_with(" ok"))
        .map(|l| {
            let num = |k: &str| {
                l.split(k)
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            };
            (num("t="), num("counter="))
        })
        .collect()
}

fn snapshot(pid: i32, dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "snapshot".to_string(),
        pid.to_string(),
        "--out".into(),
        dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    umlctl(&a)
}

fn resume(dir: &Path, extra: &[&str]) -> i32 {
    let mut args = vec!["resume", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = umlctl(&args);
    assert!(
        o.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout)
        .unwrap()
        .trim()
        .parse()
        .expect("resume prints the pid")
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "umlctl failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn kill_and_reap(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// One size/thread-count case: memory, counters and zmm registers survive.
fn roundtrip(mib: u32, threads: u32) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let mut args = vec![
        "--mib".to_string(),
        mib.to_string(),
        "--threads".into(),
        threads.to_string(),
    ];
    if avx512() {
        args.push("--avx512".into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = workload(&a, &out);
    let pid = child.id() as i32;
    if avx512() {
        wait_for(&out, |t| t.contains("zmm ok"), "a first zmm loop");
    }
    signal(pid, libc::SIGUSR1);
    let before = wait_for(
        &out,
        |t| verified(t).len() == threads as usize,
        "verification before the snapshot",
    );
    let before_counts = verified(&before);
    let zmm_before = before.matches("zmm ok").count();
    let dir = tmp.path().join("img");
    ok(&snapshot(pid, &dir, &["--kill"]));
    kill_and_reap(child);
    let len_at_snapshot = fs::read_to_string(&out).unwrap().len();
    let new = resume(&dir, &[]);
    assert_ne!(new, pid);
    signal(new, libc::SIGUSR1);
    let after = wait_for(
        &out,
        |t| verified(&t[len_at_snapshot..]).len() == threads as usize,
        "verification after the resume",
    );
    for (t, c) in verified(&after[len_at_snapshot..]) {
        let prev = before_counts.iter().find(|(pt, _)| *pt == t).unwrap().1;
        assert!(
            c > prev,
            "thread {t}'s counter went from {prev} back to {c}"
        );
    }
    if avx512() {
        wait_for(
            &out,
            |t| t.matches("zmm ok").count() >= zmm_before + 2,
            "zmm loops after the resume",
        );
        assert!(!fs::read_to_string(&out).unwrap().contains("zmm BAD"));
    }
    assert_eq!(
        status_field(new, "Threads"),
        (threads + avx512() as u32).to_string()
    );
    signal(new, libc::SIGKILL);
}

#[test]
fn workload_1mib_single_thread() {
    if can_trace() {
        roundtrip(1, 1);
    }
}

#[test]
fn workload_64mib_single_and_multi_thread() {
    if can_trace() {
        roundtrip(64, 1);
        roundtrip(64, 4);
    }
}

#[test]
fn workload_512mib_single_and_multi_thread() {
    if can_trace() {
        roundtrip(512, 1);
        roundtrip(512, 3);
    }
}

/// Runs `cmd` to the end once for reference, then again with its stdout on
/// a pipe, snapshots it mid-way, kills it and resumes it with stdout to a
/// file: the two outputs joined must equal the reference.
/// `filter` keeps the lines to compare; threads may finish in any order, so
/// with `sorted` the lines are compared as sets.
fn same_output(
    prog: &Path,
    args: &[&str],
    after: Duration,
    filter: fn(&str) -> bool,
    sorted: bool,
) {
    let tmp = tempfile::tempdir().unwrap();
    let reference = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(reference.status.success());
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped());
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut pipe = child.stdout.take().unwrap();
    let (first_line, started) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(&mut pipe);
        let mut s = String::new();
        r.read_line(&mut s).unwrap();
        first_line.send(()).unwrap();
        std::io::Read::read_to_string(&mut r, &mut s).unwrap();
        s
    });
    // Snapshot `after` the program's first line: mid-computation.
    started.recv().unwrap();
    std::thread::sleep(after);
    let dir = tmp.path().join("img");
    ok(&snapshot(child.id() as i32, &dir, &["--kill"]));
    let _ = child.wait();
    let first = reader.join().unwrap();
    let rest_path = tmp.path().join("rest.txt");
    let new = resume(&dir, &["--stdio", rest_path.to_str().unwrap()]);
    let t0 = Instant::now();
    while alive(new) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "resumed program did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = first.clone() + &fs::read_to_string(&rest_path).unwrap_or_default();
    let keep = |s: &str| {
        let mut v: Vec<&str> = s.lines().filter(|l| filter(l)).collect();
        if sorted {
            v.sort();
        }
        v.join("\n")
    };
    let want = String::from_utf8(reference.stdout).unwrap();
    assert!(
        !first.is_empty() && first.len() < want.len(),
        "the snapshot was not taken mid-computation"
    );
    assert_eq!(keep(&got), keep(&want));
}

const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(void) {
    size_t n = (8u << 20) / 8;
    unsigned long *buf = malloc(n * 8), acc = 0;
    for (size_t i = 0; i < n; i++) buf[i] = i * 2654435761u;
    for (int step = 0; step < 24; step++) {
        for (size_t i = 0; i < n; i++) { acc = acc * 31 + buf[i]; buf[i] ^= acc; }
        printf("step %d acc %016lx\n", step, acc);
        fflush(stdout);
        struct timespec ts = {0, 40 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    printf("final %016lx\n", acc);
    return 0;
}
"#;

#[test]
fn c_program_finishes_with_same_output() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("prog.c");
    fs::write(&src, C_PROGRAM).unwrap();
    let bin = tmp.path().join("prog");
    let cc = Command::new("cc")
        .arg("-O2")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(cc.success());
    same_output(&bin, &[], Duration::from_millis(400), |_| true, false);
}

#[test]
fn rust_program_finishes_with_same_output() {
    if can_trace() {
        let w = common::tool("workload");
        let args = [
            "--mib",
            "32",
            "--threads",
            "2",
            "--steps",
            "100000000",
            "--sleep-every",
            "200000",
        ];
        let not_ready: fn(&str) -> bool = |l| !l.starts_with("ready");
        same_output(&w, &args, Duration::from_millis(400), not_ready, true);
    }
}

const PY_PROGRAM: &str = r#"
import hashlib, time
h = hashlib.sha256()
data = [i * i for i in range(200000)]
for step in range(24):
    for i in range(0, len(data), 7):
        data[i] = (data[i] * 31 + step) % 1000003
    h.update(str(sum(data)).encode())
    print("step", step, h.hexdigest()[:16], flush=True)
    time.sleep(0.04)
print("final", h.hexdigest())
"#;

#[test]
fn python_finishes_with_same_output() {
    if !can_trace() {
        return;
    }
    let py = ["/usr/bin/python3", "python3"]
        .iter()
        .find(|p| Command::new(p).arg("-c").arg("1").output().is_ok())
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("p.py");
    fs::write(&script, PY_PROGRAM).unwrap();
    same_output(
        Path::new(py),
        &[script.to_str().unwrap()],
        Duration::from_millis(500),
        |_| true,
        false,
    );
}

#[test]
fn one_image_resumed_twice_beside_the_running_original() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let child = workload(&["--mib", "16", "--threads", "2"], &out);
    let pid = child.id() as i32;
    let dir = tmp.path().join("img");
    ok(&snapshot(pid, &dir, &["--leave-running"]));
    let d1 = dir.clone();
    let d2 = dir.clone();
    let o1 = tmp.path().join("o1.txt");
    let o2 = tmp.path().join("o2.txt");
    let (p1, p2) = (o1.clone(), o2.clone());
    let a = std::thread::spawn(move || resume(&d1, &["--stdio", p1.to_str().unwrap()]));
    let b = std::thread::spawn(move || resume(&d2, &["--stdio", p2.to_str().unwrap()]));
    let (n1, n2) = (a.join().unwrap(), b.join().unwrap());
    assert!(n1 != n2 && n1 != pid && n2 != pid);
    assert!(
        alive(pid) && alive(n1) && alive(n2),
        "original and both copies must run"
    );
    let len = fs::read_to_string(&out).unwrap().len();
    for p in [pid, n1, n2] {
        signal(p, libc::SIGUSR1);
    }
    // The original's fd 1 is the file: all three append their lines to it.
    wait_for(
        &out,
        |t| verified(&t[len..]).len() == 6,
        "six verifications (3 processes x 2 threads)",
    );
    for p in [n1, n2] {
        signal(p, libc::SIGKILL);
    }
    kill_and_reap(child);
}

#[test]
fn unprivileged_process_resumes_as_its_user() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let w = common::tool("workload");
    let child = spawn(&w, &["--mib", "8"], &out, Some(65534));
    wait_for(&out, |t| t.contains("ready"), "workload ready");
    let pid = child.id() as i32;
    let dir = tmp.path().join("img");
    ok(&snapshot(pid, &dir, &["--kill"]));
    kill_and_reap(child);
    let new = resume(&dir, &[]);
    assert_eq!(status_field(new, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(new, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(new, "CapEff"), "0000000000000000");
    assert_eq!(status_field(new, "CapPrm"), "0000000000000000");
    let len = fs::read_to_string(&out).unwrap().len();
    signal(new, libc::SIGUSR1);
    wait_for(
        &out,
        |t| verified(&t[len..]).len() == 1,
        "verification as the user",
    );
    signal(new, libc::SIGKILL);
}

#[test]
fn same_pid_is_restored_or_refused_clearly() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let child = workload(&["--mib", "4"], &out);
    let pid = child.id() as i32;
    let dir = tmp.path().join("img");
    ok(&snapshot(pid, &dir, &[]));
    // While the original lives its pid is taken.
    let o = umlctl(&["resume", dir.to_str().unwrap(), "--same-pid"]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("pid {pid} is in use")));
    kill_and_reap(child);
    let new = resume(&dir, &["--same-pid"]);
    assert_eq!(new, pid);
    let len = fs::read_to_string(&out).unwrap().len();
    signal(new, libc::SIGUSR1);
    wait_for(
        &out,
        |t| verified(&t[len..]).len() == 1,
        "verification with the same pid",
    );
    signal(new, libc::SIGKILL);
}

/// Live processes running the program `exe`.
fn count_running(exe: &Path) -> usize {
    let exe = fs::canonicalize(exe).unwrap();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            alive(*p)
                && fs::read_link(format!("/proc/{p}/exe")).ok().as_deref() == Some(exe.as_path())
        })
        .count()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn flip(path: &Path, at_fraction: f64) {
    let mut b = fs::read(path).unwrap();
    let i = ((b.len() - 1) as f64 * at_fraction) as usize;
    b[i] ^= 0x40;
    fs::write(path, b).unwrap();
}

fn truncate(path: &Path) {
    let len = fs::metadata(path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

#[test]
fn corrupt_images_are_refused_before_anything_runs() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    // A private copy of the workload: other tests run theirs meanwhile, and
    // a process resumed from this image would run this very file.
    let exe = tmp.path().join("workload-corrupt");
    fs::copy(common::tool("workload"), &exe).unwrap();
    let child = spawn(&exe, &["--mib", "4"], &out, None);
    wait_for(&out, |t| t.contains("ready"), "workload ready");
    let good = tmp.path().join("good");
    ok(&snapshot(child.id() as i32, &good, &["--kill"]));
    kill_and_reap(child);
    ok(&umlctl(&["image", "verify", good.to_str().unwrap()]));
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "pages byte",
            Box::new(|d: &Path| flip(&d.join("pages.img"), 0.7)),
            "checksum mismatch",
        ),
        (
            "pages first byte",
            Box::new(|d: &Path| flip(&d.join("pages.img"), 0.0)),
            "checksum mismatch",
        ),
        (
            "manifest body byte",
            Box::new(|d: &Path| flip(&d.join("manifest"), 0.5)),
            "manifest",
        ),
        (
            "manifest magic",
            Box::new(|d: &Path| flip(&d.join("manifest"), 0.0)),
            "bad magic",
        ),
        (
            "pages truncated",
            Box::new(|d: &Path| truncate(&d.join("pages.img"))),
            "truncated",
        ),
        (
            "manifest truncated",
            Box::new(|d: &Path| truncate(&d.join("manifest"))),
            "truncated",
        ),
        (
            "pages missing",
            Box::new(|d: &Path| fs::remove_file(d.join("pages.img")).unwrap()),
            "pages.img",
        ),
        (
            "manifest missing",
            Box::new(|d: &Path| fs::remove_file(d.join("manifest")).unwrap()),
            "manifest",
        ),
        (
            "unknown version",
            Box::new(|d: &Path| {
                let p = d.join("manifest");
                let mut b = fs::read(&p).unwrap();
                b[8] = 99;
                fs::write(&p, b).unwrap();
            }),
            "version 99 is not supported",
        ),
    ];
    for (i, (name, damage, msg)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("bad{i}"));
        copy_dir(&good, &dir);
        damage(&dir);
        let before = count_running(&exe);
        for cmd in [&["image", "verify"][..], &["resume"][..]] {
            let mut args = cmd.to_vec();
            args.push(dir.to_str().unwrap());
            let o = umlctl(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(
                o.status.code(),
                Some(3),
                "{name}: {cmd:?} should exit 3, said: {err}"
            );
            assert!(
                err.contains(msg),
                "{name}: {cmd:?} error should mention {msg:?}: {err}"
            );
            assert_eq!(
                err.trim().lines().count(),
                1,
                "{name}: one-line error expected: {err}"
            );
        }
        assert_eq!(
            count_running(&exe),
            before,
            "{name}: a process was started from a corrupt image"
        );
    }
}

#[test]
fn impossible_targets_fail_clearly_and_stay_as_they_were() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let expect = |pid: i32, msg: &str| {
        let o = snapshot(pid, &dir, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "pid {pid}: {err}");
        assert!(err.contains(msg), "pid {pid}: expected {msg:?} in {err}");
        assert!(!dir.exists() && !tmp.path().join("img.partial").exists());
    };
    expect(i32::MAX - 7, "no process");
    expect(2, "kernel thread");
    let mut zombie = Command::new("true").spawn().unwrap();
    let zpid = zombie.id() as i32;
    while !fs::read_to_string(format!("/proc/{zpid}/stat"))
        .unwrap()
        .contains(") Z")
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    expect(zpid, "zombie");
    zombie.wait().unwrap();
    // Another tracer holds the target: refused, and the tracer keeps it.
    let out = tmp.path().join("out.txt");
    let child = workload(&["--mib", "4"], &out);
    let pid = child.id() as i32;
    nix::sys::ptrace::seize(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::ptrace::Options::empty(),
    )
    .unwrap();
    expect(pid, "already traced");
    // SAFETY: gettid has no preconditions; the tracer is this thread.
    let me = unsafe { libc::gettid() };
    assert_eq!(status_field(pid, "TracerPid"), me.to_string());
    // PTRACE_DETACH needs the tracee stopped.
    nix::sys::ptrace::interrupt(nix::unistd::Pid::from_raw(pid)).unwrap();
    nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::__WALL),
    )
    .unwrap();
    nix::sys::ptrace::detach(nix::unistd::Pid::from_raw(pid), None).unwrap();
    let len = fs::read_to_string(&out).unwrap().len();
    signal(pid, libc::SIGUSR1);
    wait_for(
        &out,
        |t| verified(&t[len..]).len() == 1,
        "the target still works",
    );
    kill_and_reap(child);
}

#[test]
fn unsupported_fd_is_refused_before_writing() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // inotify: a kernel object snapshots do not support.
    let py = "import ctypes, time\nfd = ctypes.CDLL(None).inotify_init()\nprint('ready', fd, flush=True)\ntime.sleep(60)\n";
    let out = tmp.path().join("out.txt");
    let child = spawn(Path::new("/usr/bin/python3"), &["-c", py], &out, None);
    wait_for(&out, |t| t.contains("ready"), "python ready");
    let pid = child.id() as i32;
    let dir = tmp.path().join("img");
    let o = snapshot(pid, &dir, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(
        err.contains("fd 3 (anon_inode:inotify)") && err.contains("close it"),
        "{err}"
    );
    assert!(!dir.exists() && !tmp.path().join("img.partial").exists());
    assert!(alive(pid) && status_field(pid, "TracerPid") == "0");
    kill_and_reap(child);
}

#[test]
fn files_and_deleted_files_come_back() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let keep = tmp.path().join("kept.txt");
    fs::write(&keep, "0123456789abcdef").unwrap();
    let gone = tmp.path().join("gone.txt");
    let py = format!(
        "import os, time\n\
         k = open('{k}', 'rb'); k.seek(10)\n\
         g = open('{g}', 'w+b'); g.write(b'secret contents'); g.flush(); os.unlink('{g}')\n\
         n = open('/dev/null', 'wb'); z = open('/dev/zero', 'rb')\n\
         print('ready', flush=True)\n\
         while not os.path.exists('{go}'): time.sleep(0.01)\n\
         g.seek(0)\n\
         print('kept', k.read(), 'gone', g.read(), 'zero', z.read(3), 'linked', os.fstat(g.fileno()).st_nlink, flush=True)\n\
         n.write(b'x'); n.flush()\n",
        k = keep.display(),
        g = gone.display(),
        go = tmp.path().join("go").display()
    );
    let out = tmp.path().join("out.txt");
    let child = spawn(Path::new("/usr/bin/python3"), &["-c", &py], &out, None);
    wait_for(&out, |t| t.contains("ready"), "python ready");
    let dir = tmp.path().join("img");
    ok(&snapshot(child.id() as i32, &dir, &["--kill"]));
    kill_and_reap(child);
    let inspect = umlctl(&["image", "inspect", dir.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("deleted-file"));
    let new = resume(&dir, &[]);
    fs::write(tmp.path().join("go"), "").unwrap();
    let text = wait_for(&out, |t| t.contains("kept"), "the resumed program's report");
    assert!(
        text.contains("kept b'abcdef' gone b'secret contents' zero b'\\x00\\x00\\x00' linked 0"),
        "{text}"
    );
    let t0 = Instant::now();
    while alive(new) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!gone.exists());
}

#[test]
fn sigkill_of_umlctl_mid_snapshot_leaves_target_running_and_no_image() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let child = workload(&["--mib", "768"], &out);
    let pid = child.id() as i32;
    let dir = tmp.path().join("img");
    let mut snap = Command::new(common::umlctl())
        .args(["snapshot", &pid.to_string(), "--out", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while status_field(pid, "TracerPid") == "0" {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the snapshot never attached"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(30));
    snap.kill().unwrap();
    snap.wait().unwrap();
    let t0 = Instant::now();
    while status_field(pid, "TracerPid") != "0" || tmp.path().join("img.partial").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "target still traced or partial image left"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !dir.exists(),
        "an image was published although umlctl was killed"
    );
    assert!(alive(pid));
    let len = fs::read_to_string(&out).unwrap().len();
    signal(pid, libc::SIGUSR1);
    wait_for(
        &out,
        |t| verified(&t[len..]).len() == 1,
        "the target still computes correctly",
    );
    kill_and_reap(child);
}

#[test]
fn image_files_are_private() {
    if !can_trace() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let child = workload(&["--mib", "2"], &out);
    let dir: PathBuf = tmp.path().join("img");
    ok(&snapshot(child.id() as i32, &dir, &[]));
    kill_and_reap(child);
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for f in ["manifest", "pages.img"] {
        assert_eq!(
            fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777,
            0o600,
            "{f}"
        );
    }
    let o = umlctl(&["--json", "image", "inspect", dir.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["processes"][0]["threads"].as_array().unwrap().len(), 1);
    // A reader that went away (`| head`) ends the output quietly: exit 0,
    // no panic.
    let mut c = Command::new(common::umlctl())
        .args(["image", "inspect", dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take());
    let o = c.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A second snapshot into the same directory is refused, the first kept.
    let sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let o = snapshot(sleeper.id() as i32, &dir, &[]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    ok(&umlctl(&["image", "verify", dir.to_str().unwrap()]));
    kill_and_reap(sleeper);
}
