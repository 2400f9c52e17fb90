//! Helpers shared by the cowfs integration tests: running `umlctl fs`,
//! mounting with a guard that unmounts, hashing trees.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common;

/// Run `umlctl ARGS` and return its output.
pub fn umlctl(args: &[&str]) -> Output {
    std::process::Command::new(common::umlctl())
        .args(args)
        .output()
        .expect("run umlctl")
}

/// Run `umlctl ARGS`, which must succeed; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = umlctl(args);
    assert!(
        out.status.success(),
        "umlctl {args:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True (and a skip message) when this host cannot mount FUSE as root.
pub fn skip() -> bool {
    common::skip_unless(common::is_root(), "cowfs tests need root")
        || common::skip_unless(
            Path::new("/dev/fuse").exists(),
            "cowfs tests need /dev/fuse",
        )
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// A scratch directory with an empty `base` made, and the paths for a
/// store and a mountpoint beside it.
pub fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let (base, store, mnt) = (
        t.path().join("base"),
        t.path().join("store"),
        t.path().join("mnt"),
    );
    std::fs::create_dir(&base).unwrap();
    (t, base, store, mnt)
}

/// `umlctl fs create STORE --base BASE [--block-size BS]`.
pub fn create(store: &Path, base: &Path, block_size: Option<&str>) {
    let mut args = vec!["fs", "create", s(store), "--base", s(base)];
    if let Some(bs) = block_size {
        args.extend(["--block-size", bs]);
    }
    ok(&args);
}

/// `umlctl fs mount STORE MNT [OPTIONS]` (making MNT if needed); returns
/// the daemon's pid. `Mounted` unmounts on drop; this leaves it mounted.
pub fn mount(store: &Path, mnt: &Path, options: &[&str]) -> u32 {
    std::fs::create_dir_all(mnt).unwrap();
    let mut args = vec!["--json", "fs", "mount", s(store), s(mnt)];
    args.extend(options);
    let out: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    out["pid"].as_u64().expect("daemon pid") as u32
}

/// A mounted store, unmounted when dropped.
pub struct Mounted {
    pub store: PathBuf,
    pub mnt: PathBuf,
}

impl Mounted {
    pub fn new(store: &Path, mnt: &Path) -> Mounted {
        Self::with(store, mnt, &[]).0
    }

    /// Mount with extra `fs mount` options; also returns the daemon's pid.
    pub fn with(store: &Path, mnt: &Path, options: &[&str]) -> (Mounted, u32) {
        let pid = mount(store, mnt, options);
        let m = Mounted {
            store: store.to_owned(),
            mnt: mnt.to_owned(),
        };
        (m, pid)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn umount(self) {
        ok(&["fs", "umount", s(&self.mnt)]);
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let out = umlctl(&["fs", "umount", s(&self.mnt)]);
        if !out.status.success() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// Everything observable about a tree: per path, kind + mode + owner +
/// size + content hash (or link target), and xattrs.
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let md = std::fs::symlink_metadata(&p).unwrap();
        let what = if md.is_symlink() {
            format!("link {}", std::fs::read_link(&p).unwrap().display())
        } else if md.is_file() {
            let data = std::fs::read(&p).unwrap();
            format!("file {} {:016x}", data.len(), hash(&data))
        } else if md.is_dir() {
            walk(root, &p, out);
            format!("dir nlink={}", md.nlink())
        } else {
            format!("special {:o}", md.mode() & libc::S_IFMT)
        };
        let xattrs = xattr_names(&p);
        out.insert(
            rel,
            format!(
                "{what} mode={:o} uid={} gid={} xattrs={xattrs:?}",
                md.permissions().mode() & 0o7777,
                md.uid(),
                md.gid()
            ),
        );
    }
}

/// "name=value" of every extended attribute of `p` (not following links).
fn xattr_names(p: &Path) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: c is a valid C string; names is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = std::ffi::CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        // SAFETY: valid C strings; val is writable for its length.
        let v =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        val.truncate(v.max(0) as usize);
        out.push(format!(
            "{}={}",
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(&val)
        ));
    }
    out
}

/// Set an extended attribute (follows no links; for tests).
pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings; value is readable for its length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn hash(data: &[u8]) -> u64 {
    // FNV-1a: enough to tell contents apart in tests.
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Bytes stored in a store's layers (data files), as allocated on disk.
/// Background work (merges, the trash) may delete entries while they are
/// counted: those count as nothing.
pub fn stored_bytes(store: &Path) -> u64 {
    fn du(p: &Path) -> u64 {
        let md = match std::fs::symlink_metadata(p) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => panic!("stat {}: {e}", p.display()),
        };
        if md.is_dir() {
            let entries = match std::fs::read_dir(p) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
                Err(e) => panic!("read {}: {e}", p.display()),
            };
            entries.flatten().map(|e| du(&e.path())).sum()
        } else if p.file_name().is_some_and(|n| n == "wal") {
            // Each layer's fsync log: a fixed preallocation, not data.
            0
        } else {
            md.blocks() * 512
        }
    }
    du(&store.join("layers"))
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The committed stack of a store: of the two slots of `STORE/stack`, the
/// valid one with the higher sequence number.
pub fn stack(store: &Path) -> serde_json::Value {
    let bytes = std::fs::read(store.join("stack")).unwrap();
    let (a, b) = bytes.split_at(bytes.len() / 2);
    [a, b]
        .into_iter()
        .filter_map(|s| serde_json::from_slice::<serde_json::Value>(s.trim_ascii_end()).ok())
        .max_by_key(|v| v["seq"].as_u64())
        .expect("a valid slot")["stack"]
        .clone()
}

/// Waits until the daemon `pid` has died (a zombie or gone; its parent
/// may never reap it), up to 5 s.
pub fn wait_dead(pid: u32) {
    for _ in 0..100 {
        if !common::alive(pid as i32) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("daemon {pid} still runs");
}
