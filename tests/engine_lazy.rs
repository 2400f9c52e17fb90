//! Lazy resume through the real binary: the process runs before its memory
//! is in, and what it does meanwhile (MADV_DONTNEED, mremap, fork, early
//! exit) must see exactly what an eager resume would.

#[path = "common/mod.rs"]
mod common;
#[path = "engine_support.rs"]
mod engine_support;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> bool {
    !common::skip_unless(
        common::is_root(),
        "lazy resume tests need root (ptrace, userfaultfd of another process)",
    )
}

fn umlctl(args: &[&str]) -> Output {
    Command::new(common::umlctl())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run umlctl")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "umlctl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn spawn(prog: &Path, args: &[&str], out: &Path) -> std::process::Child {
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
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn wait_for(path: &Path, pred: impl Fn(&str) -> bool, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pagers_for(pid: i32) -> usize {
    pager_pids(pid).len()
}

fn pager_pids(pid: i32) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.get(1) == Some(&&b"__pager"[..])
                && args.get(3) == Some(&pid.to_string().as_bytes())
        })
        .collect()
}

/// The CPUs a thread may run on (`Cpus_allowed_list`).
fn cpus_allowed(pid: i32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list"));
    line.unwrap().split_whitespace().last().unwrap().to_string()
}

const CHECKER: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
static unsigned long pat(size_t i) { return i * 0x9E3779B97F4A7C15ul ^ 0x1234; }
static int check(unsigned long *a, size_t from, size_t to, size_t base) {
    int bad = 0;
    for (size_t i = from; i < to; i++) bad += a[i] != pat(base + i);
    return bad;
}
int main(int argc, char **argv) {
    size_t n = (size_t)atoi(argv[1]) << 20, w = n / 8, q = n / 4, qw = q / 8;
    unsigned long *a = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (size_t i = 0; i < w; i++) a[i] = pat(i);
    printf("ready\n");
    fflush(stdout);
    while (access(argv[2], F_OK) != 0) usleep(1000);
    if (argc > 3) { printf("exiting early\n"); return 0; }
    /* MADV_DONTNEED'd memory reads as zeros, never the snapshot's bytes. */
    madvise((char *)a + q, q, MADV_DONTNEED);
    int zero = 0;
    for (size_t i = qw; i < 2 * qw; i++) zero += a[i] != 0;
    /* mremap'd memory keeps its contents at its new address. */
    void *dst = mmap(0, q, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned long *m = mremap((char *)a + 2 * q, q, q, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
    int remap = check(m, 0, qw, 2 * qw);
    /* A child forked now sees the whole image too. */
    pid_t c = fork();
    if (c == 0) _exit(check(a, 0, qw, 0) + check(a, 3 * qw, w, 0) + check(m, 0, qw, 2 * qw) ? 1 : 0);
    int st = 0;
    waitpid(c, &st, 0);
    int parent = check(a, 0, qw, 0) + check(a, 3 * qw, w, 0);
    printf("zero %d remap %d child %d parent %d\n", zero, remap, WEXITSTATUS(st), parent);
    return 0;
}
"#;

fn checker(tmp: &Path) -> PathBuf {
    let src = tmp.join("checker.c");
    fs::write(&src, CHECKER).unwrap();
    let bin = tmp.join("checker");
    assert!(Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap()
        .success());
    bin
}

/// Snapshots the checker while it waits, resumes it (`mode` flags), lets it
/// go and returns its report line.
fn run_checker(extra: &[&str], early: bool) -> (String, i32) {
    let tmp = tempfile::tempdir().unwrap();
    let bin = checker(tmp.path());
    let out = tmp.path().join("out.txt");
    let go = tmp.path().join("go");
    let mut args = vec!["256", go.to_str().unwrap()];
    if early {
        args.push("early");
    }
    let mut child = spawn(&bin, &args, &out);
    wait_for(&out, |t| t.contains("ready"), "checker ready");
    let dir = tmp.path().join("img");
    ok(&umlctl(&[
        "snapshot",
        &child.id().to_string(),
        "--out",
        dir.to_str().unwrap(),
        "--kill",
    ]));
    let _ = child.wait();
    fs::write(&go, "").unwrap();
    let mut a = vec!["resume", dir.to_str().unwrap()];
    a.extend_from_slice(extra);
    let pid: i32 = ok(&umlctl(&a)).trim().parse().unwrap();
    let text = wait_for(
        &out,
        |t| t.contains("zero ") || t.contains("exiting"),
        "the checker's report",
    );
    let t0 = Instant::now();
    while pagers_for(pid) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the pager of {pid} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (text.lines().last().unwrap().to_string(), pid)
}

#[test]
fn dontneed_mremap_and_fork_after_lazy_resume() {
    if !root() {
        return;
    }
    let (line, _) = run_checker(&["--lazy"], false);
    assert_eq!(line, "zero 0 remap 0 child 0 parent 0");
}

#[test]
fn eager_resume_gives_the_same_report() {
    if !root() {
        return;
    }
    let (line, _) = run_checker(&[], false);
    assert_eq!(line, "zero 0 remap 0 child 0 parent 0");
}

#[test]
fn pager_exits_when_the_process_exits_early() {
    if !root() {
        return;
    }
    let (line, _) = run_checker(&["--lazy"], true);
    assert_eq!(line, "exiting early");
}

fn verified(text: &str) -> usize {
    assert!(!text.contains("BAD"), "memory check failed:\n{text}");
    text.lines()
        .filter(|l| l.starts_with("verify") && l.ends_with(" ok"))
        .count()
}

#[test]
fn ten_concurrent_lazy_clones_compute_correctly() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let mut child = spawn(
        &common::tool("workload"),
        &["--mib", "64", "--threads", "2"],
        &out,
    );
    wait_for(&out, |t| t.contains("ready"), "workload ready");
    let dir = tmp.path().join("img");
    ok(&umlctl(&[
        "snapshot",
        &child.id().to_string(),
        "--out",
        dir.to_str().unwrap(),
        "--kill",
    ]));
    let _ = child.wait();
    let d = dir.to_str().unwrap().to_string();
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let d = d.clone();
            std::thread::spawn(move || {
                ok(&umlctl(&["resume", "--lazy", &d]))
                    .trim()
                    .parse::<i32>()
                    .unwrap()
            })
        })
        .collect();
    let pids: Vec<i32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let len = fs::read_to_string(&out).unwrap().len();
    for &p in &pids {
        // SAFETY: signalling our clones.
        unsafe { libc::kill(p, libc::SIGUSR1) };
    }
    wait_for(
        &out,
        |t| verified(&t[len..]) == 20,
        "20 verifications (10 clones x 2 threads)",
    );
    for &p in &pids {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

#[test]
fn lazy_resume_refuses_a_corrupt_image_up_front_or_kills_rather_than_lie() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let mut child = spawn(&common::tool("workload"), &["--mib", "32"], &out);
    wait_for(&out, |t| t.contains("ready"), "workload ready");
    let dir = tmp.path().join("img");
    ok(&umlctl(&[
        "snapshot",
        &child.id().to_string(),
        "--out",
        dir.to_str().unwrap(),
        "--kill",
    ]));
    let _ = child.wait();
    // Truncation and manifest damage are refused before anything runs.
    let pages = dir.join("pages.img");
    let data = fs::read(&pages).unwrap();
    fs::write(&pages, &data[..data.len() - 4096]).unwrap();
    let o = umlctl(&["resume", "--lazy", dir.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A flipped byte in the memory is found when its chunk is first read:
    // the process is killed, never run on wrong memory.
    let mut bad = data.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    fs::write(&pages, &bad).unwrap();
    let o = umlctl(&["resume", "--lazy", dir.to_str().unwrap()]);
    let pid: i32 = ok(&o).trim().parse().unwrap();
    let t0 = Instant::now();
    while fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the process fed a corrupt image still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A lazy snapshot of a process that writes memory all the time is one
/// instant: resumed, its memory matches its counters word for word (a torn
/// image, pages from different moments, fails that check). The original
/// runs on unharmed, and its longest stall is reported.
#[test]
fn lazy_snapshot_under_continuous_writes_is_one_instant() {
    if !root() {
        return;
    }
    // Large memory (the copy takes long), and small memory with several
    // writers (each page is written again within milliseconds).
    lazy_instant(&[
        "--mib",
        "256",
        "--threads",
        "3",
        "--sleep-every",
        "1000000",
        "--stall",
    ]);
    for _ in 0..3 {
        lazy_instant(&[
            "--mib",
            "12",
            "--threads",
            "3",
            "--sleep-every",
            "1000000",
            "--stall",
        ]);
    }
}

/// Pages that appear (first touched) and go (MADV_DONTNEED) while lazy
/// snapshots are taken: the walk before the freeze must not stand in for
/// the page tables at the freeze. Each copy finds exactly the pages its
/// churning thread had populated at the instant saved.
#[test]
fn lazy_snapshots_while_pages_appear_and_go() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let args = ["--mib", "8", "--sleep-every", "1000000", "--churn", "32"];
    let child = spawn(&common::tool("workload"), &args, &out);
    let pid = child.id() as i32;
    let _reaper = engine_support::Reaper::child(child);
    wait_for(&out, |t| t.contains("ready"), "workload ready");
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(7 * i));
        let dir = tmp.path().join(format!("img{i}"));
        let d = dir.to_str().unwrap();
        ok(&umlctl(&[
            "snapshot",
            &pid.to_string(),
            "--out",
            d,
            "--lazy",
        ]));
        let len = fs::read_to_string(&out).unwrap().len();
        let new: i32 = ok(&umlctl(&["resume", d, "--lazy", "--stdio", "null"]))
            .trim()
            .parse()
            .unwrap();
        let _copy = engine_support::Reaper::pids(vec![new]);
        // The resumer pins itself and its puppets to one CPU while it
        // builds: neither the copy nor its pager may keep that.
        let ours = cpus_allowed(std::process::id() as i32);
        for p in std::iter::once(new).chain(pager_pids(new)) {
            assert_eq!(cpus_allowed(p), ours, "CPUs of {p}");
        }
        // SAFETY: signalling our copy.
        unsafe { libc::kill(new, libc::SIGUSR1) };
        // `verified` fails on any BAD line, the churning thread's too.
        wait_for(
            &out,
            |t| verified(&t[len..]) == 1 && t[len..].contains("churn round="),
            "the resumed copy's check",
        );
    }
}

fn lazy_instant(base: &[&str]) {
    let threads: usize = base[3].parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let mut args = base.to_vec();
    if std::arch::is_x86_feature_detected!("avx512f") {
        args.push("--avx512");
    }
    let mut child = spawn(&common::tool("workload"), &args, &out);
    wait_for(&out, |t| t.contains("ready"), "workload ready");
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id() as i32;
    let dir = tmp.path().join("img");
    let o = umlctl(&[
        "--json",
        "snapshot",
        &pid.to_string(),
        "--out",
        dir.to_str().unwrap(),
        "--lazy",
    ]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["lazy"], true, "{v}");
    assert!(
        v["write_faults"].as_u64().unwrap() > 0,
        "the target wrote during the copy: {v}"
    );
    // The original carries on correctly.
    let len = fs::read_to_string(&out).unwrap().len();
    // SAFETY: signalling our child.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let text = wait_for(
        &out,
        |t| verified(&t[len..]) == threads && t[len..].contains("stall"),
        "the original's check",
    );
    assert!(!text.contains("zmm BAD"));
    let _ = child.kill();
    let _ = child.wait();
    // The copy is the instant of the freeze.
    let len = fs::read_to_string(&out).unwrap().len();
    let new: i32 = ok(&umlctl(&[
        "resume",
        dir.to_str().unwrap(),
        "--stdio",
        "null",
    ]))
    .trim()
    .parse()
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: signalling our copy.
    unsafe { libc::kill(new, libc::SIGUSR1) };
    // Its fd 1 is the same file (reopened at its offset), so it appends there.
    wait_for(
        &out,
        |t| verified(&t[len..]) == threads,
        "the resumed copy's check",
    );
    // SAFETY: as above.
    unsafe { libc::kill(new, libc::SIGKILL) };
}

/// Incremental snapshots of a process that writes all the time (two
/// writers without pause, and pages that appear and go): the pages written
/// before the freeze are read while it runs, and those written again are
/// read at the freeze; every copy of the chain must be the exact instant.
#[test]
fn incremental_snapshots_of_a_busy_writer_are_exact() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let args = [
        "--mib",
        "64",
        "--threads",
        "2",
        "--sleep-every",
        "1000000",
        "--churn",
        "16",
    ];
    let child = spawn(&common::tool("workload"), &args, &out);
    let pid = child.id().to_string();
    let _reaper = engine_support::Reaper::child(child);
    wait_for(&out, |t| t.contains("ready"), "workload ready");
    let dir = |n: usize| tmp.path().join(n.to_string()).to_str().unwrap().to_string();
    ok(&umlctl(&["snapshot", &pid, "--out", &dir(0), "--track"]));
    for n in 1..=4 {
        std::thread::sleep(Duration::from_millis(30 * n as u64));
        let parent = dir(n - 1);
        ok(&umlctl(&[
            "snapshot",
            &pid,
            "--out",
            &dir(n),
            "--parent",
            &parent,
        ]));
        if n % 2 == 1 {
            continue;
        }
        let new: i32 = ok(&umlctl(&["resume", &dir(n), "--stdio", "null"]))
            .trim()
            .parse()
            .unwrap();
        let _copy = engine_support::Reaper::pids(vec![new]);
        let len = fs::read_to_string(&out).unwrap().len();
        // SAFETY: signalling our copy.
        unsafe { libc::kill(new, libc::SIGUSR1) };
        wait_for(
            &out,
            |t| verified(&t[len..]) == 2 && t[len..].contains("churn round="),
            "the resumed copy's check",
        );
    }
}

/// Incremental snapshots: a tracked snapshot, then two more each holding
/// only what was written since its parent; the third resumes (reading
/// through the chain) with its memory exact, and flattens into a
/// standalone image that resumes too.
#[test]
fn three_deep_incremental_chain_resumes_and_flattens() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.txt");
    let mut child = spawn(
        &common::tool("workload"),
        &["--mib", "128", "--sleep-every", "2000"],
        &out,
    );
    let _reaper = engine_support::Reaper::pids(vec![child.id() as i32]);
    wait_for(&out, |t| t.contains("ready"), "workload ready");
    let pid = child.id().to_string();
    let dir = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    ok(&umlctl(&["snapshot", &pid, "--out", &dir("a"), "--track"]));
    // Tracked memory cannot also be protected for a lazy snapshot: refused
    // clearly, before anything is written, and the process runs on.
    let o = umlctl(&["snapshot", &pid, "--out", &dir("l"), "--lazy"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("write-tracked"), "{err}");
    assert!(!tmp.path().join("l").exists());
    std::thread::sleep(Duration::from_millis(200));
    ok(&umlctl(&[
        "snapshot",
        &pid,
        "--out",
        &dir("b"),
        "--parent",
        &dir("a"),
    ]));
    // Only the latest tracked snapshot can be a parent.
    let o = umlctl(&["snapshot", &pid, "--out", &dir("x"), "--parent", &dir("a")]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::thread::sleep(Duration::from_millis(200));
    ok(&umlctl(&[
        "snapshot",
        &pid,
        "--out",
        &dir("c"),
        "--parent",
        &dir("b"),
        "--kill",
    ]));
    let _ = child.wait();
    let size = |n: &str| {
        fs::metadata(tmp.path().join(n).join("pages.img"))
            .unwrap()
            .len()
    };
    assert!(
        size("c") * 4 < size("a"),
        "c holds {} bytes, a {}",
        size("c"),
        size("a")
    );
    let inspect = ok(&umlctl(&["--json", "image", "inspect", &dir("c")]));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["parent"], dir("b"));
    ok(&umlctl(&["image", "verify", &dir("c")]));
    ok(&umlctl(&[
        "image",
        "flatten",
        &dir("c"),
        "--out",
        &dir("flat"),
    ]));
    // Through the chain eagerly and lazily (the pager reads each page from
    // the image that holds it), and flattened.
    let cases = [
        (dir("c"), None),
        (dir("c"), Some("--lazy")),
        (dir("flat"), Some("--lazy")),
    ];
    for (image, extra) in cases {
        let mut args = vec!["resume", image.as_str(), "--stdio", "null"];
        args.extend(extra);
        let new: i32 = ok(&umlctl(&args)).trim().parse().unwrap();
        let len = fs::read_to_string(&out).unwrap().len();
        // SAFETY: signalling our copy.
        unsafe { libc::kill(new, libc::SIGUSR1) };
        wait_for(
            &out,
            |t| verified(&t[len..]) == 1,
            "the resumed copy's check",
        );
        // SAFETY: as above.
        unsafe { libc::kill(new, libc::SIGKILL) };
    }
    // A parent that changed is refused.
    let m = tmp.path().join("b").join("manifest");
    let mut b = fs::read(&m).unwrap();
    let n = b.len();
    b[n - 2] ^= 1;
    fs::write(&m, b).unwrap();
    let o = umlctl(&["resume", &dir("c")]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
