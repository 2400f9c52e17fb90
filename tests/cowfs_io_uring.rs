//! FUSE over io_uring, the default transport where the kernel offers it
//! (`umlctl fs mount [--transport auto|io-uring]`): requests reach the
//! daemon through the kernel's per-CPU io_uring queues, each served by
//! threads pinned to its CPU, and the file system behaves exactly as over
//! /dev/fuse (`--transport dev-fuse`).

#[path = "common/mod.rs"]
mod common;
#[path = "cowfs_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use support::{ok, pattern, s, Mounted};

const MIB: usize = 1 << 20;

fn skip() -> bool {
    support::skip()
        || common::skip_unless(
            common::fuse_io_uring_on(),
            "FUSE over io_uring is off (tools/setup turns it on)",
        )
}

/// The daemon's threads: name -> (allowed CPUs, context switches). Both
/// kinds count: a thread that replies may be preempted by the caller it
/// woke, which then queues its next request before the thread sleeps (on
/// a busy machine, a /dev/fuse thread served 200 requests with no
/// voluntary switch).
fn threads(pid: u32) -> BTreeMap<String, (String, u64)> {
    let mut out = BTreeMap::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let (Ok(name), Ok(status)) = (
            fs::read_to_string(dir.join("comm")),
            fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .trim()
                .to_string()
        };
        let count = |key: &str| field(key).parse::<u64>().unwrap();
        let switches = count("voluntary_ctxt_switches:") + count("nonvoluntary_ctxt_switches:");
        out.insert(
            name.trim().to_string(),
            (field("Cpus_allowed_list:"), switches),
        );
    }
    out
}

fn pin_this_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; sched_setaffinity(0) touches
    // only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// Context switches of the ring threads of `cpu` and of the /dev/fuse ones.
fn wakeups(t: &BTreeMap<String, (String, u64)>, cpu: usize) -> (u64, u64) {
    let ring = format!("fuser-ring-{cpu}.");
    let sum = |pick: &dyn Fn(&str) -> bool| -> u64 {
        t.iter().filter(|(n, _)| pick(n)).map(|(_, (_, w))| w).sum()
    };
    (
        sum(&|n| n.starts_with(&ring)),
        sum(&|n| n.starts_with("fuser-") && !n.starts_with("fuser-ring")),
    )
}

#[test]
fn by_default_requests_are_served_by_ring_threads_pinned_to_the_callers_cpu() {
    if skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("file"), "base").unwrap();
    support::create(&store, &base, None);
    let (m, pid) = Mounted::with(&store, &mnt, &[]);
    let cpus = std::thread::available_parallelism().unwrap().get();
    // The daemon reports the mount only once every ring entry is
    // registered: the first requests already take the rings.
    let before = threads(pid);
    for cpu in 0..cpus {
        for k in 0..2 {
            let name = format!("fuser-ring-{cpu}.{k}");
            let (allowed, _) = before.get(&name).unwrap_or_else(|| {
                panic!("no thread {name} in the daemon: {before:?}");
            });
            assert_eq!(allowed, &cpu.to_string(), "{name} is not pinned");
        }
    }
    // Listing xattrs is never cached by the kernel: each call is a request.
    let path = m.path("file");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            pin_this_thread(0);
            let before = threads(pid);
            for _ in 0..500 {
                xattr_names(&path);
            }
            let after = threads(pid);
            let (ring0, dev0) = wakeups(&before, 0);
            let (ring1, dev1) = wakeups(&after, 0);
            // At least one wakeup per two requests: a thread that finds
            // the next request already there when it commits does not sleep.
            assert!(
                ring1 - ring0 >= 250,
                "500 requests from CPU 0 woke CPU 0's ring threads {} times",
                ring1 - ring0
            );
            assert!(
                dev1 - dev0 < 50,
                "the /dev/fuse threads served requests: {} wakeups",
                dev1 - dev0
            );
        });
    });
    m.umount();
}

#[test]
fn ring_threads_sets_the_threads_of_each_cpu() {
    if skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("file"), pattern(3 * MIB, 4)).unwrap();
    support::create(&store, &base, None);
    let (m, pid) = Mounted::with(&store, &mnt, &["--ring-threads", "1"]);
    let t = threads(pid);
    let rings: std::collections::BTreeSet<String> = t
        .keys()
        .filter(|n| n.starts_with("fuser-ring-"))
        .cloned()
        .collect();
    let cpus = std::thread::available_parallelism().unwrap().get();
    let want = (0..cpus).map(|c| format!("fuser-ring-{c}.0")).collect();
    assert_eq!(rings, want, "{t:?}");
    // One thread per CPU still serves big requests and several callers.
    std::thread::scope(|scope| {
        for k in 0..4u8 {
            let path = m.path(&format!("new{k}"));
            scope.spawn(move || {
                fs::write(&path, pattern(2 * MIB, k.into())).unwrap();
                assert!(fs::read(&path).unwrap() == pattern(2 * MIB, k.into()));
            });
        }
    });
    assert!(fs::read(m.path("file")).unwrap() == pattern(3 * MIB, 4));
    m.umount();
}

#[test]
fn the_dev_fuse_transport_starts_no_ring_and_serves_the_same() {
    if skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("file"), "base").unwrap();
    support::create(&store, &base, None);
    let (m, pid) = Mounted::with(&store, &mnt, &["--transport", "dev-fuse"]);
    let before = threads(pid);
    assert!(
        !before.keys().any(|n| n.starts_with("fuser-ring")),
        "ring threads in a /dev/fuse mount: {before:?}"
    );
    for _ in 0..200 {
        xattr_names(&m.path("file"));
    }
    let (_, dev0) = wakeups(&before, 0);
    let (_, dev1) = wakeups(&threads(pid), 0);
    assert!(
        dev1 - dev0 >= 100,
        "200 requests woke the /dev/fuse threads {} times",
        dev1 - dev0
    );
    fs::write(m.path("file"), "changed").unwrap();
    assert_eq!(fs::read_to_string(m.path("file")).unwrap(), "changed");
    m.umount();
}

fn xattr_names(path: &std::path::Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: a valid C string and a buffer of the size given.
    let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "listxattr: {}", std::io::Error::last_os_error());
}

#[test]
fn big_writes_reads_and_rollback_are_exact_through_the_rings() {
    if skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("big"), pattern(8 * MIB, 1)).unwrap();
    support::create(&store, &base, None);
    let (m, pid) = Mounted::with(&store, &mnt, &["--io-uring"]);
    ok(&["fs", "checkpoint", s(&store), "before"]);
    // Writes of the largest size a request carries, unaligned, and sync.
    let f = OpenOptions::new().write(true).open(m.path("big")).unwrap();
    let mut want = pattern(8 * MIB, 1);
    let new = pattern(3 * MIB + 123, 2);
    f.write_all_at(&new, 1000).unwrap();
    want[1000..1000 + new.len()].copy_from_slice(&new);
    f.sync_all().unwrap();
    drop(f);
    fs::write(m.path("new"), pattern(2 * MIB, 3)).unwrap();
    assert!(fs::read(m.path("big")).unwrap() == want);
    ok(&["fs", "rollback", s(&store), "before"]);
    assert!(fs::read(m.path("big")).unwrap() == pattern(8 * MIB, 1));
    assert!(!m.path("new").exists());
    m.umount();
    // Unmounting ends the daemon, ring threads and all.
    support::wait_dead(pid);
}
