//! cowfs end to end through `umlctl fs`: block copy-up, checkpoint and
//! rollback exactness (mounted, offline, with files open), the base never
//! modified, two stores over one base, file data semantics against ext4,
//! and refusals of bad input.

#[path = "common/mod.rs"]
mod common;
#[path = "cowfs_support.rs"]
mod support;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use support::{hash, ok, pattern, s, snapshot, stored_bytes, umlctl, Mounted};

const MIB: u64 = 1 << 20;

fn file_hash(p: &Path) -> u64 {
    let mut data = Vec::new();
    File::open(p).unwrap().read_to_end(&mut data).unwrap();
    hash(&data)
}

#[test]
fn block_copy_up_stores_about_one_block() {
    if support::skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    fs::create_dir(&base).unwrap();
    // A 1 GiB disk image: sparse, with real data around the write.
    let img = base.join("disk.img");
    let f = File::create(&img).unwrap();
    f.set_len(1 << 30).unwrap();
    let around = pattern(256 * 1024, 1);
    f.write_all_at(&around, 512 * MIB - 128 * 1024).unwrap();
    drop(f);
    let base_before = file_hash(&img);

    let store = t.path().join("store");
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &t.path().join("mnt"));
    let before = stored_bytes(&store);
    let off = 512 * MIB - 64 * 1024 + 1000; // inside one 64 KiB block
    let data = pattern(4096, 2);
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("disk.img"))
        .unwrap();
    f.write_all_at(&data, off).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let added = stored_bytes(&store) - before;
    assert!(
        added <= 64 * 1024 + 16 * 1024,
        "a 4 KiB write into a 1 GiB file stored {added} bytes, more than one 64 KiB block"
    );

    // The merged content: base bytes around, the write in the middle.
    let mut expect = around.clone();
    let at = (off - (512 * MIB - 128 * 1024)) as usize;
    expect[at..at + 4096].copy_from_slice(&data);
    let check = |p: &Path| {
        let mut got = vec![0u8; around.len()];
        File::open(p)
            .unwrap()
            .read_exact_at(&mut got, 512 * MIB - 128 * 1024)
            .unwrap();
        assert!(got == expect, "merged bytes differ from base + write");
        assert_eq!(fs::metadata(p).unwrap().len(), 1 << 30);
    };
    check(&m.path("disk.img"));
    m.umount();
    let m = Mounted::new(&store, &t.path().join("mnt"));
    check(&m.path("disk.img"));
    drop(m);
    assert_eq!(file_hash(&img), base_before, "the base file was modified");
}

/// A base tree with files, a directory, a symlink and a hard link pair.
fn make_base(base: &Path) {
    fs::create_dir_all(base.join("etc/conf.d")).unwrap();
    fs::write(base.join("etc/app.conf"), "version=1\n").unwrap();
    fs::write(base.join("etc/conf.d/a"), pattern(200_000, 3)).unwrap();
    fs::write(base.join("data.bin"), pattern(300_000, 4)).unwrap();
    std::os::unix::fs::symlink("etc/app.conf", base.join("conf")).unwrap();
    fs::hard_link(base.join("data.bin"), base.join("data.link")).unwrap();
    fs::create_dir(base.join("empty")).unwrap();
}

/// Many kinds of change, applied to a mounted view.
fn mutate(root: &Path, round: u64) {
    fs::write(root.join("etc/app.conf"), format!("version={round}\n")).unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(root.join("data.bin"))
        .unwrap();
    f.write_all_at(&pattern(5000, round), 70_000).unwrap();
    f.set_len(150_000 + round).unwrap();
    drop(f);
    OpenOptions::new()
        .append(true)
        .open(root.join("data.link"))
        .unwrap()
        .write_all(b"appended")
        .unwrap();
    fs::create_dir_all(root.join(format!("new{round}/deep"))).unwrap();
    fs::write(
        root.join(format!("new{round}/deep/f")),
        pattern(1000, round),
    )
    .unwrap();
    if root.join("etc/conf.d").exists() {
        fs::rename(root.join("etc/conf.d"), root.join(format!("conf{round}.d"))).unwrap();
        fs::remove_file(root.join("conf")).unwrap();
    }
    std::os::unix::fs::symlink("data.bin", root.join(format!("sym{round}"))).unwrap();
    fs::hard_link(root.join("data.link"), root.join(format!("hl{round}"))).unwrap();
    fs::set_permissions(root.join("data.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    support::set_xattr(
        &root.join("data.bin"),
        "user.round",
        round.to_string().as_bytes(),
    );
    fs::remove_dir_all(root.join("empty")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    fs::write(root.join("empty/x"), round.to_string()).unwrap();
}

#[test]
fn checkpoint_write_rollback_is_exact() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    make_base(&base);
    let base_before = snapshot(&base);
    support::create(&store, &base, Some("4K"));
    let m = Mounted::new(&store, &mnt);
    fs::write(m.path("before.txt"), "made before the checkpoint").unwrap();
    let snap0 = snapshot(&mnt);
    ok(&["fs", "checkpoint", s(&store), "c1"]);
    mutate(&mnt, 1);
    let snap1 = snapshot(&mnt);
    assert_ne!(snap0, snap1);
    ok(&["fs", "checkpoint", s(&store), "c2"]);
    mutate(&mnt, 2);
    let diff = ok(&["fs", "diff", s(&store), "c1", "c2"]);
    assert!(
        diff.contains("M /data.bin") && diff.contains("A /new1"),
        "diff: {diff}"
    );

    ok(&["fs", "rollback", s(&store), "c2"]);
    assert_eq!(snapshot(&mnt), snap1, "rollback to c2 is not exact");
    ok(&["fs", "rollback", s(&store), "c1"]);
    assert_eq!(snapshot(&mnt), snap0, "rollback to c1 is not exact");
    let list = ok(&["--json", "fs", "list", s(&store)]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["c1"],
        "a checkpoint after the rollback target survived"
    );
    assert_eq!(ok(&["fs", "diff", s(&store), "c1"]).trim(), "");

    // Offline: change, unmount, roll back without a daemon, remount.
    mutate(&mnt, 3);
    m.umount();
    ok(&["fs", "rollback", s(&store), "c1"]);
    let m = Mounted::new(&store, &mnt);
    assert_eq!(snapshot(&mnt), snap0, "offline rollback is not exact");
    mutate(&mnt, 4);
    let snap4 = snapshot(&mnt);
    m.umount();
    let m = Mounted::new(&store, &mnt);
    assert_eq!(snapshot(&mnt), snap4, "state changed across remount");
    drop(m);
    assert_eq!(snapshot(&base), base_before, "the base was modified");
    let fsck = ok(&["fs", "fsck", s(&store)]);
    assert!(
        fsck.contains("clean") || fsck.contains("trash"),
        "fsck: {fsck}"
    );
}

#[test]
fn rollback_with_files_open() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("f"), pattern(100_000, 7)).unwrap();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    let fd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("f"))
        .unwrap();
    ok(&["fs", "checkpoint", s(&store), "c"]);
    fd.write_all_at(&pattern(100_000, 8), 0).unwrap();
    fd.sync_all().unwrap();
    let mut later = File::create(m.path("later")).unwrap();
    later.write_all(b"created after the checkpoint").unwrap();
    let cwd_dir = m.path("dir-after");
    fs::create_dir(&cwd_dir).unwrap();

    ok(&["fs", "rollback", s(&store), "c"]);
    let mut got = vec![0u8; 100_000];
    fd.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == pattern(100_000, 7),
        "an open fd sees pre-rollback data"
    );
    assert_eq!(fs::read(m.path("f")).unwrap(), pattern(100_000, 7));
    assert!(!m.path("later").exists() && !cwd_dir.exists());
    assert!(later.flush().is_ok());
    // The fd of a file that no longer exists fails cleanly.
    assert!(File::open(m.path("later")).is_err());
    let _ = later.write_all_at(&[0u8; 8], 0);
    // The old fd keeps working on the rolled-back view.
    fd.write_all_at(b"after", 0).unwrap();
    fd.sync_all().unwrap();
    assert_eq!(&fs::read(m.path("f")).unwrap()[..5], b"after");
    drop((fd, later));
    m.umount();
}

#[test]
fn two_stores_share_one_base() {
    if support::skip() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let base = t.path().join("base");
    make_base(&base);
    let base_before = snapshot(&base);
    let (s1, s2) = (t.path().join("s1"), t.path().join("s2"));
    support::create(&s1, &base, None);
    support::create(&s2, &base, None);
    let m1 = Mounted::new(&s1, &t.path().join("m1"));
    let m2 = Mounted::new(&s2, &t.path().join("m2"));
    fs::write(m1.path("etc/app.conf"), "one").unwrap();
    fs::write(m2.path("etc/app.conf"), "two").unwrap();
    fs::remove_file(m2.path("data.bin")).unwrap();
    assert_eq!(fs::read_to_string(m1.path("etc/app.conf")).unwrap(), "one");
    assert_eq!(fs::read_to_string(m2.path("etc/app.conf")).unwrap(), "two");
    assert!(m1.path("data.bin").exists() && !m2.path("data.bin").exists());
    ok(&["fs", "checkpoint", s(&s1), "x"]);
    fs::write(m1.path("etc/app.conf"), "one-later").unwrap();
    ok(&["fs", "rollback", s(&s1), "x"]);
    assert_eq!(fs::read_to_string(m1.path("etc/app.conf")).unwrap(), "one");
    assert_eq!(fs::read_to_string(m2.path("etc/app.conf")).unwrap(), "two");
    drop((m1, m2));
    assert_eq!(snapshot(&base), base_before, "the shared base was modified");
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open fd; fallocate only reads its integer arguments.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
}

/// Write through a shared writable mapping.
fn mmap_write(f: &File, off: usize, data: &[u8]) {
    use std::os::fd::AsRawFd;
    let len = off + data.len();
    // SAFETY: mapping a file we own read-write; the range is within the file
    // (the caller made it long enough) and unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(data.as_ptr(), (p as *mut u8).add(off), data.len());
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        libc::munmap(p, len);
    }
}

/// The same sequence of data operations, on a file that starts as
/// `initial` (a base file, below a checkpoint on cowfs).
fn data_ops(path: &Path, between: &dyn Fn()) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.write_all_at(&pattern(10_000, 11), 5_000).unwrap();
    between();
    f.set_len(100_003).unwrap(); // cut inside a block
    f.set_len(400_000).unwrap(); // extend: zeros
    f.write_all_at(b"tail", 700_000).unwrap(); // a hole before
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        30_000,
        90_000,
    );
    between();
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 200, 5_000);
    fallocate(&f, 0, 690_000, 100_000); // extends the size
    mmap_write(&f, 50_000, &pattern(9_000, 12));
    f.set_len(650_001).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn file_data_behaves_like_the_native_filesystem() {
    if support::skip() {
        return;
    }
    let (t, base, store, mnt) = support::dirs();
    fs::write(base.join("f"), pattern(600_000, 10)).unwrap();
    let native = t.path().join("native");
    fs::copy(base.join("f"), &native).unwrap();
    data_ops(&native, &|| {});

    support::create(&store, &base, Some("8K"));
    let m = Mounted::new(&store, &mnt);
    let n = std::cell::Cell::new(0);
    let checkpoint = || {
        n.set(n.get() + 1);
        ok(&["fs", "checkpoint", s(&store), &format!("k{}", n.get())]);
    };
    data_ops(&m.path("f"), &checkpoint);
    let want = fs::read(&native).unwrap();
    let got = fs::read(m.path("f")).unwrap();
    assert_eq!(got.len(), want.len());
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "cowfs content differs from ext4's");
    m.umount();
    let m = Mounted::new(&store, &mnt);
    assert!(
        fs::read(m.path("f")).unwrap() == want,
        "differs after remount"
    );
    drop(m);
    assert_eq!(fs::read(base.join("f")).unwrap(), pattern(600_000, 10));
}

fn code(args: &[&str]) -> i32 {
    umlctl(args).status.code().unwrap_or(-1)
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    if support::skip() {
        return;
    }
    let (t, base, store, mnt) = support::dirs();
    let missing = t.path().join("nope");
    assert_eq!(code(&["fs", "create", s(&store), "--base", s(&missing)]), 7);
    assert!(!store.exists(), "a failed create left a store behind");
    assert_eq!(
        code(&[
            "fs",
            "create",
            s(&store),
            "--base",
            s(&base),
            "--block-size",
            "1000"
        ]),
        2
    );
    support::create(&store, &base, None);
    assert_eq!(code(&["fs", "create", s(&store), "--base", s(&base)]), 6);
    assert_eq!(code(&["fs", "list", s(&missing)]), 7);
    assert_eq!(code(&["fs", "rollback", s(&store), "unknown"]), 7);
    assert_eq!(code(&["fs", "checkpoint", s(&store), "bad/name"]), 2);
    ok(&["fs", "checkpoint", s(&store), "a"]);
    assert_eq!(code(&["fs", "checkpoint", s(&store), "a"]), 6);

    let m = Mounted::new(&store, &mnt);
    let stack = fs::read(store.join("stack")).unwrap();
    // The mountpoint is in use; the store is already mounted.
    let other = t.path().join("other");
    support::create(&other, &base, None);
    let before = tree(&other);
    let out = umlctl(&["fs", "mount", s(&other), s(&mnt)]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert_eq!(code(&["fs", "mount", s(&other), s(&missing)]), 7);
    // Nothing started on the refused store goes on changing it.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(tree(&other), before, "a refused mount changed the store");
    assert_eq!(
        code(&["fs", "mount", s(&store), s(&t.path().join("m2"))]),
        6
    );
    assert_eq!(code(&["fs", "rollback", s(&store), "unknown"]), 7);
    assert_eq!(code(&["fs", "fsck", s(&store)]), 6);
    assert_eq!(fs::read(store.join("stack")).unwrap(), stack);
    drop(m);

    // A store written by a newer cowfs.
    let cfg = store.join("store.json");
    let text = fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format_field(cowfs::FORMAT_VERSION), &format_field(99));
    fs::write(&cfg, text).unwrap();
    let out = umlctl(&["fs", "mount", s(&store), s(&mnt)]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upgrade"));
    assert_eq!(code(&["fs", "list", s(&store)]), 3);
    assert!(!cowfs_mounted(&mnt));
}

fn format_field(version: u32) -> String {
    format!("\"format\": {version}")
}

/// A store made before layers had an fsync log (format 1) mounts, gets a
/// log, keeps its data, and is marked with the current format so that an
/// older cowfs, which would ignore the log after a crash, refuses it.
#[test]
fn a_store_of_the_format_before_the_fsync_log_mounts_and_is_upgraded() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    support::create(&store, &base, None);
    {
        let _m = Mounted::new(&store, &mnt);
        fs::write(mnt.join("kept"), b"from format 1").unwrap();
    }
    let cfg = store.join("store.json");
    let text = fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(&format_field(cowfs::FORMAT_VERSION)));
    fs::write(
        &cfg,
        text.replace(&format_field(cowfs::FORMAT_VERSION), &format_field(1)),
    )
    .unwrap();
    for layer in fs::read_dir(store.join("layers")).unwrap() {
        let _ = fs::remove_file(layer.unwrap().path().join("wal"));
    }
    let _m = Mounted::new(&store, &mnt);
    assert_eq!(fs::read(mnt.join("kept")).unwrap(), b"from format 1");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("kept"))
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"FROM", 0).unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::read(mnt.join("kept")).unwrap(), b"FROM format 1");
    let text = fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains(&format_field(cowfs::FORMAT_VERSION)),
        "{text}"
    );
}

/// Every path under the store `dir`, sorted, but the lock file and the
/// daemon's log (a mount attempt makes both).
fn tree(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.retain(|p| p != &dir.join("lock") && p != &dir.join("daemon.log"));
    out.sort();
    out
}

fn cowfs_mounted(mnt: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&format!(" {} ", mnt.display()))
}

fn layer_count(store: &Path) -> usize {
    support::stack(store)["layers"].as_array().unwrap().len()
}

fn wait_for_layers(store: &Path, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while layer_count(store) != n {
        assert!(
            std::time::Instant::now() < deadline,
            "layers were not merged: {}",
            support::stack(store)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn deleted_checkpoints_layers_are_merged_in_the_background() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    make_base(&base);
    support::create(&store, &base, Some("4K"));
    let m = Mounted::new(&store, &mnt);
    let mut snaps = Vec::new();
    for (round, name) in [(1, "a"), (2, "b"), (3, "c")] {
        snaps.push(snapshot(&mnt));
        ok(&["fs", "checkpoint", s(&store), name]);
        mutate(&mnt, round);
        // Overwrite the same blocks each round: merging frees the old ones.
        fs::write(m.path("big"), pattern(400_000, round)).unwrap();
    }
    let now = snapshot(&mnt);
    assert_eq!(layer_count(&store), 4);
    let before = stored_bytes(&store);
    ok(&["fs", "delete", s(&store), "b"]);
    wait_for_layers(&store, 3);
    // The merged-away layers are deleted just after the commit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stored_bytes(&store) + 300_000 >= before {
        assert!(
            std::time::Instant::now() < deadline,
            "merging freed nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(snapshot(&mnt), now, "the merge changed the view");
    ok(&["fs", "rollback", s(&store), "c"]);
    assert_eq!(
        snapshot(&mnt),
        snaps[2],
        "checkpoint c changed by the merge"
    );
    m.umount();
    // Offline delete: c's layer has the top above it, so it merges once a
    // new checkpoint seals the top; the result survives remount.
    ok(&["fs", "delete", s(&store), "c"]);
    let m = Mounted::new(&store, &mnt);
    assert_eq!(layer_count(&store), 3);
    ok(&["fs", "checkpoint", s(&store), "d"]);
    wait_for_layers(&store, 3);
    assert_eq!(snapshot(&mnt), snaps[2]);
    m.umount();
    let m = Mounted::new(&store, &mnt);
    assert_eq!(snapshot(&mnt), snaps[2], "differs after remount");
    ok(&["fs", "rollback", s(&store), "a"]);
    assert_eq!(snapshot(&mnt), snaps[0]);
    drop(m);
    let fsck = ok(&["fs", "fsck", "--check", s(&store)]);
    assert!(fsck.contains("clean"), "fsck after merges: {fsck}");
}

/// renameat2(2) with `flags` from `old` to `new` under `root`: Ok or errno.
fn rename2(root: &Path, old: &str, new: &str, flags: libc::c_uint) -> Result<(), i32> {
    let c = |p: &str| std::ffi::CString::new(s(&root.join(p))).unwrap();
    let (o, n) = (c(old), c(new));
    // SAFETY: two valid C strings; renameat2 reads only them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            o.as_ptr(),
            libc::AT_FDCWD,
            n.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

/// Renames with RENAME_NOREPLACE and RENAME_EXCHANGE (files, directories,
/// a file with a directory, base entries with new ones), with the results,
/// the inode numbers that move with the names, and the tree that is left.
fn rename_ops(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().ino();
    let (noreplace, exchange) = (libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE);
    let mut log = Vec::new();
    let mut step = |what: &str, r: Result<(), i32>| log.push(format!("{what}: {r:?}"));
    fs::write(root.join("new"), "new file").unwrap();
    step("a->fresh noreplace", rename2(root, "a", "fresh", noreplace));
    step("b->fresh noreplace", rename2(root, "b", "fresh", noreplace));
    let (b, fresh) = (ino("b"), ino("fresh"));
    step("b<->fresh", rename2(root, "b", "fresh", exchange));
    assert_eq!(
        (ino("b"), ino("fresh")),
        (fresh, b),
        "inodes stay with the files"
    );
    step("b<->new", rename2(root, "b", "new", exchange));
    step("d1<->b (dir, file)", rename2(root, "d1", "b", exchange));
    step("d2<->missing", rename2(root, "d2", "missing", exchange));
    step("d3<->d2 (dirs)", rename2(root, "d3", "d2", exchange));
    step(
        "both flags",
        rename2(root, "d3", "d2", noreplace | exchange),
    );
    step(
        "d2->d3/sub noreplace",
        rename2(root, "d2", "d3/sub", noreplace),
    );
    step("d1->new noreplace", rename2(root, "d1", "new", noreplace));
    log
}

#[test]
fn rename_noreplace_and_exchange_behave_as_on_the_native_filesystem() {
    if support::skip() {
        return;
    }
    let (t, base, store, mnt) = support::dirs();
    fs::write(base.join("a"), "base a").unwrap();
    fs::write(base.join("b"), "base b").unwrap();
    for (dir, file) in [("d1", Some("x")), ("d2", None), ("d3", Some("y"))] {
        fs::create_dir(base.join(dir)).unwrap();
        if let Some(f) = file {
            fs::write(base.join(dir).join(f), format!("{dir}/{f}")).unwrap();
        }
    }
    let native = t.path().join("native");
    assert!(std::process::Command::new("cp")
        .args(["-a", s(&base), s(&native)])
        .status()
        .unwrap()
        .success());
    let want_log = rename_ops(&native);
    let want = snapshot(&native);

    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    let before = snapshot(&mnt);
    ok(&["fs", "checkpoint", s(&store), "before"]);
    assert_eq!(rename_ops(&mnt), want_log);
    assert_eq!(snapshot(&mnt), want);
    m.umount();
    let m = Mounted::new(&store, &mnt);
    assert_eq!(snapshot(&mnt), want, "differs after remount");
    ok(&["fs", "rollback", s(&store), "before"]);
    assert_eq!(snapshot(&mnt), before, "rollback did not undo the renames");
    drop(m);
    assert_eq!(snapshot(&base), before, "the base changed");
}

fn statvfs(p: &Path) -> libc::statvfs {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: a valid C string and a zeroed struct for statvfs to fill.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(
            libc::statvfs(c.as_ptr(), &mut st),
            0,
            "statvfs {}",
            p.display()
        );
        st
    }
}

/// statfs(2) of a mount reports the file system that holds the store:
/// where the view's writes go.
#[test]
fn statfs_reports_the_file_system_of_the_store() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    let (got, host) = (statvfs(&mnt), statvfs(&store));
    assert_eq!(got.f_frsize, host.f_frsize);
    assert_eq!(got.f_blocks * got.f_frsize, host.f_blocks * host.f_frsize);
    assert_eq!(got.f_namemax, 255);
    let free = |st: &libc::statvfs| st.f_bfree as f64 * st.f_frsize as f64;
    // Other tests write and delete on the host between the two calls.
    assert!((free(&got) - free(&host)).abs() < 256.0 * MIB as f64);
    drop(m);
}
