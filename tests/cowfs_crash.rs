//! Crash safety: the cowfs daemon is killed with SIGKILL in the middle of a
//! write-heavy workload; after `fsck` and a remount every write that fsync
//! returned for is there, the checkpoint is intact, and a second fsck finds
//! the store clean.

#[path = "common/mod.rs"]
mod common;
#[path = "cowfs_support.rs"]
mod support;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{ok, pattern, s, umlctl};

const BIG: u64 = 16 << 20;
const REGION: u64 = 8192;

/// What the workload knows is durable: files and big-file regions.
#[derive(Default)]
struct Durable {
    files: Vec<(PathBuf, u64)>,
    /// region index -> seed of its last fsynced content
    regions: std::collections::BTreeMap<u64, u64>,
    /// The region write in flight when the daemon died (region, seed): it
    /// was not fsynced, so either content is right for that region.
    pending: Option<(u64, u64)>,
}

/// Write small files and overwrite regions of a big base file, fsyncing
/// each, until the file system fails (the daemon is dead).
fn workload(mnt: &Path, round: u64, durable: Arc<Mutex<Durable>>) {
    let big = OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .unwrap();
    for i in 0u64.. {
        let seed = round * 1_000_000 + i;
        let path = mnt.join(format!("d{}/r{round}-f{i}", i % 7));
        let r = (|| -> std::io::Result<()> {
            fs::create_dir_all(path.parent().unwrap())?;
            let mut f = File::create(&path)?;
            f.write_all(&pattern(1000 + (i as usize % 9000), seed))?;
            f.sync_all()?;
            File::open(path.parent().unwrap())?.sync_all()
        })();
        if r.is_err() {
            return;
        }
        durable.lock().unwrap().files.push((path, seed));
        let region = (seed * 7919) % (BIG / REGION);
        durable.lock().unwrap().pending = Some((region, seed));
        if big
            .write_all_at(&pattern(REGION as usize, seed), region * REGION)
            .is_err()
            || big.sync_data().is_err()
        {
            return;
        }
        let mut d = durable.lock().unwrap();
        d.regions.insert(region, seed);
        d.pending = None;
    }
}

fn kill(pid: u32) {
    // SAFETY: kill(2) with a pid we started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

/// Wait until the killed daemon `pid` has died (its store lock goes with
/// it), and detach its dead mount.
fn detach_dead(pid: u32, mnt: &Path) {
    support::wait_dead(pid);
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(mnt)
        .status();
}

fn fsck(store: &Path, check_only: bool) -> serde_json::Value {
    let mut args = vec!["--json", "fs", "fsck", s(store)];
    if check_only {
        args.push("--check");
    }
    serde_json::from_str(ok(&args).trim()).unwrap()
}

#[test]
fn sigkill_during_writes_loses_nothing_fsynced() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    fs::write(base.join("big"), pattern(BIG as usize, 99)).unwrap();
    fs::create_dir(&mnt).unwrap();
    support::create(&store, &base, Some("16K"));

    // The checkpoint every round must find intact.
    support::mount(&store, &mnt, &[]);
    fs::write(mnt.join("kept"), "before the checkpoint").unwrap();
    ok(&["fs", "checkpoint", s(&store), "safe"]);
    ok(&["fs", "umount", s(&mnt)]);

    let durable = Arc::new(Mutex::new(Durable::default()));
    let seed = Instant::now().elapsed().subsec_nanos() as u64 ^ std::process::id() as u64;
    for round in 0..3u64 {
        // One round takes its requests over /dev/fuse; the others by the
        // default transport (io_uring where the kernel has it: replies
        // committed in ring entries).
        let options: &[&str] = if round == 1 {
            &["--transport", "dev-fuse"]
        } else {
            &[]
        };
        let pid = support::mount(&store, &mnt, options);
        let d = durable.clone();
        let m = mnt.clone();
        let writer = std::thread::spawn(move || workload(&m, round + 1, d));
        let delay = 150 + (seed.wrapping_mul(round + 7) % 400);
        std::thread::sleep(Duration::from_millis(delay));
        kill(pid);
        // Before the mount is detached: later writes by path would land
        // in the directory under it.
        writer.join().unwrap();
        detach_dead(pid, &mnt);

        let report = fsck(&store, false);
        assert!(
            report["errors"].as_array().unwrap().is_empty(),
            "round {round}: fsck found damage beyond unfinished writes: {report}"
        );
        let clean = fsck(&store, true);
        assert!(
            clean["errors"].as_array().unwrap().is_empty()
                && clean["unfinished"].as_array().unwrap().is_empty(),
            "round {round}: not clean after repair: {clean}"
        );

        support::mount(&store, &mnt, &[]);
        let mut d = durable.lock().unwrap();
        assert!(
            !d.files.is_empty(),
            "round {round}: the workload wrote nothing"
        );
        for (path, seed) in &d.files {
            let got = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                got == pattern(got.len().max(1), *seed) && got.len() >= 1000,
                "{} lost its fsynced content",
                path.display()
            );
        }
        let big = File::open(mnt.join("big")).unwrap();
        for (region, seed) in &d.regions {
            let mut buf = vec![0u8; REGION as usize];
            big.read_exact_at(&mut buf, region * REGION).unwrap();
            let in_flight = d.pending.filter(|p| p.0 == *region).map(|p| p.1);
            assert!(
                buf == pattern(REGION as usize, *seed)
                    || in_flight.is_some_and(|s| buf == pattern(REGION as usize, s)),
                "region {region} lost its fsynced content"
            );
        }
        // The in-flight write is settled now: whichever content it left is
        // what the next round must find.
        if let Some((r, s)) = d.pending.take() {
            let mut buf = vec![0u8; REGION as usize];
            big.read_exact_at(&mut buf, r * REGION).unwrap();
            if buf == pattern(REGION as usize, s) {
                d.regions.insert(r, s);
            }
        }
        drop((d, big));
        ok(&["fs", "umount", s(&mnt)]);
        let list = ok(&["fs", "list", s(&store)]);
        assert!(list.contains("safe"), "the checkpoint is gone: {list}");
    }

    ok(&["fs", "rollback", s(&store), "safe"]);
    support::mount(&store, &mnt, &[]);
    assert_eq!(
        fs::read_to_string(mnt.join("kept")).unwrap(),
        "before the checkpoint"
    );
    assert!(
        !mnt.join("d0").exists(),
        "rollback after crashes left later files"
    );
    assert!(fs::read(mnt.join("big")).unwrap() == pattern(BIG as usize, 99));
    ok(&["fs", "umount", s(&mnt)]);
    let out = umlctl(&["fs", "fsck", "--check", s(&store)]);
    assert!(out.status.success());
}

/// `umlctl fs sync` takes in what the kernel still holds for a file open
/// for writing (sync(1) reaches no FUSE daemon): after it, a SIGKILL of
/// the daemon loses nothing.
#[test]
fn fs_sync_takes_in_the_writes_the_kernel_still_holds() {
    if support::skip() {
        return;
    }
    let (_t, base, store, mnt) = support::dirs();
    support::create(&store, &base, None);
    let pid = support::mount(&store, &mnt, &[]);
    // Another process (perl, from Debian's essential perl-base) writes
    // the file and keeps it open. Its pages stay in the kernel's writeback
    // cache: any close(2) of a descriptor of the file would write them
    // back (so no shell redirection, which copies and closes one, and no
    // descriptor in this process, whose copy a spawned child closes at
    // exec), and so would the kernel's dirty throttling after 32 pages (a
    // new mount's strict limit starts it at once), hence 20 kB.
    let want = "0123456789".repeat(2000);
    let mut holder = std::process::Command::new("perl")
        .args([
            "-e",
            "open(my $f, '>', $ARGV[0]) or die $!; syswrite($f, $ARGV[1]) or die $!; \
             $| = 1; print qq(written\\n); sleep 60",
        ])
        .arg(mnt.join("held"))
        .arg(&want)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "written\n");
    let out = ok(&["fs", "sync", s(&store), "--json"]);
    assert!(out.contains("synced"), "{out}");
    kill(pid);
    // Only then may the holder close the file (a live daemon would take
    // the pages from that close).
    detach_dead(pid, &mnt);
    holder.kill().unwrap();
    holder.wait().unwrap();
    fsck(&store, false);
    // Unmounted on drop, also when an assertion fails.
    let m = support::Mounted::new(&store, &mnt);
    let got = fs::read_to_string(m.path("held")).unwrap_or_default();
    assert!(
        got == want,
        "the written bytes did not survive: {} of {} bytes",
        got.len(),
        want.len()
    );
    m.umount();
    // Unmounted, there is nothing to do.
    ok(&["fs", "sync", s(&store)]);
}
