//! The lazy-resume pager: serves a resumed process's memory from its image
//! on demand (userfaultfd MISSING faults) while copying the rest in the
//! background, then exits once every page is in.
//!
//! What it tracks is the set of image pages not yet placed, per address
//! space (`Pending`). Every event a real program causes changes that set:
//! - a fault on a pending page copies a window of pages around it;
//!   a fault elsewhere (memory the image holds as zeros) gets a zero page;
//! - MADV_DONTNEED / munmap (REMOVE, UNMAP) drop the range, so that the
//!   program reads zeros there afterwards, never the snapshot's bytes;
//! - mremap (REMAP) moves pending pages with their range;
//! - fork (FORK) hands us a second userfaultfd for the child, whose pending
//!   set is the parent's at that instant (the kernel holds the forking
//!   process until we read the event);
//! - the process exiting ends the copies with ESRCH: its context is dropped.
//!
//! While such an event waits to be read the kernel refuses copies with
//! EAGAIN, so a copy never races a change of the address space.
//! Each 1 MiB chunk of pages.img is checked against its checksum before
//! its first use; a corrupt chunk kills the process rather than feed it
//! wrong memory.

use crate::error::{Error, Result};
use crate::image::{Image, Pages, Vma, VmaKind};
use crate::proc::PAGE_SIZE;
use crate::uffd::{self, Msg, Uffd};
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use xxhash_rust::xxh3::xxh3_64;

/// Pages copied around a faulting address (a fault costs a round trip
/// through us, so take its neighbours along).
const FAULT_WINDOW: u64 = 256 * 1024;
/// Bytes copied per background step between checks for faults.
const PREFETCH_CHUNK: u64 = 2 << 20;

/// The features a lazy resume asks of its userfaultfd.
pub const FEATURES: u64 = uffd::FEATURE_EVENT_FORK
    | uffd::FEATURE_EVENT_REMAP
    | uffd::FEATURE_EVENT_REMOVE
    | uffd::FEATURE_EVENT_UNMAP;

/// VMAs whose pages a lazy resume leaves to the pager: private anonymous
/// memory with stored pages (file and shared mappings are filled eagerly:
/// userfaultfd cannot catch missing pages of file mappings).
pub fn is_lazy(v: &Vma) -> bool {
    matches!(v.kind, VmaKind::Anon { .. })
        && !v.shared
        && !(v.pages.is_empty() && v.inherited.is_empty())
}

/// Image pages not yet placed in one address space: start address ->
/// (length, source offset: see `Source`). Extents never overlap.
#[derive(Clone, Default, Debug)]
pub struct Pending {
    map: BTreeMap<u64, (u64, u64)>,
}

impl Pending {
    /// The lazy pages of `vmas`; `bases[d]` is where the pages.img of the
    /// image's ancestor at depth d starts among the sources (0: its own).
    pub fn from_image(vmas: &[Vma], bases: &[u64]) -> Pending {
        let mut p = Pending::default();
        for v in vmas.iter().filter(|v| is_lazy(v)) {
            for r in &v.pages {
                p.map.insert(r[0], (r[1] * PAGE_SIZE, r[2]));
            }
            for r in &v.inherited {
                p.map
                    .insert(r[0], (r[1] * PAGE_SIZE, bases[r[3] as usize] + r[2]));
            }
        }
        p
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.map.values().map(|e| e.0).sum()
    }

    /// The extent holding `addr`, as (start, len, src).
    pub fn find(&self, addr: u64) -> Option<(u64, u64, u64)> {
        let (&s, &(len, src)) = self.map.range(..=addr).next_back()?;
        (addr < s + len).then_some((s, len, src))
    }

    /// Removes [start, end) and returns the pieces it held.
    pub fn take(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let first = self.find(start).map(|e| e.0).unwrap_or(start);
        let keys: Vec<u64> = self.map.range(first..end).map(|(k, _)| *k).collect();
        for s in keys {
            let (len, src) = self.map.remove(&s).expect("key");
            let (lo, hi) = (s.max(start), (s + len).min(end));
            if s < lo {
                self.map.insert(s, (lo - s, src));
            }
            if hi < s + len {
                self.map.insert(hi, (s + len - hi, src + (hi - s)));
            }
            if lo < hi {
                out.push((lo, hi - lo, src + (lo - s)));
            }
        }
        out
    }

    pub fn put(&mut self, piece: (u64, u64, u64)) {
        self.map.insert(piece.0, (piece.1, piece.2));
    }

    /// Moves the pending pages of [from, from+len) to start at `to`.
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        for (a, l, src) in self.take(from, from + len) {
            self.put((a - from + to, l, src));
        }
    }

    /// The next background piece: up to `max` bytes of the first extent at
    /// or after `from` (where the program last faulted: copy ahead of it,
    /// as readahead does), else of the first extent.
    fn next(&mut self, max: u64, from: u64) -> Option<(u64, u64, u64)> {
        let (s, len) = match self.find(from) {
            Some((s, len, _)) => (from, s + len - from),
            None => {
                let (&s, &(len, _)) = self
                    .map
                    .range(from..)
                    .next()
                    .or_else(|| self.map.iter().next())?;
                (s, len)
            }
        };
        self.take(s, s + len.min(max)).into_iter().next()
    }
}

/// One address space being served.
struct Context {
    uffd: Uffd,
    pending: Pending,
    /// Where the background copy goes next: just past the last fault.
    cursor: u64,
}

/// What a pager did, for its log.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PagerReport {
    pub faults: u64,
    pub zero_faults: u64,
    pub prefetched_bytes: u64,
    pub forks: u64,
    pub dropped_bytes: u64,
}

/// What a copy attempt found.
enum Outcome {
    Done,
    /// An address-space event must be read first; the piece was put back.
    Retry,
    /// The address space is gone.
    Gone,
}

/// One pages.img served from: the image's own, or an ancestor's (an
/// incremental image inherits pages from its parents). The sources are laid
/// end to end: a source offset `base + off` is byte `off` of this one.
struct Source {
    base: u64,
    pages: Pages,
    checksums: Vec<u64>,
    chunk: u64,
    verified: Vec<bool>,
}

impl Source {
    fn of(img: &Image, base: u64) -> Result<Source> {
        let info = &img.manifest.pages;
        Ok(Source {
            base,
            pages: img.pages()?,
            checksums: info.chunk_checksums.clone(),
            chunk: info.chunk_size.max(1),
            verified: vec![false; info.chunk_checksums.len()],
        })
    }
}

struct Pager {
    /// The image's pages, then its ancestors', parent first.
    sources: Vec<Source>,
    pid: i32,
    report: PagerReport,
}

/// Serves the process `pid` resumed from `image` through `fd` until every
/// page is in or the process is gone. Until `go` reads end-of-file (the
/// resumer closes it once the process runs), only faults are served: the
/// background copy would slow the resume itself down.
pub fn serve(
    fd: OwnedFd,
    go: Option<OwnedFd>,
    image: &Image,
    pid: i32,
    process: usize,
) -> Result<PagerReport> {
    let mut sources = vec![Source::of(image, 0)?];
    for a in image.ancestors()? {
        let base = sources.last().map_or(0, |s| s.base + s.pages.len() as u64);
        sources.push(Source::of(&a, base)?);
    }
    let bases: Vec<u64> = sources.iter().map(|s| s.base).collect();
    let proc0 = image
        .manifest
        .processes
        .get(process)
        .ok_or_else(|| Error::bad_image(&image.dir, format!("has no process {process}")))?;
    let mut pager = Pager {
        sources,
        pid,
        report: PagerReport::default(),
    };
    let mut contexts = vec![Context {
        uffd: Uffd::from_fd(fd),
        pending: Pending::from_image(&proc0.vmas, &bases),
        cursor: 0,
    }];
    let mut go = go;
    while !contexts.is_empty() {
        if let Some(g) = &go {
            if wait_for_go(&contexts, g)? {
                go = None;
            }
        }
        let prefetch = go.is_none();
        let mut i = 0;
        while i < contexts.len() {
            let alive = pager.step(&mut contexts, i, prefetch)?;
            if !alive || contexts[i].pending.is_empty() {
                // Closing the descriptor unregisters the ranges: later
                // faults are ordinary anonymous ones.
                pager.report.dropped_bytes += contexts[i].pending.bytes();
                contexts.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }
    Ok(pager.report)
}

impl Pager {
    /// Reads and handles the events of context `i`, then copies one
    /// background piece. Returns false once its address space is gone.
    fn step(&mut self, contexts: &mut Vec<Context>, i: usize, prefetch: bool) -> Result<bool> {
        let msgs = match contexts[i].uffd.read_msgs() {
            Ok(m) => m,
            Err(e) => return Err(Error::sys("read userfaultfd", e)),
        };
        for m in msgs {
            if !self.event(contexts, i, m)? {
                return Ok(false);
            }
        }
        let ctx = &mut contexts[i];
        if !prefetch {
            return Ok(true);
        }
        let Some(piece) = ctx.pending.next(PREFETCH_CHUNK, ctx.cursor) else {
            return Ok(true);
        };
        let len = piece.1;
        Ok(match self.copy(ctx, piece)? {
            Outcome::Done => {
                self.report.prefetched_bytes += len;
                true
            }
            Outcome::Retry => true,
            Outcome::Gone => false,
        })
    }

    fn event(&mut self, contexts: &mut Vec<Context>, i: usize, m: Msg) -> Result<bool> {
        let ctx = &mut contexts[i];
        match m.event {
            uffd::EVENT_PAGEFAULT => return self.fault(ctx, m.arg[1] & !(PAGE_SIZE - 1)),
            uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => {
                let dropped: u64 = ctx
                    .pending
                    .take(m.arg[0], m.arg[1])
                    .iter()
                    .map(|p| p.1)
                    .sum();
                self.report.dropped_bytes += dropped;
            }
            uffd::EVENT_REMAP => ctx.pending.remap(m.arg[0], m.arg[1], m.arg[2]),
            uffd::EVENT_FORK => {
                // SAFETY: the kernel installed this descriptor in our table for us.
                let fd = unsafe { OwnedFd::from_raw_fd(m.arg[0] as u32 as i32) };
                set_nonblocking(&fd);
                let (pending, cursor) = (ctx.pending.clone(), ctx.cursor);
                contexts.push(Context {
                    uffd: Uffd::from_fd(fd),
                    pending,
                    cursor,
                });
                self.report.forks += 1;
            }
            _ => {}
        }
        Ok(true)
    }

    /// Serves a fault at `page`: its window of pending pages, or a zero page.
    fn fault(&mut self, ctx: &mut Context, page: u64) -> Result<bool> {
        self.report.faults += 1;
        let Some((s, len, _)) = ctx.pending.find(page) else {
            self.report.zero_faults += 1;
            return Ok(match ctx.uffd.zeropage(page, PAGE_SIZE) {
                Ok(()) | Err(Errno::EEXIST) => {
                    let _ = ctx.uffd.wake(page, PAGE_SIZE);
                    true
                }
                Err(Errno::EAGAIN) => {
                    // An event is pending; the faulting thread retries after it.
                    let _ = ctx.uffd.wake(page, PAGE_SIZE);
                    true
                }
                Err(Errno::ESRCH) => false,
                Err(e) => return Err(Error::sys("UFFDIO_ZEROPAGE", e)),
            });
        };
        let lo = (page & !(FAULT_WINDOW - 1)).max(s);
        let hi = (lo + FAULT_WINDOW).min(s + len);
        ctx.cursor = hi;
        for piece in ctx.pending.take(lo, hi) {
            match self.copy(ctx, piece)? {
                Outcome::Done => {}
                Outcome::Retry => {
                    let _ = ctx.uffd.wake(page, PAGE_SIZE);
                }
                Outcome::Gone => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Places one piece (address, length, source offset). A piece never
    /// spans two sources: extents come from one image's page runs.
    fn copy(&mut self, ctx: &mut Context, piece: (u64, u64, u64)) -> Result<Outcome> {
        let (mut addr, mut len, mut src) = piece;
        let i = self.sources.partition_point(|s| s.base <= src) - 1;
        self.verify(i, src - self.sources[i].base, len)?;
        let base = self.sources[i].base;
        let pages: &[u8] = &self.sources[i].pages;
        if src - base + len > pages.len() as u64 {
            return Err(Error::Restore(format!(
                "pages at {addr:#x} point outside their image's pages.img"
            )));
        }
        while len > 0 {
            // SAFETY: src - base + len lies inside this source's pages (checked above).
            let from = unsafe { pages.as_ptr().add((src - base) as usize) };
            match ctx.uffd.copy(addr, from, len) {
                Ok(()) => return Ok(Outcome::Done),
                Err((Errno::EAGAIN, done)) => {
                    if len > done {
                        ctx.pending.put((addr + done, len - done, src + done));
                    }
                    return Ok(Outcome::Retry);
                }
                Err((Errno::EEXIST, done)) => {
                    // A page in the way is already there (the program made it
                    // through a path we do not see): skip that one page.
                    let skip = done + PAGE_SIZE;
                    if skip >= len {
                        return Ok(Outcome::Done);
                    }
                    addr += skip;
                    src += skip;
                    len -= skip;
                }
                Err((Errno::ENOENT, _)) => return Ok(Outcome::Done),
                Err((Errno::ESRCH, _)) => return Ok(Outcome::Gone),
                Err((e, _)) => {
                    return Err(Error::sys(format!("UFFDIO_COPY {addr:#x}+{len:#x}"), e))
                }
            }
        }
        Ok(Outcome::Done)
    }

    /// Checks the chunks of source `i` under [off, off+len) once each.
    fn verify(&mut self, i: usize, off: u64, len: u64) -> Result<()> {
        let s = &mut self.sources[i];
        for c in off / s.chunk..(off + len).div_ceil(s.chunk) {
            let c = c as usize;
            if s.verified.get(c).copied().unwrap_or(true) {
                continue;
            }
            let lo = c * s.chunk as usize;
            let hi = (lo + s.chunk as usize).min(s.pages.len());
            if xxh3_64(&s.pages[lo..hi]) != s.checksums[c] {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                return Err(Error::Restore(format!(
                    "pages.img chunk {c} is corrupt: the lazily resumed process {} was killed rather than given wrong memory",
                    self.pid
                )));
            }
            s.verified[c] = true;
        }
        Ok(())
    }
}

/// Blocks until a userfaultfd has something or `go` is closed; true once
/// `go` is.
fn wait_for_go(contexts: &[Context], go: &OwnedFd) -> Result<bool> {
    let mut fds: Vec<libc::pollfd> = contexts
        .iter()
        .map(|c| libc::pollfd {
            fd: c.uffd.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    fds.push(libc::pollfd {
        fd: go.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: fds is a valid array of pollfd of that length.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, -1) };
    if r < 0 && Errno::last() != Errno::EINTR {
        return Err(Error::sys("poll", Errno::last()));
    }
    Ok(fds.last().is_some_and(|g| g.revents != 0))
}

pub fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(extents: &[(u64, u64, u64)]) -> Pending {
        let mut p = Pending::default();
        for &e in extents {
            p.put(e);
        }
        p
    }

    #[test]
    fn take_splits_extents() {
        let mut p = pending(&[(0x1000, 0x4000, 0), (0x8000, 0x2000, 0x4000)]);
        let got = p.take(0x2000, 0x9000);
        assert_eq!(
            got,
            vec![(0x2000, 0x3000, 0x1000), (0x8000, 0x1000, 0x4000)]
        );
        assert_eq!(p.find(0x1000), Some((0x1000, 0x1000, 0)));
        assert_eq!(p.find(0x9000), Some((0x9000, 0x1000, 0x5000)));
        assert_eq!(p.find(0x2000), None);
        assert_eq!(p.bytes(), 0x2000);
    }

    #[test]
    fn remap_moves_pages_with_their_source() {
        let mut p = pending(&[(0x10000, 0x4000, 0x1000)]);
        p.remap(0x11000, 0x50000, 0x2000);
        assert_eq!(p.find(0x50000), Some((0x50000, 0x2000, 0x2000)));
        assert_eq!(p.find(0x11000), None);
        assert_eq!(p.find(0x13000), Some((0x13000, 0x1000, 0x4000)));
    }

    #[test]
    fn next_hands_out_everything_once() {
        let mut p = pending(&[(0, 5 << 20, 0)]);
        let mut total = 0;
        while let Some(piece) = p.next(PREFETCH_CHUNK, 3 << 20) {
            assert!(piece.1 <= PREFETCH_CHUNK);
            total += piece.1;
        }
        assert_eq!(total, 5 << 20);
    }
}
