//! Process trees through the real `umlctl`: `snapshot --tree`, resume of
//! parents, children and the pipes between them, and `--pid-ns new`.

#[path = "common/mod.rs"]
mod common;
#[path = "engine_support.rs"]
mod support;

use std::fs;
use std::path::Path;
use support::*;

/// Writes 0..N as fixed-width lines, faster than the consumer reads.
const PRODUCER: &str = r#"
import sys
out = sys.stdout.buffer
for i in range(200000):
    out.write(b"%08d\n" % i)
    if i % 500 == 0:
        out.flush()
out.flush()
"#;

/// Checks every line is the next number: a lost or repeated byte shows.
/// Each report is one write(2): the copies and the original append to one
/// file at once, and print() writes its pieces one by one.
const CONSUMER: &str = r#"
import os, sys, time
def say(text):
    os.write(1, (text + "\n").encode())
n = 0
for line in sys.stdin.buffer:
    if line != b"%08d\n" % n:
        say("BAD at %d %r" % (n, line))
        sys.exit(1)
    n += 1
    if n % 2000 == 0:
        time.sleep(0.005)
    if n == 30000:
        say("started")
say("done %d ok" % n)
"#;

fn pipeline(dir: &Path) -> (std::process::Child, std::path::PathBuf) {
    fs::write(dir.join("prod.py"), PRODUCER).unwrap();
    fs::write(dir.join("cons.py"), CONSUMER).unwrap();
    let out = dir.join("out.txt");
    let child = spawn_sh("python3 prod.py | python3 cons.py", dir, &out);
    wait_for(&out, |t| t.contains("started"), "the consumer to start");
    (child, out)
}

#[test]
fn producer_consumer_tree_loses_and_duplicates_no_byte() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (child, out) = pipeline(tmp.path());
    let img = tmp.path().join("img");
    let text = ok(&snapshot(child.id() as i32, &img, &["--tree", "--kill"]));
    assert!(text.contains("3 processes"), "{text}");
    kill_child(child);
    let before = fs::read_to_string(&out).unwrap();
    assert!(
        !before.contains("done"),
        "the snapshot came too late: {before}"
    );
    assert_eq!(image_pids(&img).len(), 3);
    let pids = resume(&img, &[]);
    let _reaper = Reaper::pids(pids.clone());
    assert_eq!(pids.len(), 3);
    // The children are the resumed shell's children again, in its process
    // group (it leads its session and group, as it did).
    let stat = |pid: i32, field: usize| -> i32 {
        let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        rest[field - 3].parse().unwrap()
    };
    assert_eq!((stat(pids[0], 5), stat(pids[0], 6)), (pids[0], pids[0]));
    for &c in &pids[1..] {
        assert_eq!(status_field(c, "PPid"), pids[0].to_string());
        assert_eq!((stat(c, 5), stat(c, 6)), (pids[0], pids[0]));
    }
    let text = wait_for(&out, |t| t.contains("done") || t.contains("BAD"), "the end");
    assert!(text.contains("done 200000 ok"), "{text}");
    wait_gone(pids[0], "the resumed shell");
    // Lazily, once more: one pager per process, and the same end.
    let pids = resume(&img, &["--lazy"]);
    let _reaper = Reaper::pids(pids.clone());
    assert_eq!(pids.len(), 3);
    let text = wait_for(
        &out,
        |t| t.matches("done").count() == 2 || t.contains("BAD"),
        "the end of the lazy resume",
    );
    assert_eq!(text.matches("done 200000 ok").count(), 2, "{text}");
    wait_gone(pids[0], "the lazily resumed shell");
}

#[test]
fn tree_resumed_twice_in_new_pid_namespaces_runs_as_two_copies() {
    if !can_trace() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (child, out) = pipeline(tmp.path());
    let img = tmp.path().join("img");
    // Lazily: each process of the tree is copied while all of them run.
    ok(&snapshot(child.id() as i32, &img, &["--tree", "--lazy"]));
    let original = image_pids(&img);
    // Both copies and the original run at once; the original's pids are taken.
    let out_a = tmp.path().join("a.txt");
    let out_b = tmp.path().join("b.txt");
    let (ia, ib) = (img.clone(), img.clone());
    let (pa, pb) = (out_a.clone(), out_b.clone());
    let a = std::thread::spawn(move || {
        resume(&ia, &["--pid-ns", "new", "--stdio", pa.to_str().unwrap()])
    });
    let b = std::thread::spawn(move || {
        resume(&ib, &["--pid-ns", "new", "--stdio", pb.to_str().unwrap()])
    });
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    let _reaper = Reaper::pids(a.iter().chain(&b).copied().collect());
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    let inner = |pid: i32| {
        status_field(pid, "NSpid")
            .split_whitespace()
            .last()
            .unwrap()
            .parse::<i32>()
            .unwrap()
    };
    let root_orig = child.id() as i32;
    for pids in [&a, &b] {
        assert_ne!(pids[0], root_orig);
        assert_eq!(inner(pids[0]), root_orig, "root keeps its pid inside");
        assert_eq!(
            status_field(pids[0], "NSpid").split_whitespace().count(),
            2,
            "a namespace of its own"
        );
    }
    let mut o = original.clone();
    o.sort();
    let mut ib: Vec<i32> = b.iter().map(|&p| inner(p)).collect();
    let mut ia: Vec<i32> = a.iter().map(|&p| inner(p)).collect();
    ia.sort();
    ib.sort();
    assert_eq!(ia, ib, "same pids inside both namespaces");
    assert_eq!(ia, o, "the original pids");
    // The copies' consumers report to the out file of the original (it is a
    // regular file, reopened): all three finish, each with every byte.
    let text = wait_for(
        &out,
        |t| t.matches("done").count() + t.matches("BAD").count() >= 3,
        "the original and both copies to finish",
    );
    assert_eq!(text.matches("done 200000 ok").count(), 3, "{text}");
    kill_child(child);
}
