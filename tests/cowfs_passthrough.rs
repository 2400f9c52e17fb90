//! `umlctl fs mount --passthrough`: read-only opens of unchanged base files
//! are read by the kernel straight from the base (the daemon sees none of
//! those reads), and every other open still behaves exactly.

#[path = "common/mod.rs"]
mod common;
#[path = "cowfs_support.rs"]
mod support;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use support::{ok, pattern, s, Mounted};

const MIB: usize = 1 << 20;

/// Bytes the process `pid` has read through read(2) and friends.
fn rchar(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .parse()
        .unwrap()
}

/// How many bytes the daemon reads while `f` is read whole, uncached.
fn daemon_reads_while_reading(pid: u32, path: &std::path::Path) -> (u64, Vec<u8>) {
    let before = rchar(pid);
    let mut data = Vec::new();
    File::open(path).unwrap().read_to_end(&mut data).unwrap();
    (rchar(pid) - before, data)
}

#[test]
fn unchanged_files_bypass_the_daemon_only_with_passthrough() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("big"), pattern(4 * MIB, 1)).unwrap();
    support::create(&store, &base, None);

    // The control: without passthrough the daemon reads every byte.
    let (m, pid) = Mounted::with(&store, &mnt, &[]);
    let (read, data) = daemon_reads_while_reading(pid, &m.path("big"));
    assert!(data == pattern(4 * MIB, 1));
    assert!(read >= 4 * MIB as u64, "daemon read {read} bytes");
    m.umount();

    let (m, pid) = Mounted::with(&store, &mnt, &["--passthrough"]);
    let (read, data) = daemon_reads_while_reading(pid, &m.path("big"));
    assert!(data == pattern(4 * MIB, 1));
    assert!(
        read < MIB as u64,
        "passthrough, yet the daemon read {read} bytes"
    );
    m.umount();
}

#[test]
fn writers_beside_passthrough_readers_are_exact_and_the_base_is_untouched() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    let original = pattern(MIB, 2);
    fs::write(base.join("f"), &original).unwrap();
    fs::write(base.join("g"), b"other file").unwrap();
    support::create(&store, &base, Some("4K"));
    let (m, _) = Mounted::with(&store, &mnt, &["--passthrough"]);

    // A reader in passthrough, then a writer of the same file: the kernel
    // refuses (EIO) a non-passthrough open beside a passthrough one.
    let reader = File::open(m.path("f")).unwrap();
    let writer = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    writer.write_all_at(b"HELLO", 4096).unwrap();
    let mut expect = original.clone();
    expect[4096..4101].copy_from_slice(b"HELLO");
    // Opens made now see the write.
    assert!(fs::read(m.path("f")).unwrap() == expect);
    // The passthrough reader keeps reading the base until closed (as a file
    // opened before its copy-up does on overlayfs).
    let mut head = vec![0u8; 8192];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert!(head == original[..8192]);
    drop((reader, writer));
    assert!(fs::read(m.path("f")).unwrap() == expect);

    // Several passthrough readers of one file share its backing file.
    let (a, b) = (
        File::open(m.path("g")).unwrap(),
        File::open(m.path("g")).unwrap(),
    );
    let mut buf = [0u8; 10];
    a.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"other file");
    b.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"other file");
    drop((a, b));

    // Checkpoint and rollback stay exact.
    ok(&["fs", "checkpoint", s(&store), "one"]);
    fs::write(m.path("f"), b"replaced").unwrap();
    fs::write(m.path("g"), b"changed").unwrap();
    ok(&["fs", "rollback", s(&store), "one"]);
    assert!(fs::read(m.path("f")).unwrap() == expect);
    assert_eq!(fs::read(m.path("g")).unwrap(), b"other file");
    m.umount();

    assert!(
        fs::read(base.join("f")).unwrap() == original,
        "base modified"
    );
    assert_eq!(fs::read(base.join("g")).unwrap(), b"other file");
    let fsck = ok(&["fs", "fsck", "--check", s(&store)]);
    assert!(fsck.contains("clean"), "{fsck}");
}
