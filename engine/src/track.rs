//! Write tracking for incremental snapshots.
//!
//! A snapshot taken with tracking registers the target's private anonymous
//! memory with a userfaultfd in WP_ASYNC mode and write-protects all of it
//! (the kernel clears a page's protection itself on the first write, no
//! fault reaches us). A later snapshot asks PAGEMAP_SCAN which pages were
//! written since, protecting them again in the same walk: those are stored,
//! the others are taken from the parent image by reference. (Soft-dirty
//! bits would do the same job, but this kernel is built without them.)
//!
//! The registration lives as long as its userfaultfd is open: a small
//! tracker process (see `TrackerLauncher`) holds it until the target exits.
//! A state file records which image the protection was last reset for;
//! an incremental snapshot must name that image as its parent.

use crate::error::{Error, IoContext, Result};
use crate::image::{Image, Vma};
use crate::proc::{self, scan, MapsEntry, PAGE_SIZE};
use crate::uffd::{self, Uffd};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// Starts a process that holds the tracking userfaultfd of `pid` (and exits
/// with it); returns its pid.
pub type TrackerLauncher = std::sync::Arc<dyn Fn(OwnedFd, i32) -> Result<i32> + Send + Sync>;

/// /run/umlctl/track/PID.json
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: tells a reused pid apart.
    pub start_time: u64,
    pub tracker_pid: i32,
    /// The manifest checksum of the snapshot the protection was reset for;
    /// `RESET_UNPUBLISHED` while a snapshot that resets it is under way.
    pub image_sum: u64,
}

/// `State::image_sum` of a protection reset by a snapshot not (yet)
/// published: no image holds the pages written before that reset, so no
/// incremental snapshot can be taken against any parent until a full one.
pub const RESET_UNPUBLISHED: u64 = 0;

fn state_path(pid: i32) -> PathBuf {
    PathBuf::from(format!("/run/umlctl/track/{pid}.json"))
}

pub fn start_time(pid: i32) -> Result<u64> {
    Ok(proc::stat_field(&proc::stat_fields(pid)?, 22))
}

impl State {
    pub fn load(pid: i32) -> Option<State> {
        let s: State = serde_json::from_slice(&std::fs::read(state_path(pid)).ok()?).ok()?;
        let alive = std::path::Path::new(&format!("/proc/{}", s.tracker_pid)).exists();
        (alive && start_time(pid).ok() == Some(s.start_time)).then_some(s)
    }

    /// Removes the state file of `pid` if `tracker` wrote it (the tracker
    /// calls this when the process is gone).
    pub fn forget(pid: i32, tracker: i32) {
        let path = state_path(pid);
        let mine = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<State>(&b).ok())
            .is_some_and(|s| s.tracker_pid == tracker);
        if mine {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Records, before a snapshot protects anything again, that the
    /// protection no longer matches any published image (see
    /// `RESET_UNPUBLISHED`); publishing the new image records it.
    pub fn resetting(mut self) -> Result<()> {
        self.image_sum = RESET_UNPUBLISHED;
        self.save()
    }

    pub fn save(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let path = state_path(self.pid);
        let dir = path.parent().expect("state dir");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(|| format!("create {}", dir.display()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).expect("state serializes"))
            .ctx(|| "write tracking state".into())?;
        std::fs::rename(&tmp, &path).ctx(|| "publish tracking state".into())
    }
}

/// Private anonymous VMAs: the memory that tracking covers.
pub fn trackable(m: &MapsEntry) -> bool {
    m.inode == 0 && !m.shared && !m.path.starts_with("[v") && (m.read || m.write)
}

/// Registers `vmas` for async write tracking with `uffd` (already API'd)
/// and protects all their pages. VMAs already registered are skipped.
pub fn protect(uffd: &Uffd, pagemap: &File, vmas: &[&MapsEntry]) -> Result<()> {
    for m in vmas {
        if uffd.register(m.start, m.len(), uffd::MODE_WP).is_err() {
            continue;
        }
        proc::scan_pages_flags(pagemap, m.start, m.end, 0, 0, scan::PM_SCAN_WP_MATCHING)?;
    }
    Ok(())
}

/// Bytes written since tracking was last reset (the pages an incremental
/// snapshot taken now would store), without resetting anything.
pub fn written_bytes(pid: i32) -> Result<u64> {
    let pagemap = File::open(format!("/proc/{pid}/pagemap")).ctx(|| "open pagemap".into())?;
    let mut total = 0;
    for m in proc::maps(pid)?.iter().filter(|m| trackable(m)) {
        let flags = scan::PM_SCAN_CHECK_WPASYNC;
        if let Ok(runs) =
            proc::scan_pages_flags(&pagemap, m.start, m.end, scan::PAGE_IS_WRITTEN, 0, flags)
        {
            total += runs.iter().map(|r| r.1 * PAGE_SIZE).sum::<u64>();
        }
    }
    Ok(total)
}

pub fn new_uffd(fd: OwnedFd) -> Result<Uffd> {
    let u = Uffd::from_fd(fd);
    u.api(uffd::FEATURE_WP_ASYNC | uffd::FEATURE_WP_UNPOPULATED)?;
    Ok(u)
}

/// Runs to store (address, pages) and runs inherited ([address, pages,
/// offset, depth]), as `Delta::split` returns them.
pub type Split = (Vec<(u64, u64)>, Vec<[u64; 4]>);

/// Splits present pages into those to store and those inherited from the
/// parent image, for one VMA.
pub struct Delta {
    pagemap: File,
    parent: Vec<Vma>,
    /// Starts of the VMAs whose written pages `split` found and protected
    /// again: tracking there is armed for the next snapshot already.
    rearmed: std::cell::RefCell<std::collections::HashSet<u64>>,
}

impl Delta {
    /// Checks that `parent` is the image tracking was last reset for.
    pub fn new(pid: i32, parent: &Image) -> Result<Delta> {
        let state = State::load(pid).ok_or_else(|| Error::Unsupported {
            pid,
            what: "has no write tracking running: take a full snapshot with --track first".into(),
        })?;
        if state.image_sum == RESET_UNPUBLISHED {
            return Err(Error::Unsupported {
                pid,
                what: "had its write tracking reset by a snapshot that did not complete: take a full snapshot with --track".into(),
            });
        }
        if state.image_sum != parent.manifest_sum {
            return Err(Error::Unsupported {
                pid,
                what: format!(
                    "{} is not its latest tracked snapshot: use that one as --parent, or take a full snapshot with --track",
                    parent.dir.display()
                ),
            });
        }
        let pagemap = File::open(format!("/proc/{pid}/pagemap")).ctx(|| "open pagemap".into())?;
        let vmas = parent
            .manifest
            .processes
            .first()
            .map(|p| p.vmas.clone())
            .unwrap_or_default();
        Ok(Delta {
            pagemap,
            parent: vmas,
            rearmed: Default::default(),
        })
    }

    /// Forgets which VMAs were protected again: a walk before the freeze
    /// (`memory::Staged::pre_read`) is not the one that arms the next
    /// snapshot's tracking.
    pub fn forget_rearmed(&self) {
        self.rearmed.borrow_mut().clear();
    }

    /// Did `split` protect the VMA at `start` again (so that arming
    /// tracking for the next snapshot can skip it)?
    pub fn rearmed(&self, start: u64) -> bool {
        self.rearmed.borrow().contains(&start)
    }

    /// The parent's record of `m`, if tracking can tell what changed in it.
    fn parent_of(&self, m: &MapsEntry) -> Option<&Vma> {
        let pv = self
            .parent
            .iter()
            .find(|v| v.start == m.start && v.end == m.end && !v.shared)?;
        trackable(m).then_some(pv)
    }

    /// For a VMA of the parent that tracking covers: one walk of its page
    /// table that finds the present pages, the guard pages and the pages
    /// written since the parent, and protects the written ones again (the
    /// kernel protects only the written pages of a matching walk). None
    /// when it is not tracked: then `split` stores what is present.
    pub fn walk(&self, m: &MapsEntry) -> Option<Walk> {
        self.parent_of(m)?;
        let data = scan::PAGE_IS_PRESENT | scan::PAGE_IS_SWAPPED;
        let anyof = data | scan::PAGE_IS_GUARD;
        let flags = scan::PM_SCAN_WP_MATCHING | scan::PM_SCAN_CHECK_WPASYNC;
        let ret = anyof | scan::PAGE_IS_WRITTEN;
        // An error: not registered (tracking lost for this VMA).
        let regions =
            proc::scan_regions_parallel(&self.pagemap, (m.start, m.end), (0, anyof, ret), flags)
                .ok()?;
        self.rearmed.borrow_mut().insert(m.start);
        let mut w = Walk::default();
        for (a, n, cats) in regions {
            if cats & scan::PAGE_IS_GUARD != 0 {
                proc::push_run(&mut w.guards, a, n);
                continue;
            }
            proc::push_run(&mut w.present, a, n);
            if cats & scan::PAGE_IS_WRITTEN != 0 {
                proc::push_run(&mut w.written, a, n);
            }
        }
        Some(w)
    }

    /// Of the `present` runs of `m`: (runs to store, runs inherited). With
    /// `walked`, the written pages `walk` found; else they are found here.
    pub fn split(
        &self,
        m: &MapsEntry,
        present: Vec<(u64, u64)>,
        walked: Option<Vec<(u64, u64)>>,
    ) -> Result<Split> {
        let Some(pv) = self.parent_of(m) else {
            return Ok((present, vec![]));
        };
        let written = match walked {
            Some(w) => w,
            None => {
                let flags = scan::PM_SCAN_WP_MATCHING | scan::PM_SCAN_CHECK_WPASYNC;
                let w = scan::PAGE_IS_WRITTEN;
                match proc::scan_pages_flags(&self.pagemap, m.start, m.end, w, 0, flags) {
                    Ok(w) => w,
                    // Not registered (tracking lost for this VMA): store it all.
                    Err(_) => return Ok((present, vec![])),
                }
            }
        };
        self.rearmed.borrow_mut().insert(m.start);
        // Byte intervals, sorted: pages written since the parent, and where
        // the parent chain holds each page (its start, offset, depth).
        let written: Vec<(u64, u64, ())> = written
            .into_iter()
            .map(|(a, k)| (a, a + k * PAGE_SIZE, ()))
            .collect();
        let mut sources: Vec<(u64, u64, [u64; 3])> = pv
            .pages
            .iter()
            .map(|r| (r[0], r[0] + r[1] * PAGE_SIZE, [r[0], r[2], 1]))
            .chain(
                pv.inherited
                    .iter()
                    .map(|r| (r[0], r[0] + r[1] * PAGE_SIZE, [r[0], r[2], r[3] + 1])),
            )
            .collect();
        sources.sort_unstable_by_key(|r| r.0);
        let mut out = Runs::default();
        for (a, k) in present {
            for (lo, hi, w) in cut(a, a + k * PAGE_SIZE, &written) {
                if w.is_some() {
                    out.store(lo, hi);
                    continue;
                }
                for (lo, hi, src) in cut(lo, hi, &sources) {
                    match src {
                        Some(&[from, off, depth]) => out.inherit(lo, hi, off + (lo - from), depth),
                        // Present now, absent from the parent: stored.
                        None => out.store(lo, hi),
                    }
                }
            }
        }
        let (store, inherit) = (out.store, out.inherit);
        Ok((store, inherit))
    }
}

/// What `Delta::walk` found in one VMA: (address, pages) runs.
#[derive(Default)]
pub struct Walk {
    pub present: Vec<(u64, u64)>,
    pub written: Vec<(u64, u64)>,
    /// Guard pages, as [address, pages].
    pub guards: Vec<(u64, u64)>,
}

/// The runs `Delta::split` builds, each merged with the previous one when
/// they continue each other.
#[derive(Default)]
struct Runs {
    store: Vec<(u64, u64)>,
    inherit: Vec<[u64; 4]>,
}

impl Runs {
    fn store(&mut self, lo: u64, hi: u64) {
        proc::push_run(&mut self.store, lo, (hi - lo) / PAGE_SIZE);
    }

    fn inherit(&mut self, lo: u64, hi: u64, off: u64, depth: u64) {
        let n = (hi - lo) / PAGE_SIZE;
        match self.inherit.last_mut() {
            Some(l)
                if l[3] == depth
                    && l[0] + l[1] * PAGE_SIZE == lo
                    && l[2] + l[1] * PAGE_SIZE == off =>
            {
                l[1] += n
            }
            _ => self.inherit.push([lo, n, off, depth]),
        }
    }
}

/// Cuts [lo, hi) by `by` (sorted, disjoint [start, end) intervals): the
/// pieces in order, each with the value of the interval covering it.
fn cut<T>(lo: u64, hi: u64, by: &[(u64, u64, T)]) -> Vec<(u64, u64, Option<&T>)> {
    let mut out = Vec::new();
    let mut at = lo;
    let mut i = by.partition_point(|r| r.1 <= lo);
    while at < hi {
        match by.get(i) {
            Some(r) if r.0 < hi => {
                if r.0 > at {
                    out.push((at, r.0, None));
                    at = r.0;
                }
                let end = r.1.min(hi);
                out.push((at, end, Some(&r.2)));
                at = end;
                i += 1;
            }
            _ => {
                out.push((at, hi, None));
                at = hi;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot that reset the protection and then failed leaves no
    /// image holding what was written before the reset: an incremental
    /// snapshot against the old parent would silently miss those pages.
    #[test]
    fn a_reset_that_was_not_published_refuses_every_parent() {
        if !nix::unistd::geteuid().is_root() {
            let why = "the tracking state lives in /run/umlctl (root)";
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run as root: {why}"
            );
            eprintln!("skipped: {why}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut w = crate::image::ImageWriter::create(&tmp.path().join("p")).unwrap();
        w.append(&[7u8; 4096]).unwrap();
        let manifest = crate::image::tests::manifest(&mut w);
        let parent = Image::open(&w.finish(&manifest).unwrap()).unwrap();
        // This process stands for both the target and its tracker.
        let pid = std::process::id() as i32;
        let state = State {
            pid,
            start_time: start_time(pid).unwrap(),
            tracker_pid: pid,
            image_sum: parent.manifest_sum,
        };
        state.save().unwrap();
        let ok = Delta::new(pid, &parent).map(|_| ());
        State::load(pid).unwrap().resetting().unwrap();
        let refused = Delta::new(pid, &parent).map(|_| ());
        State::forget(pid, pid);
        ok.unwrap();
        let e = refused.expect_err("a parent after an unpublished reset");
        assert!(e.to_string().contains("did not complete"), "{e}");
    }

    #[test]
    fn cut_splits_a_range_by_intervals() {
        let by = [(10, 20, 'a'), (20, 25, 'b'), (40, 50, 'c')];
        let got = cut(5, 45, &by);
        let want = vec![
            (5, 10, None),
            (10, 20, Some(&'a')),
            (20, 25, Some(&'b')),
            (25, 40, None),
            (40, 45, Some(&'c')),
        ];
        assert_eq!(got, want);
        assert_eq!(cut(12, 15, &by), vec![(12, 15, Some(&'a'))]);
        assert_eq!(cut(60, 70, &by), vec![(60, 70, None)]);
        assert_eq!(cut(0, 5, &by), vec![(0, 5, None)]);
    }

    #[test]
    fn runs_merge_only_what_continues() {
        let mut r = Runs::default();
        r.store(0, 4096);
        r.store(4096, 8192);
        r.store(16384, 20480);
        assert_eq!(r.store, vec![(0, 2), (16384, 1)]);
        r.inherit(0, 4096, 0, 1);
        r.inherit(4096, 8192, 4096, 1);
        r.inherit(8192, 12288, 8192, 2);
        r.inherit(12288, 16384, 0, 2);
        assert_eq!(
            r.inherit,
            vec![[0, 2, 0, 1], [8192, 1, 8192, 2], [12288, 1, 0, 2]]
        );
    }
}
