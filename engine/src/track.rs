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
    /// The manifest checksum of the snapshot the protection was reset for.
    pub image_sum: u64,
}

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
}

impl Delta {
    /// Checks that `parent` is the image tracking was last reset for.
    pub fn new(pid: i32, parent: &Image) -> Result<Delta> {
        let state = State::load(pid).ok_or_else(|| Error::Unsupported {
            pid,
            what: "has no write tracking running: take a full snapshot with --track first".into(),
        })?;
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
        })
    }

    /// Of the `present` runs of `m`: (runs to store, runs inherited).
    pub fn split(&self, m: &MapsEntry, present: Vec<(u64, u64)>) -> Result<Split> {
        let Some(pv) = self
            .parent
            .iter()
            .find(|v| v.start == m.start && v.end == m.end && !v.shared)
        else {
            return Ok((present, vec![]));
        };
        if !trackable(m) {
            return Ok((present, vec![]));
        }
        let flags = scan::PM_SCAN_WP_MATCHING | scan::PM_SCAN_CHECK_WPASYNC;
        let written = match proc::scan_pages_flags(
            &self.pagemap,
            m.start,
            m.end,
            scan::PAGE_IS_WRITTEN,
            0,
            flags,
        ) {
            Ok(w) => w,
            // Not registered (tracking lost for this VMA): store it all.
            Err(_) => return Ok((present, vec![])),
        };
        let n = (m.len() / PAGE_SIZE) as usize;
        let idx = |a: u64| ((a - m.start) / PAGE_SIZE) as usize;
        let mut is_written = vec![false; n];
        for (a, k) in written {
            is_written[idx(a)..idx(a) + k as usize].fill(true);
        }
        // Where the parent chain holds each page: (depth, offset).
        let mut source: Vec<Option<(u64, u64)>> = vec![None; n];
        for r in &pv.pages {
            for i in 0..r[1] {
                source[idx(r[0]) + i as usize] = Some((1, r[2] + i * PAGE_SIZE));
            }
        }
        for r in &pv.inherited {
            for i in 0..r[1] {
                source[idx(r[0]) + i as usize] = Some((r[3] + 1, r[2] + i * PAGE_SIZE));
            }
        }
        let (mut store, mut inherit): (Vec<(u64, u64)>, Vec<[u64; 4]>) = (vec![], vec![]);
        for (a, k) in present {
            for p in idx(a)..idx(a) + k as usize {
                let addr = m.start + p as u64 * PAGE_SIZE;
                match (is_written[p], source[p]) {
                    (false, Some((depth, off))) => match inherit.last_mut() {
                        Some(l)
                            if l[3] == depth
                                && l[0] + l[1] * PAGE_SIZE == addr
                                && l[2] + l[1] * PAGE_SIZE == off =>
                        {
                            l[1] += 1
                        }
                        _ => inherit.push([addr, 1, off, depth]),
                    },
                    _ => match store.last_mut() {
                        Some(l) if l.0 + l.1 * PAGE_SIZE == addr => l.1 += 1,
                        _ => store.push((addr, 1)),
                    },
                }
            }
        }
        Ok((store, inherit))
    }
}
