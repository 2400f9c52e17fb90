//! cowfs rollback and the kernel's caches: a file open across a rollback
//! sees the checkpoint's bytes and, when it grew back, its size; a file no one has open gets a new
//! kernel inode (no cached pages of the dropped layers survive, under any
//! of its names); checkpoint and rollback commit through the `stack` file.

#[path = "common/mod.rs"]
mod common;
#[path = "cowfs_support.rs"]
mod support;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use support::{ok, pattern, s, Mounted};

#[test]
fn a_file_open_across_rollback_sees_the_checkpoint_size() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("shrunk"), pattern(100_000, 1)).unwrap();
    fs::write(base.join("grown"), pattern(100_000, 2)).unwrap();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    let open = |name: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path(name))
            .unwrap()
    };
    let (mut shrunk, grown) = (open("shrunk"), open("grown"));
    ok(&["fs", "checkpoint", s(&store), "c"]);
    // After the checkpoint one file gets shorter and one longer, through
    // the open descriptors, so that the kernel caches the new sizes.
    shrunk.set_len(10_000).unwrap();
    grown.write_all_at(&pattern(200_000, 3), 50_000).unwrap();
    grown.sync_all().unwrap();
    assert_eq!(grown.metadata().unwrap().len(), 250_000);

    ok(&["fs", "rollback", s(&store), "c"]);
    // Back to 100 000 bytes: bigger than before the rollback...
    assert_eq!(shrunk.metadata().unwrap().len(), 100_000);
    let mut got = Vec::new();
    shrunk.seek(SeekFrom::Start(0)).unwrap();
    shrunk.read_to_end(&mut got).unwrap();
    assert!(
        got == pattern(100_000, 1),
        "shrunk: not the checkpoint bytes"
    );
    // ...and smaller. The checkpoint's bytes are there; the kernel keeps
    // its larger cached size while the file is open (with the writeback
    // cache it trusts its own size; a known limit), a new lookup of a
    // closed file gets the right one (see the next test).
    let mut got = vec![0u8; 100_000];
    grown.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got == pattern(100_000, 2),
        "grown: not the checkpoint bytes"
    );
    drop((shrunk, grown));
    // Once closed, the kernel's inode is renewed (at the last release,
    // which the kernel sends after close(2) returns): a new lookup gets
    // the checkpoint's size.
    wait_for_size(&m.path("grown"), 100_000);
    m.umount();
}

/// Polls the size of `path` until it is `want` (a few seconds at most):
/// the kernel sends a file's last RELEASE after close(2) has returned.
fn wait_for_size(path: &std::path::Path, want: u64) {
    let t0 = std::time::Instant::now();
    loop {
        let got = fs::metadata(path).unwrap().len();
        if got == want {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "{}: {got} bytes, not {want}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_closed_file_under_two_names_is_renewed_by_rollback() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("a"), pattern(300_000, 4)).unwrap();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    fs::hard_link(m.path("a"), m.path("b")).unwrap();
    ok(&["fs", "checkpoint", s(&store), "c"]);
    let ino = fs::metadata(m.path("a")).unwrap().ino();
    // Written through one name and read through both, so that the kernel
    // holds the new pages and size under both cached names.
    let f = OpenOptions::new().write(true).open(m.path("a")).unwrap();
    f.write_all_at(&pattern(400_000, 5), 100_000).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("b")).unwrap().len(), 500_000);
    assert_eq!(fs::read(m.path("a")).unwrap().len(), 500_000);
    // An O_PATH descriptor pins the kernel's inode without opening the file
    // (the daemon sees no open): invalidating names cannot evict it.
    let pin = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(m.path("b"))
        .unwrap();

    ok(&["fs", "rollback", s(&store), "c"]);
    for name in ["b", "a"] {
        // The write's descriptor was closed, but its RELEASE may reach the
        // daemon after the rollback (then the file is renewed at it).
        wait_for_size(&m.path(name), 300_000);
        let md = fs::metadata(m.path(name)).unwrap();
        assert_eq!((md.len(), md.ino()), (300_000, ino), "{name}");
        assert!(
            fs::read(m.path(name)).unwrap() == pattern(300_000, 4),
            "{name}: not the checkpoint bytes"
        );
    }
    drop(pin);
    m.umount();
}

#[test]
fn checkpoints_commit_through_the_stack_file_and_survive_remount() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("f"), b"base").unwrap();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    let len = fs::metadata(store.join("stack")).unwrap().len();
    for i in 0..5 {
        fs::write(m.path("f"), format!("v{i}")).unwrap();
        ok(&["fs", "checkpoint", s(&store), &format!("c{i}")]);
    }
    // Commits overwrite slots in place: the file keeps its size.
    assert_eq!(fs::metadata(store.join("stack")).unwrap().len(), len);
    assert_eq!(
        support::stack(&store)["checkpoints"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    ok(&["fs", "rollback", s(&store), "c2"]);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"v2");
    m.umount();
    let list = ok(&["fs", "list", s(&store)]);
    assert!(list.contains("c2") && !list.contains("c3"), "{list}");
    let m = Mounted::new(&store, &mnt);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"v2");
    m.umount();
}

#[test]
fn writes_still_in_the_kernel_cache_belong_to_the_checkpoint() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("old"), pattern(50_000, 1)).unwrap();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    // The two ways a file gets a writable handle, one at a time: a base
    // file opened for writing, and a file created open. Nothing is synced
    // or closed, so with the writeback cache the bytes are still in the
    // kernel's pages when the checkpoint is taken: the daemon must have
    // the kernel write them back first.
    let open_old = || OpenOptions::new().write(true).open(m.path("old"));
    let create_new = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.path("new"))
    };
    let ways: [(&str, &dyn Fn() -> std::io::Result<fs::File>); 2] =
        [("old", &open_old), ("new", &create_new)];
    for (i, (name, open)) in ways.into_iter().enumerate() {
        // A file open only for reading does not make a writer.
        let _reader = fs::File::open(m.path("old")).unwrap();
        let f = open().unwrap();
        f.write_all_at(&pattern(50_000, 2), 0).unwrap();
        let cp = format!("c{i}");
        // In this process: starting umlctl would close a copy of the
        // descriptor at its exec, and every close writes the pages back.
        cowfs::Store::open(&store).unwrap().checkpoint(&cp).unwrap();
        f.write_all_at(&pattern(50_000, 9), 0).unwrap();
        f.sync_all().unwrap();
        ok(&["fs", "rollback", s(&store), &cp]);
        let got = fs::read(m.path(name)).unwrap();
        assert!(
            got == pattern(50_000, 2),
            "{name}: not the checkpoint's bytes"
        );
    }
}
