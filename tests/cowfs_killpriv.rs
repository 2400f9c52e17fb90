//! FUSE_HANDLE_KILLPRIV_V2: a cowfs mount clears setuid, setgid and
//! security.capability itself at write, truncate and chown, so the kernel
//! stops asking for security.capability before every write. Each behaviour
//! runs on the native file system and on a cowfs mount in the same test:
//! the two must agree, and both must match what the kernel's rules say.

#[path = "common/mod.rs"]
mod common;
#[path = "cowfs_support.rs"]
mod support;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{s, Mounted};

/// The unprivileged user pjdfstest also uses (tools/install-pjdfstest).
const USER: &str = "tests";

/// uid and gid of `USER`, or None (and a skip message) when the host
/// cannot run these tests.
fn user() -> Option<(u32, u32)> {
    if support::skip() {
        return None;
    }
    let u = nix::unistd::User::from_name(USER).ok().flatten();
    if common::skip_unless(
        u.is_some(),
        "user `tests` is missing (tools/install-pjdfstest)",
    ) {
        return None;
    }
    u.map(|u| (u.uid.as_raw(), u.gid.as_raw()))
}

/// Run `sh -c SCRIPT` as `USER` (no supplementary groups, no
/// capabilities); it must succeed.
fn as_user(script: &str) {
    let (uid, gid) = user().expect("checked by the test");
    let out = Command::new("sh")
        .args(["-c", script])
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} as {USER}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file `name` in `dir` with `mode` (owner root, group `gid`).
fn make(dir: &Path, name: &str, mode: u32, gid: u32) {
    let p = dir.join(name);
    fs::write(&p, b"some data").unwrap();
    std::os::unix::fs::chown(&p, None, Some(gid)).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

/// The permission bits of `p` as `ls -l` and `stat` ask for them: statx
/// of STATX_MODE alone, which the kernel answers from its cache unless
/// told that the mode changed. (A full stat also asks for fields a write
/// invalidates, so it would refresh a stale mode and hide it. The kernel
/// itself uses the cached mode, for exec's setuid among others.)
fn mode(p: &Path) -> u32 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: struct statx is plain integers, for which zero is valid.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a writable struct statx.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MODE,
            &mut st,
        )
    };
    assert_eq!(
        r,
        0,
        "statx {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    st.stx_mode as u32 & 0o7777
}

/// "name mode cap=yes|no": what the tests compare.
fn state(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    let mode = mode(&p);
    let cap = support::snapshot(dir)
        .get(name)
        .is_some_and(|s| s.contains("security.capability="));
    format!("{name} {mode:o} cap={}", if cap { "yes" } else { "no" })
}

/// A valid security.capability value (revision 2: cap_net_bind_service
/// permitted), as setcap(8) writes it; the kernel refuses malformed ones.
fn capability() -> Vec<u8> {
    let words: [u32; 5] = [0x0200_0000, 1 << 10, 0, 0, 0];
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Run `scenario` in a native directory and in a cowfs mount; they must
/// see the same, which is returned.
fn same_as_native(scenario: &dyn Fn(&Path) -> Vec<String>) -> Vec<String> {
    let (t, base, store, mnt) = support::dirs();
    // `USER` must reach both directories.
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let native = t.path().join("native");
    fs::create_dir(&native).unwrap();
    support::create(&store, &base, None);
    let m = Mounted::new(&store, &mnt);
    let on_native = scenario(&native);
    let on_cowfs = scenario(&m.mnt);
    assert_eq!(
        on_cowfs, on_native,
        "cowfs (left) differs from native (right)"
    );
    on_cowfs
}

#[test]
fn a_write_clears_setuid_and_setgid_as_on_native() {
    let Some((_, gid)) = user() else { return };
    let seen = same_as_native(&|dir| {
        // Root's group: the writer is not in it.
        for (name, mode) in [("u6777", 0o6777), ("u6767", 0o6767), ("r6777", 0o6777)] {
            make(dir, name, mode, 0);
        }
        // The writer's own group: setgid without group execute stays.
        make(dir, "g6766", 0o6766, gid);
        let d = dir.display();
        as_user(&format!(
            "for f in u6777 u6767 g6766; do printf more >> {d}/$f; done"
        ));
        // Root (CAP_FSETID) keeps both.
        let f = OpenOptions::new()
            .append(true)
            .open(dir.join("r6777"))
            .unwrap();
        f.write_all_at(b"more", 0).unwrap();
        ["u6777", "u6767", "g6766", "r6777"]
            .iter()
            .map(|n| state(dir, n))
            .collect()
    });
    assert_eq!(
        seen,
        [
            "u6777 777 cap=no",
            "u6767 767 cap=no",
            "g6766 2766 cap=no",
            "r6777 6777 cap=no"
        ]
    );
}

#[test]
fn a_truncate_clears_setuid_and_setgid_as_on_native() {
    let Some(_) = user() else { return };
    let seen = same_as_native(&|dir| {
        for name in ["t6777", "o6777", "r6777"] {
            make(dir, name, 0o6777, 0);
        }
        make(dir, "t6767", 0o6767, 0);
        let d = dir.display();
        // truncate(2), and open(O_TRUNC), which reaches cowfs as a SETATTR
        // of the size too.
        as_user(&format!(
            "truncate -s 2 {d}/t6777 {d}/t6767 && : > {d}/o6777"
        ));
        OpenOptions::new()
            .write(true)
            .open(dir.join("r6777"))
            .unwrap()
            .set_len(2)
            .unwrap();
        ["t6777", "t6767", "o6777", "r6777"]
            .iter()
            .map(|n| state(dir, n))
            .collect()
    });
    assert_eq!(
        seen,
        [
            "t6777 777 cap=no",
            "t6767 767 cap=no",
            "o6777 777 cap=no",
            "r6777 6777 cap=no"
        ]
    );
}

#[test]
fn a_chown_by_root_clears_setuid_and_setgid_as_on_native() {
    let Some((uid, _)) = user() else { return };
    let seen = same_as_native(&|dir| {
        make(dir, "c6777", 0o6777, 0);
        make(dir, "c6767", 0o6767, 0);
        let sub = dir.join("dir");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o6777)).unwrap();
        for name in ["c6777", "c6767", "dir"] {
            std::os::unix::fs::chown(dir.join(name), Some(uid), None).unwrap();
        }
        ["c6777", "c6767", "dir"]
            .iter()
            .map(|n| state(dir, n))
            .collect()
    });
    // Setgid without group execute stays for root; directories keep both.
    assert_eq!(
        seen,
        ["c6777 777 cap=no", "c6767 2767 cap=no", "dir 6777 cap=no"]
    );
}

#[test]
fn capabilities_go_at_write_truncate_and_chown_as_on_native() {
    let Some((uid, _)) = user() else { return };
    let seen = same_as_native(&|dir| {
        let names = ["write", "user-write", "truncate", "chown", "kept"];
        for name in names {
            make(dir, name, 0o666, 0);
            support::set_xattr(&dir.join(name), "security.capability", &capability());
        }
        let mut seen = vec![state(dir, "kept")];
        let f = OpenOptions::new()
            .write(true)
            .open(dir.join("write"))
            .unwrap();
        f.write_all_at(b"more", 4).unwrap();
        as_user(&format!("printf more >> {}/user-write", dir.display()));
        OpenOptions::new()
            .write(true)
            .open(dir.join("truncate"))
            .unwrap()
            .set_len(1)
            .unwrap();
        std::os::unix::fs::chown(dir.join("chown"), Some(uid), None).unwrap();
        seen.extend(names.iter().map(|n| state(dir, n)));
        seen
    });
    assert_eq!(
        seen,
        [
            "kept 666 cap=yes",
            "write 666 cap=no",
            "user-write 666 cap=no",
            "truncate 666 cap=no",
            "chown 666 cap=no",
            "kept 666 cap=yes"
        ]
    );
}

/// Requests that fuser logged in `log` (RUST_LOG=fuser::request=debug)
/// asking for security.capability.
fn capability_lookups(log: &Path) -> usize {
    fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("GETXATTR name \"security.capability\""))
        .count()
}

#[test]
fn the_kernel_does_not_ask_for_capabilities_at_each_write() {
    if support::skip() {
        return;
    }
    let (t, base, store, mnt) = support::dirs();
    fs::write(base.join("image"), vec![7u8; 1 << 20]).unwrap();
    support::create(&store, &base, None);
    fs::create_dir(&mnt).unwrap();
    // The daemon in the foreground, logging every request it gets.
    let log = t.path().join("requests.log");
    let mut daemon = Command::new(common::umlctl())
        .args(["fs", "mount", s(&store), s(&mnt), "--foreground"])
        .env("RUST_LOG", "fuser::request=debug")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let outside = fs::metadata(t.path()).unwrap().dev();
    let start = Instant::now();
    while fs::metadata(&mnt).unwrap().dev() == outside {
        assert!(start.elapsed() < Duration::from_secs(10), "no mount");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = Mounted {
        store: store.clone(),
        mnt: mnt.clone(),
    };
    // A new file and a base file, 4 KiB writes in the writeback cache.
    let writes = 200;
    for name in ["new", "image"] {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(m.path(name))
            .unwrap();
        for i in 0..writes {
            f.write_all_at(&[i as u8; 4096], (i * 4096) % (1 << 20))
                .unwrap();
        }
        f.sync_all().unwrap();
    }
    drop(m);
    assert!(daemon.wait().unwrap().success());
    let lookups = capability_lookups(&log);
    // Once per inode at most: the kernel then knows it has none (S_NOSEC).
    assert!(
        lookups <= 2,
        "{lookups} GETXATTR of security.capability for {} writes",
        2 * writes
    );
}
