//! How a cowfs mount sets up the kernel for speed: its own strict dirty
//! limit, big writes sent on to the disk at once, and no FLUSH per close.
//! Each test looks at what the kernel or the store really holds.

#[path = "common/mod.rs"]
mod common;
#[path = "cowfs_support.rs"]
mod support;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use support::{pattern, Mounted};

/// The backing device info of the mount at `mnt` (its major:minor).
fn bdi(mnt: &Path) -> PathBuf {
    let dev = fs::metadata(mnt).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    PathBuf::from(format!("/sys/class/bdi/{major}:{minor}"))
}

#[test]
fn mount_has_a_strict_dirty_limit_of_its_own() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    let read = |knob: &str| fs::read_to_string(bdi(&m.mnt).join(knob)).unwrap();
    assert_eq!(read("strict_limit").trim(), "1");
    // The kernel keeps the limit as a fine-grained ratio: close, not exact.
    let max: u64 = read("max_bytes").trim().parse().unwrap();
    assert!(max.abs_diff(64 << 20) < 1 << 20, "max_bytes {max}");
}

/// Pages of the whole file `path` that are dirty in the page cache, from
/// cachestat(2) (Linux 6.5).
fn dirty_pages(path: &Path) -> u64 {
    #[repr(C)]
    #[derive(Default)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    let f = fs::File::open(path).unwrap();
    let (range, mut st) = (Range::default(), Stat::default());
    use std::os::fd::AsRawFd;
    // SAFETY: cachestat reads `range` and writes `st`, both live repr(C)
    // structs of the kernel's layout; the fd is open for the call.
    let r = unsafe {
        libc::syscall(
            451, // SYS_cachestat
            f.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut Stat,
            0,
        )
    };
    assert_eq!(r, 0, "cachestat: {}", std::io::Error::last_os_error());
    st.dirty
}

/// The data file of inode `ino` in the store's layers.
fn data_file(store: &Path, ino: u64) -> PathBuf {
    fs::read_dir(store.join("layers"))
        .unwrap()
        .flatten()
        .map(|l| l.path().join("data").join(ino.to_string()))
        .find(|p| p.exists())
        .expect("a data file for the inode")
}

#[test]
fn big_writes_go_on_to_the_disk_without_an_fsync() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    // O_DIRECT: the kernel sends each 1 MiB write to the daemon at once,
    // bypassing its own cache, so the daemon sees big writes now.
    let data = aligned(8 << 20, 7);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("big"))
        .unwrap();
    for chunk in data.chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    let ino = f.metadata().unwrap().ino();
    // Nothing synced: left to the kernel, 8 MiB would stay dirty for 30 s.
    let dirty = dirty_pages(&data_file(&store, ino));
    assert_eq!(dirty, 0, "pages of the data file still dirty");
    drop(f);
    assert!(fs::read(m.path("big")).unwrap() == data[..]);
}

/// `len` bytes of `pattern` in a page-aligned buffer (for O_DIRECT).
fn aligned(len: usize, seed: u64) -> &'static mut [u8] {
    let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
    // SAFETY: the layout has a non-zero size; the memory is leaked on
    // purpose (a test), so the slice lives for the whole program.
    let buf = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc(layout), len) };
    buf.copy_from_slice(&pattern(len, seed));
    buf
}

#[test]
fn many_closes_succeed_and_keep_the_data() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    // The first close learns that FLUSH is not implemented; the others do
    // not send it. Every close must still succeed and keep what it wrote.
    for i in 0..20u64 {
        let mut f = fs::File::create(m.path(&format!("f{i}"))).unwrap();
        f.write_all(&pattern(5000, i)).unwrap();
        // SAFETY: close(2) of a descriptor we own, taken out of the File
        // so that its result can be checked.
        let r = unsafe { libc::close(std::os::fd::IntoRawFd::into_raw_fd(f)) };
        assert_eq!(r, 0, "close: {}", std::io::Error::last_os_error());
    }
    m.umount();
    let m = Mounted::new(&store, &mnt);
    for i in 0..20u64 {
        assert!(fs::read(m.path(&format!("f{i}"))).unwrap() == pattern(5000, i));
    }
}
