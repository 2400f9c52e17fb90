//! Lazy copy-on-write snapshots: the target is stopped only while its
//! private anonymous memory is write-protected with userfaultfd; its pages
//! are then copied in the background while it runs, and a page it writes
//! first is copied just before the write goes through (copy-before-write).
//! The image is therefore the memory at the instant of the freeze.
//!
//! Why userfaultfd write-protect and not a fork of the target: protecting
//! 128 MiB takes a third of a millisecond here, whatever the page size,
//! while fork() copies page tables (6-30 ms for 1 GiB of 4 KiB pages), and
//! the forked copy would be a child of the target (a SIGCHLD or a zombie it
//! never asked for).
//!
//! The price: an unmap, MADV_DONTNEED or mremap of memory not yet copied
//! destroys the frozen contents before we can save them. Those arrive as
//! userfaultfd events; such a snapshot is abandoned (`Error::LazyConflict`)
//! and the caller takes it again. The image is never a mix of two instants.

use crate::behind::Behind;
use crate::error::{Error, Result};
use crate::image::{ImageWriter, Vma};
use crate::mem;
use crate::proc::PAGE_SIZE;
use crate::uffd::{self, Uffd};
use nix::errno::Errno;
use std::os::fd::OwnedFd;

/// Pages copied per background step (faults are served between steps).
const STEP: u64 = 2 << 20;
const _: () = assert!(STEP.is_multiple_of(crate::image::CHUNK_SIZE));
/// Pages saved around a write fault.
const FAULT_WINDOW: u64 = 64 * 1024;

/// One reserved run: `pages` pages at `addr`, to be written at `offset`.
struct Run {
    addr: u64,
    pages: u64,
    offset: u64,
    saved: Vec<bool>,
    /// Pages of the run not saved yet.
    left: u64,
    /// No page before this one is unsaved (where the next step looks).
    next: usize,
}

/// Write-protected memory of a running target, being saved.
pub struct Cow {
    uffd: Uffd,
    pid: i32,
    runs: Vec<Run>,
    ranges: Vec<(u64, u64)>,
    /// Where the background copy is: run index.
    cursor: usize,
    pub write_faults: u64,
}

impl Cow {
    /// Registers the deferred VMAs with `uffd` and write-protects their
    /// stored pages. Call while the target is frozen.
    pub fn arm(uffd: Uffd, pid: i32, vmas: &[&Vma]) -> Result<Cow> {
        uffd.api(EVENTS)?;
        let all: Vec<(u64, u64)> = vmas
            .iter()
            .flat_map(|v| v.pages.iter().map(|r| (r[0], r[1] * PAGE_SIZE)))
            .collect();
        Cow::arm_with(uffd, pid, vmas, &all)
    }

    /// Like `arm`, for a userfaultfd already through its API call that
    /// protected most pages before the freeze (`Prearm`): registers the
    /// VMAs (again) and protects only `protect`.
    pub fn arm_with(uffd: Uffd, pid: i32, vmas: &[&Vma], protect: &[(u64, u64)]) -> Result<Cow> {
        let mut runs = Vec::new();
        for v in vmas {
            uffd.register(v.start, v.len(), uffd::MODE_WP)?;
            for r in &v.pages {
                let saved = vec![false; r[1] as usize];
                runs.push(Run {
                    addr: r[0],
                    pages: r[1],
                    offset: r[2],
                    saved,
                    left: r[1],
                    next: 0,
                });
            }
        }
        for &(a, len) in protect {
            uffd.writeprotect(a, len, true)
                .map_err(|e| Error::sys("UFFDIO_WRITEPROTECT", e))?;
        }
        runs.sort_by_key(|r| r.addr);
        let ranges = vmas.iter().map(|v| (v.start, v.len())).collect();
        Ok(Cow {
            uffd,
            pid,
            runs,
            ranges,
            cursor: 0,
            write_faults: 0,
        })
    }

    pub fn bytes_left(&self) -> u64 {
        self.runs.iter().map(|r| r.left).sum::<u64>() * PAGE_SIZE
    }

    /// Copies everything (serving write faults first) into `writer`.
    pub fn run(
        &mut self,
        writer: &ImageWriter,
        progress: &dyn Fn(u64),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<()> {
        std::thread::scope(|scope| {
            let (behind, thread) = Behind::start(scope, writer, STEP as usize)?;
            let copied = self.copy_all(&behind, progress, cancelled);
            drop(behind);
            let written = thread
                .join()
                .map_err(|_| Error::Restore("image writer thread panicked".into()))?;
            // A write error explains a copy that stopped for want of buffers.
            written.and(copied)
        })
    }

    fn copy_all(
        &mut self,
        behind: &Behind,
        progress: &dyn Fn(u64),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<()> {
        loop {
            if cancelled() {
                return Err(Error::Interrupted);
            }
            self.events(behind)?;
            if !self.step(behind)? {
                break;
            }
            progress(self.bytes_left());
        }
        // Late faults queued while we finished: they only need waking.
        self.events(behind)
    }

    /// Reads and serves pending messages.
    fn events(&mut self, behind: &Behind) -> Result<()> {
        loop {
            let msgs = self
                .uffd
                .read_msgs()
                .map_err(|e| Error::sys("read userfaultfd", e))?;
            if msgs.is_empty() {
                return Ok(());
            }
            for m in msgs {
                match m.event {
                    uffd::EVENT_PAGEFAULT => {
                        self.write_faults += 1;
                        let page = m.arg[1] & !(PAGE_SIZE - 1);
                        let lo = page & !(FAULT_WINDOW - 1);
                        self.save(lo, lo + FAULT_WINDOW, behind)?;
                        self.unprotect(page, PAGE_SIZE);
                    }
                    uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => {
                        self.check_lost(m.arg[0], m.arg[1])?
                    }
                    uffd::EVENT_REMAP => self.check_lost(m.arg[0], m.arg[0] + m.arg[2])?,
                    _ => {}
                }
            }
        }
    }

    /// The target is dropping [start, end): fine if all of it is saved.
    fn check_lost(&self, start: u64, end: u64) -> Result<()> {
        for r in &self.runs {
            let (lo, hi) = (r.addr.max(start), (r.addr + r.pages * PAGE_SIZE).min(end));
            if lo < hi
                && (lo..hi)
                    .step_by(PAGE_SIZE as usize)
                    .any(|a| !r.saved[((a - r.addr) / PAGE_SIZE) as usize])
            {
                return Err(Error::LazyConflict(format!(
                    "the target unmapped or discarded memory at {lo:#x} before it was saved"
                )));
            }
        }
        Ok(())
    }

    /// Saves the unsaved pages in [lo, hi) and unprotects them.
    fn save(&mut self, lo: u64, hi: u64, behind: &Behind) -> Result<()> {
        let first = self
            .runs
            .partition_point(|r| r.addr + r.pages * PAGE_SIZE <= lo);
        for i in first..self.runs.len() {
            let r = &self.runs[i];
            if r.addr >= hi {
                break;
            }
            let (a, b) = (r.addr.max(lo), (r.addr + r.pages * PAGE_SIZE).min(hi));
            let mut at = a;
            while at < b {
                let len = (b - at).min(STEP);
                self.save_range(i, at, len, behind)?;
                at += len;
            }
        }
        Ok(())
    }

    /// Saves [at, at+len) of run `i` (len <= STEP) and unprotects it: read
    /// now, written by the `Behind` thread.
    fn save_range(&mut self, i: usize, at: u64, len: u64, behind: &Behind) -> Result<()> {
        let r = &mut self.runs[i];
        let first = ((at - r.addr) / PAGE_SIZE) as usize;
        let n = (len / PAGE_SIZE) as usize;
        if r.saved[first..first + n].iter().all(|s| *s) {
            return Ok(());
        }
        let mut buf = behind.buffer()?;
        // Unsaved pages are still write-protected: what we read is what
        // they held at the freeze.
        mem::vm_read(self.pid, &[(at, len as usize)], &mut buf[..len as usize]).map_err(
            |e| match e {
                Error::Io { source, .. } if source.raw_os_error() == Some(libc::ESRCH) => {
                    Error::Restore(format!("pid {} exited during the lazy snapshot", self.pid))
                }
                e => e,
            },
        )?;
        let mut pieces = Vec::new();
        let mut k = 0;
        while k < n {
            if r.saved[first + k] {
                k += 1;
                continue;
            }
            let mut e = k;
            while e < n && !r.saved[first + e] {
                r.saved[first + e] = true;
                e += 1;
            }
            let off = r.offset + (first + k) as u64 * PAGE_SIZE;
            pieces.push((off, k * PAGE_SIZE as usize..e * PAGE_SIZE as usize));
            r.left -= (e - k) as u64;
            k = e;
        }
        behind.write(buf, pieces)?;
        self.unprotect(at, len);
        Ok(())
    }

    fn unprotect(&self, at: u64, len: u64) {
        // ENOENT/EINVAL: the range is gone or no longer registered: nothing to wake.
        match self.uffd.writeprotect(at, len, false) {
            Ok(()) | Err(Errno::ENOENT) | Err(Errno::EINVAL) => {}
            Err(e) => tracing::debug!("unprotect {at:#x}+{len:#x}: {e}"),
        }
    }

    /// Copies the next background step; false once everything is saved.
    fn step(&mut self, behind: &Behind) -> Result<bool> {
        while self.cursor < self.runs.len() && self.runs[self.cursor].left == 0 {
            self.cursor += 1;
        }
        let Some(r) = self.runs.get_mut(self.cursor) else {
            return Ok(false);
        };
        let first = r.next
            + r.saved[r.next..]
                .iter()
                .position(|s| !s)
                .expect("a page left");
        r.next = first;
        let first = first as u64;
        let at = r.addr + first * PAGE_SIZE;
        // Steps end at STEP boundaries of pages.img, so that each writes
        // whole checksum chunks (hashed as they are written).
        let off = r.offset + first * PAGE_SIZE;
        let len = ((r.pages - first) * PAGE_SIZE).min(STEP - off % STEP);
        self.save_range(self.cursor, at, len, behind)?;
        Ok(true)
    }

    /// Releases the registration (the target is unaffected).
    pub fn disarm(self) {
        for (start, len) in &self.ranges {
            let _ = self.uffd.unregister(*start, *len);
        }
    }
}

/// The events a lazy snapshot's userfaultfd asks for.
pub const EVENTS: u64 =
    uffd::FEATURE_EVENT_REMOVE | uffd::FEATURE_EVENT_UNMAP | uffd::FEATURE_EVENT_REMAP;

/// Write protection armed while the target still runs, so that the freeze
/// itself only has to protect again what was written meanwhile: protecting
/// costs about 60 ns per 4 KiB page here, 16 ms for 1 GiB, which would
/// otherwise all be time the target is stopped.
///
/// While armed, a thread serves the target's write faults by noting the
/// page dirty and unprotecting it, and notes every range the target
/// unmapped, discarded or moved. At the freeze (`finish`), dirty pages and
/// changed or new VMAs are protected again; the rest is still protected
/// and unchanged since, so it holds the contents of the freeze instant.
pub struct Prearm {
    /// Shared with the serving thread; taken back by `finish`.
    uffd: Option<std::sync::Arc<Uffd>>,
    /// Private anonymous VMAs registered before the freeze.
    registered: Vec<(u64, u64)>,
    /// What their page tables held when protected, as (address, pages,
    /// categories) regions of present, swapped or guard pages, sorted: a
    /// page populated later was never protected.
    seen: Vec<(u64, u64, u64)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Written to wake the serving thread from its poll at once: the
    /// target is frozen while `finish` waits for it.
    wake: OwnedFd,
    thread: Option<std::thread::JoinHandle<Result<Notes>>>,
}

impl Prearm {
    fn stop_thread(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = nix::unistd::write(&self.wake, &[1]);
    }
}

impl Drop for Prearm {
    /// An abandoned snapshot: the thread drains and stops, the userfaultfd
    /// closes with its last holder, and the kernel drops the protection.
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// What the serving thread saw: dirty pages, changed ranges.
#[derive(Default)]
struct Notes {
    dirty: Vec<u64>,
    changed: Vec<(u64, u64)>,
}

impl Prearm {
    /// `uffd` belongs to the (running) target; `vmas` are its private
    /// anonymous VMAs (start, end).
    pub fn start(uffd: Uffd, pid: i32, vmas: Vec<(u64, u64)>) -> Result<Prearm> {
        uffd.api(EVENTS)?;
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| Error::io("open pagemap", e))?;
        let uffd = std::sync::Arc::new(uffd);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut registered = Vec::new();
        for &(s, e) in &vmas {
            if uffd.register(s, e - s, uffd::MODE_WP).is_ok() {
                registered.push((s, e));
            }
        }
        let (wake_rd, wake) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", e))?;
        let (u, st) = (uffd.clone(), stop.clone());
        let thread = std::thread::spawn(move || serve(&u, &st, &wake_rd));
        let mut seen = Vec::new();
        for &(s, e) in &registered {
            // Scanned before protecting: a page that appears in between is
            // protected but counted as new, and protected again (harmless).
            let masks = (0, SEEN, SEEN);
            seen.extend(crate::proc::scan_regions(&pagemap, (s, e), masks, 0).unwrap_or_default());
            // ENOENT/EINVAL: the target unmapped it meanwhile (noted as changed).
            let _ = uffd.writeprotect(s, e - s, true);
        }
        seen.sort();
        Ok(Prearm {
            uffd: Some(uffd),
            registered,
            seen,
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Call once the target is frozen: stops the serving thread and
    /// returns what it saw, for the freeze to use (`Armed`).
    pub fn stop(mut self) -> Result<Armed> {
        self.stop_thread();
        let thread = self.thread.take().expect("started");
        let notes = thread
            .join()
            .map_err(|_| Error::Restore("pre-arm thread panicked".into()))??;
        let shared = self.uffd.take().expect("started");
        let uffd = std::sync::Arc::try_unwrap(shared)
            .map_err(|_| Error::Restore("userfaultfd still shared".into()))?;
        Ok(Armed {
            uffd,
            registered: std::mem::take(&mut self.registered),
            seen: std::mem::take(&mut self.seen),
            notes,
        })
    }
}

/// The page-table regions `Prearm::start` found, which a walk at the
/// freeze need not repeat.
const SEEN: u64 = crate::proc::scan::PAGE_IS_PRESENT
    | crate::proc::scan::PAGE_IS_SWAPPED
    | crate::proc::scan::PAGE_IS_GUARD;

/// A stopped `Prearm`, the target frozen: what was protected before the
/// freeze and what changed since.
pub struct Armed {
    uffd: Uffd,
    registered: Vec<(u64, u64)>,
    seen: Vec<(u64, u64, u64)>,
    notes: Notes,
}

impl Armed {
    /// The regions (address, pages, categories among present, swapped and
    /// guard) of [start, end) that were seen before the freeze and are
    /// known to be unchanged since: None unless the range was registered
    /// throughout and nothing in it was unmapped, discarded or moved (the
    /// only ways a seen page goes; each sends an event). Pages populated
    /// since are not among them: the caller walks the rest of the range.
    pub fn unchanged(&self, start: u64, end: u64) -> Option<Vec<(u64, u64, u64)>> {
        let known = self.registered.iter().any(|&(s, e)| s <= start && end <= e);
        if !known || overlaps(start, end, &self.notes.changed) {
            return None;
        }
        let first = self
            .seen
            .partition_point(|r| r.0 + r.1 * PAGE_SIZE <= start);
        let clipped = self.seen[first..]
            .iter()
            .take_while(|r| r.0 < end)
            .map(|&(a, n, c)| {
                let (a2, e2) = (a.max(start), (a + n * PAGE_SIZE).min(end));
                (a2, (e2 - a2) / PAGE_SIZE, c)
            })
            .collect();
        Some(clipped)
    }

    /// Returns the userfaultfd and the ranges of `vmas` (the deferred VMAs
    /// of the snapshot) that must be protected again.
    pub fn finish(self, vmas: &[&Vma]) -> Result<(Uffd, Vec<(u64, u64)>)> {
        let Armed {
            uffd,
            registered,
            seen,
            notes,
        } = self;
        let present_then: Vec<(u64, u64)> =
            seen.iter().map(|&(a, n, _)| (a, n * PAGE_SIZE)).collect();
        let mut protect = Vec::new();
        for v in vmas {
            let known = registered.iter().any(|&(s, e)| s <= v.start && v.end <= e);
            if !known || overlaps(v.start, v.end, &notes.changed) {
                protect.push((v.start, v.len()));
            } else {
                let now: Vec<(u64, u64)> =
                    v.pages.iter().map(|r| (r[0], r[1] * PAGE_SIZE)).collect();
                protect.extend(subtract(&now, &present_then));
            }
        }
        // Pages written while armed, as runs (a writer moving through memory
        // dirties neighbours: one ioctl per run, not per page), less those
        // inside ranges protected whole already.
        let mut dirty = notes.dirty;
        dirty.sort_unstable();
        dirty.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in dirty {
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == p => r.1 += PAGE_SIZE,
                _ => runs.push((p, PAGE_SIZE)),
            }
        }
        let mut covered = protect.clone();
        covered.sort_unstable();
        protect.extend(subtract(&runs, &covered));
        Ok((uffd, protect))
    }
}

/// Whether [a, b) meets any of the (start, end) ranges.
fn overlaps(a: u64, b: u64, list: &[(u64, u64)]) -> bool {
    list.iter().any(|&(s, e)| s < b && a < e)
}

/// The parts of the sorted ranges `a` not covered by the sorted,
/// non-overlapping ranges `b` (both as (address, bytes)).
fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(start, len) in a {
        let (mut at, end) = (start, start + len);
        while j < b.len() && b[j].0 + b[j].1 <= at {
            j += 1;
        }
        let mut k = j;
        while at < end {
            match b.get(k) {
                Some(&(bs, bl)) if bs < end => {
                    if bs > at {
                        out.push((at, bs - at));
                    }
                    at = at.max(bs + bl);
                    k += 1;
                }
                _ => {
                    out.push((at, end - at));
                    at = end;
                }
            }
        }
    }
    out
}

/// Serves write faults (dirty + unprotect) and notes address-space changes
/// until `stop`; then drains what is left.
fn serve(uffd: &Uffd, stop: &std::sync::atomic::AtomicBool, wake: &OwnedFd) -> Result<Notes> {
    use std::os::fd::AsRawFd;
    let mut notes = Notes::default();
    loop {
        let stopping = stop.load(std::sync::atomic::Ordering::SeqCst);
        let mut p = [uffd.fd.as_raw_fd(), wake.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: two valid pollfds.
        unsafe { libc::poll(p.as_mut_ptr(), 2, if stopping { 0 } else { 100 }) };
        let msgs = uffd
            .read_msgs()
            .map_err(|e| Error::sys("read userfaultfd", e))?;
        for m in &msgs {
            match m.event {
                uffd::EVENT_PAGEFAULT => {
                    let page = m.arg[1] & !(PAGE_SIZE - 1);
                    notes.dirty.push(page);
                    let _ = uffd.writeprotect(page, PAGE_SIZE, false);
                }
                uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => notes.changed.push((m.arg[0], m.arg[1])),
                uffd::EVENT_REMAP => {
                    notes.changed.push((m.arg[0], m.arg[0] + m.arg[2]));
                    notes.changed.push((m.arg[1], m.arg[1] + m.arg[2]));
                }
                _ => {}
            }
        }
        if stopping && msgs.is_empty() {
            return Ok(notes);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn subtract_leaves_the_uncovered_parts() {
        let a = [(0x1000, 0x5000), (0x10000, 0x1000)];
        let b = [(0x2000, 0x1000), (0x4000, 0x4000)];
        assert_eq!(
            super::subtract(&a, &b),
            vec![(0x1000, 0x1000), (0x3000, 0x1000), (0x10000, 0x1000)]
        );
        assert_eq!(super::subtract(&a, &[]), a.to_vec());
    }
}
