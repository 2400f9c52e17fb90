//! Which pages of a process are saved, and copying them out while it is
//! frozen.
//!
//! Per VMA kind (see `image::VmaKind`):
//! - private anonymous memory: the pages pagemap shows present (or swapped);
//! - private file mappings: only the pages the process copied on write
//!   (present and not file-backed); the rest comes from the file at resume;
//! - shared memory with no file to come back from (shared anonymous, memfd,
//!   tmpfs files, deleted files): every allocated page of the object's range,
//!   read through /proc/PID/map_files with SEEK_DATA so holes stay holes and
//!   the target is not made to allocate anything;
//! - shared mappings of regular files: nothing (the file holds the data);
//! - [vdso], [vvar], [vvar_vclock], [vsyscall]: placed at resume, never saved.

use crate::behind::Behind;
use crate::error::{Error, IoContext, Result};
use crate::image::{FileId, ImageWriter, Vma, VmaKind};
use crate::mem;
use crate::proc::{self, scan, MapsEntry, PAGE_SIZE};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Bytes copied per process_vm_readv batch.
const BATCH: usize = 8 << 20;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// How the pages of one VMA are chosen.
enum Source {
    Nothing,
    /// Pages from process memory that pass the filter.
    Memory(Filter),
    /// Allocated pages of the mapped object, read through map_files.
    Object,
}

/// Which pages of a VMA hold something of the process's own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Filter {
    /// Present or swapped (anonymous memory).
    Present,
    /// Present or swapped and not the file's own page (copied on write).
    PrivateCopy,
    /// Every page (the file behind it is gone).
    All,
}

/// Decides kind and source of a VMA from its maps line.
fn classify(pid: i32, m: &MapsEntry) -> Result<(VmaKind, Source)> {
    let special = match m.path.as_str() {
        "[vdso]" => Some(VmaKind::Vdso),
        "[vvar]" => Some(VmaKind::Vvar),
        "[vvar_vclock]" => Some(VmaKind::VvarVclock),
        "[vsyscall]" => Some(VmaKind::Vsyscall),
        _ => None,
    };
    if let Some(k) = special {
        return Ok((k, Source::Nothing));
    }
    let is_file = m.inode != 0 && m.path.starts_with('/');
    if !is_file {
        if m.shared {
            return Ok((
                VmaKind::Shmem {
                    name: m.path.clone(),
                    offset: m.offset,
                    object: m.inode,
                },
                Source::Object,
            ));
        }
        return Ok((
            VmaKind::Anon {
                name: m.path.clone(),
            },
            Source::Memory(Filter::Present),
        ));
    }
    let deleted = m.path.ends_with(" (deleted)");
    let mapped = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    if m.shared {
        if deleted || on_tmpfs(&mapped) {
            return Ok((
                VmaKind::Shmem {
                    name: m.path.clone(),
                    offset: m.offset,
                    object: m.inode,
                },
                Source::Object,
            ));
        }
        let id = FileId::of(Path::new(&m.path)).ctx(|| format!("stat mapped file {}", m.path))?;
        return Ok((
            VmaKind::File {
                path: m.path.clone(),
                offset: m.offset,
                id,
            },
            Source::Nothing,
        ));
    }
    if deleted {
        // The file is gone: keep what the process sees, as anonymous memory.
        return Ok((
            VmaKind::Anon {
                name: m.path.clone(),
            },
            Source::Memory(Filter::All),
        ));
    }
    let id = FileId::of(Path::new(&m.path)).ctx(|| format!("stat mapped file {}", m.path))?;
    Ok((
        VmaKind::File {
            path: m.path.clone(),
            offset: m.offset,
            id,
        },
        Source::Memory(Filter::PrivateCopy),
    ))
}

fn on_tmpfs(path: &str) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == TMPFS_MAGIC)
}

/// Saves the memory of every VMA in `maps` into the image; returns the VMAs
/// with their page index.
/// With `defer`, the pages of private anonymous VMAs are not copied: space
/// is reserved for them in pages.img, and their indexes are returned in
/// `deferred` for a lazy snapshot to fill (see `cow`).
/// How `dump_vmas` saves private anonymous memory.
pub enum Mode<'a> {
    /// Copied into the image now, while the target is frozen.
    Copy,
    /// Space reserved in the image; copy-before-write saves it later
    /// (lazy snapshots, `cow`).
    Defer,
    /// Read into our memory now, written to the image once the target runs
    /// again: an incremental snapshot's few written pages cost the frozen
    /// target a memory copy, not a file write. Up to `STAGE_LIMIT` bytes;
    /// the rest is copied as in `Copy`.
    Stage(&'a mut Staged),
}

/// The most memory a snapshot stages in RAM (see `Mode::Stage`).
pub const STAGE_LIMIT: u64 = 256 << 20;

pub fn dump_vmas(
    pid: i32,
    maps: &[MapsEntry],
    writer: &ImageWriter,
    progress: Option<&dyn Fn(u64, u64)>,
    cancelled: &dyn Fn() -> bool,
    mode: Mode,
    prior: Prior,
) -> Result<Saved> {
    let delta = prior.delta;
    let plan = plan(pid, maps, prior)?;
    let total: u64 = plan
        .iter()
        .flat_map(|p| &p.runs)
        .map(|r| r.1 * PAGE_SIZE)
        .sum();
    // A stop-and-copy snapshot copies enough now to be worth a writer
    // thread; a lazy or incremental one copies little here.
    let threaded = matches!(mode, Mode::Copy) && total >= THREAD_MIN;
    std::thread::scope(|scope| {
        let (behind, thread) = if threaded {
            let (b, t) = Behind::start(scope, writer, BATCH)?;
            (b, Some(t))
        } else {
            (Behind::inline(writer, BATCH)?, None)
        };
        let saved = save(
            pid,
            plan,
            &behind,
            (progress, cancelled),
            mode,
            delta,
            total,
        );
        drop(behind);
        let written = thread.map_or(Ok(()), |t| {
            t.join()
                .map_err(|_| Error::Restore("image writer thread panicked".into()))?
        });
        // A write error explains a copy that stopped for want of buffers.
        written.and(saved)
    })
}

/// Copies worth a writer thread (see `behind`).
const THREAD_MIN: u64 = 16 << 20;

/// One VMA and what is to be saved of it.
struct Planned<'m> {
    m: &'m MapsEntry,
    kind: VmaKind,
    source: Source,
    runs: Runs,
    guards: Vec<[u64; 2]>,
    /// The pages written since the parent, for an incremental snapshot.
    written: Option<Runs>,
}

/// What walks made before the freeze know of the target's page tables.
#[derive(Clone, Copy, Default)]
pub struct Prior<'a> {
    /// An incremental snapshot's tracking (written pages, one walk).
    pub delta: Option<&'a crate::track::Delta>,
    /// A lazy snapshot's protection armed before the freeze: the regions
    /// it saw, where nothing changed since, are not walked again.
    pub armed: Option<&'a crate::cow::Armed>,
}

/// Finds what each VMA holds: the page-table walks.
fn plan<'m>(pid: i32, maps: &'m [MapsEntry], prior: Prior) -> Result<Vec<Planned<'m>>> {
    let Prior { delta, armed } = prior;
    let pagemap =
        File::open(format!("/proc/{pid}/pagemap")).ctx(|| format!("open /proc/{pid}/pagemap"))?;
    let mut plan = Vec::new();
    for m in maps {
        let (kind, source) = classify(pid, m)?;
        // An incremental snapshot walks a tracked VMA once for everything.
        let walked = match (&source, delta) {
            (Source::Memory(_), Some(d)) => d.walk(m),
            _ => None,
        };
        let (runs, guards, written) = match (&source, walked) {
            (_, Some(w)) => {
                let guards = w.guards.iter().map(|&(a, n)| [a, n]).collect();
                (w.present, guards, Some(w.written))
            }
            (Source::Memory(filter), None) => {
                let seen = armed
                    .filter(|_| *filter == Filter::Present)
                    .and_then(|a| a.unchanged(m.start, m.end));
                let (runs, guards) = match seen {
                    Some(seen) => memory_and_guards_since(&pagemap, m, seen)?,
                    None => memory_and_guards(&pagemap, m, *filter)?,
                };
                (runs, guards, None)
            }
            (Source::Object, None) => (object_runs(pid, m)?, guard_runs(&pagemap, m)?, None),
            (Source::Nothing, None) => (vec![], guard_runs(&pagemap, m)?, None),
        };
        plan.push(Planned {
            m,
            kind,
            source,
            runs,
            guards,
            written,
        });
    }
    Ok(plan)
}

/// Told (bytes done, bytes in all).
type Progress<'a> = Option<&'a dyn Fn(u64, u64)>;

/// Saves (or reserves, or stages) the planned pages of every VMA.
fn save(
    pid: i32,
    plan: Vec<Planned>,
    behind: &Behind,
    (progress, cancelled): (Progress, &dyn Fn() -> bool),
    mut mode: Mode,
    delta: Option<&crate::track::Delta>,
    total: u64,
) -> Result<Saved> {
    let mut done = 0u64;
    let mut vmas = Vec::with_capacity(plan.len());
    let mut deferred = Vec::new();
    for p in plan {
        if cancelled() {
            return Err(Error::Interrupted);
        }
        let m = p.m;
        let anonymous = m.inode == 0 && !m.shared && matches!(p.source, Source::Memory(_));
        let (runs, inherited) = match delta {
            Some(d) if anonymous => {
                let written = match &mut mode {
                    Mode::Stage(staged) => staged.claim(m, p.written),
                    _ => p.written,
                };
                d.split(m, p.runs, written)?
            }
            _ => (p.runs, vec![]),
        };
        let bytes: u64 = runs.iter().map(|r| r.1 * PAGE_SIZE).sum();
        let pages = match &mut mode {
            Mode::Defer if anonymous && !runs.is_empty() => {
                deferred.push(vmas.len());
                runs.iter()
                    .map(|&(a, n)| [a, n, behind.reserve(n * PAGE_SIZE)])
                    .collect()
            }
            Mode::Stage(staged) if anonymous && staged.bytes + bytes <= STAGE_LIMIT => {
                staged.read(pid, &runs, behind)?
            }
            _ => match p.source {
                Source::Object => copy_object(pid, m, &runs, behind)?,
                _ => copy_memory(pid, &runs, behind)?,
            },
        };
        done += pages.iter().map(|r| r[1] * PAGE_SIZE).sum::<u64>();
        if let Some(p) = progress {
            p(done, total);
        }
        vmas.push(Vma {
            start: m.start,
            end: m.end,
            read: m.read,
            write: m.write,
            exec: m.exec,
            shared: m.shared,
            growsdown: m.path == "[stack]",
            kind: p.kind,
            pages,
            inherited,
            guards: p.guards,
        });
    }
    Ok(Saved { vmas, deferred })
}

/// The VMAs with their page index; `deferred` lists those whose pages are
/// reserved but not yet copied.
pub struct Saved {
    pub vmas: Vec<Vma>,
    pub deferred: Vec<usize>,
}

/// Pages read from the target into our memory, each run with the offset
/// reserved for it in pages.img (see `Mode::Stage`).
#[derive(Default)]
pub struct Staged {
    /// Memory faulted in before the freeze, used first: a fresh page costs
    /// a fault (~0.3 us here), which the frozen target should not wait for.
    arena: Option<memmap2::MmapMut>,
    used: usize,
    /// (offset in pages.img, where the bytes are).
    runs: Vec<(u64, Bytes)>,
    bytes: u64,
    /// Pages read before the freeze (`pre_read`).
    pre: Option<PreRead>,
}

enum Bytes {
    Arena(std::ops::Range<usize>),
    Own(std::sync::Arc<memmap2::MmapMut>, std::ops::Range<usize>),
    /// In `PreRead::arena`.
    Pre(std::ops::Range<usize>),
}

/// An incremental snapshot's pages written since the parent, read while
/// the target still ran (`Staged::pre_read`).
struct PreRead {
    arena: memmap2::MmapMut,
    /// (address, pages, offset in `arena`), sorted and disjoint: pages whose
    /// bytes there are still those of the target.
    valid: Vec<(u64, u64, usize)>,
    /// Written since the parent, but not readable then (the target unmapped
    /// them meanwhile): to be read at the freeze, if present.
    unread: Runs,
}

impl Staged {
    /// Faults in `room` bytes of memory now, for the freeze to read into.
    fn make_room(&mut self, room: u64) -> Result<()> {
        let room = room.min(STAGE_LIMIT) as usize;
        let mut arena =
            memmap2::MmapMut::map_anon(room).ctx(|| "map memory to stage pages in".into())?;
        for i in (0..room).step_by(PAGE_SIZE as usize) {
            arena[i] = 1;
        }
        self.arena = Some(arena);
        Ok(())
    }

    /// Reads, while the target still runs, the pages written since the
    /// parent, protecting them again in the same walk (`Delta::walk`): the
    /// walk at the freeze then finds only the pages written after this one,
    /// and only those are read while the target is frozen (~1 us per page
    /// here). A page the target writes after this walk is written again for
    /// the tracker, so a read here that raced a write is always replaced.
    pub fn pre_read(&mut self, pid: i32, delta: &crate::track::Delta) -> Result<()> {
        let mut runs = Runs::new();
        for m in proc::maps(pid)? {
            if let Some(w) = delta.walk(&m) {
                runs.extend(w.written);
            }
        }
        delta.forget_rearmed();
        let total: u64 = runs.iter().map(|r| r.1 * PAGE_SIZE).sum();
        // Room for the freeze to read as much again: the target runs on
        // until then.
        self.make_room(total + (4 << 20))?;
        if total == 0 {
            return Ok(());
        }
        let mut arena = memmap2::MmapMut::map_anon(total as usize)
            .ctx(|| "map memory to read written pages in".into())?;
        let (mut valid, mut unread, mut off) = (Vec::new(), Runs::new(), 0usize);
        let ranges: Vec<(u64, usize)> = runs
            .iter()
            .map(|&(a, n)| (a, (n * PAGE_SIZE) as usize))
            .collect();
        if mem::vm_read(pid, &ranges, &mut arena).is_ok() {
            for &(a, n) in &runs {
                valid.push((a, n, off));
                off += (n * PAGE_SIZE) as usize;
            }
        } else {
            // Something was unmapped meanwhile: run by run, and what fails
            // is read at the freeze.
            for (&(a, n), &r) in runs.iter().zip(&ranges) {
                match mem::vm_read(pid, &[r], &mut arena[off..off + r.1]) {
                    Ok(()) => valid.push((a, n, off)),
                    Err(_) => unread.push((a, n)),
                }
                off += r.1;
            }
        }
        self.pre = Some(PreRead {
            arena,
            valid,
            unread,
        });
        Ok(())
    }

    /// The pages of `m` written since the parent, given `fresh`, those the
    /// walk at the freeze found written since `pre_read` (None: `m` was not
    /// walked, and nothing read before stands for it). Forgets the bytes
    /// read before of the pages written again.
    fn claim(&mut self, m: &MapsEntry, fresh: Option<Runs>) -> Option<Runs> {
        let Some(pre) = &mut self.pre else {
            return fresh;
        };
        let inside = |a: u64, n: u64| a < m.end && m.start < a + n * PAGE_SIZE;
        let Some(fresh) = fresh else {
            // Its pages are all taken from the target now; a run reaching
            // into a neighbour (split since) is read now for that one too.
            let (gone, keep) = pre.valid.iter().partition(|r| inside(r.0, r.1));
            pre.valid = keep;
            pre.unread
                .extend(gone.iter().map(|r: &(u64, u64, usize)| (r.0, r.1)));
            return None;
        };
        pre.valid = subtract_pages(&pre.valid, &fresh);
        let mut all: Runs = fresh;
        all.extend(
            pre.valid
                .iter()
                .filter(|r| inside(r.0, r.1))
                .map(|r| (r.0, r.1)),
        );
        all.extend(pre.unread.iter().copied().filter(|r| inside(r.0, r.1)));
        all.sort_unstable();
        let mut merged = Runs::new();
        for (a, n) in all {
            match merged.last_mut() {
                Some(l) if l.0 + l.1 * PAGE_SIZE >= a => {
                    let end = (l.0 + l.1 * PAGE_SIZE).max(a + n * PAGE_SIZE);
                    l.1 = (end - l.0) / PAGE_SIZE;
                }
                _ => merged.push((a, n)),
            }
        }
        Some(merged)
    }

    /// Reserves image space for `runs` and stages their bytes: those read
    /// before the freeze and still valid from there, the rest read now;
    /// returns their page index entries.
    fn read(&mut self, pid: i32, runs: &[(u64, u64)], behind: &Behind) -> Result<Vec<[u64; 3]>> {
        let total: u64 = runs.iter().map(|r| r.1 * PAGE_SIZE).sum();
        if total == 0 {
            return Ok(vec![]);
        }
        let mut off = behind.reserve(total);
        let mut index = Vec::with_capacity(runs.len());
        // (address, bytes, offset in pages.img) of the pages to read now.
        let mut now: Vec<(u64, usize, u64)> = Vec::new();
        for &(a, n) in runs {
            index.push([a, n, off]);
            for (a, len, pre) in self.sources(a, n) {
                match pre {
                    Some(from) => self.runs.push((off, Bytes::Pre(from..from + len))),
                    None => now.push((a, len, off)),
                }
                off += len as u64;
            }
        }
        self.read_now(pid, &now)?;
        self.bytes += total;
        Ok(index)
    }

    /// Splits `n` pages at `a` into (address, bytes, offset in the
    /// pre-read arena if its bytes are valid there).
    fn sources(&self, a: u64, n: u64) -> Vec<(u64, usize, Option<usize>)> {
        let end = a + n * PAGE_SIZE;
        let valid = self.pre.as_ref().map_or(&[][..], |p| &p.valid[..]);
        let first = valid.partition_point(|r| r.0 + r.1 * PAGE_SIZE <= a);
        let mut out = Vec::new();
        let mut at = a;
        for &(va, vn, voff) in valid[first..].iter().take_while(|r| r.0 < end) {
            let (lo, hi) = (va.max(at), (va + vn * PAGE_SIZE).min(end));
            if lo > at {
                out.push((at, (lo - at) as usize, None));
            }
            out.push((lo, (hi - lo) as usize, Some(voff + (lo - va) as usize)));
            at = hi;
        }
        if at < end {
            out.push((at, (end - at) as usize, None));
        }
        out
    }

    /// Reads `(address, bytes, image offset)` pieces from the target into
    /// the arena (or, past its room, fresh memory) in one batch.
    fn read_now(&mut self, pid: i32, now: &[(u64, usize, u64)]) -> Result<()> {
        let total: usize = now.iter().map(|p| p.1).sum();
        if total == 0 {
            return Ok(());
        }
        let ranges: Vec<(u64, usize)> = now.iter().map(|p| (p.0, p.1)).collect();
        let (from, to) = (self.used, self.used + total);
        let (mut at, own) = match &mut self.arena {
            Some(arena) if to <= arena.len() => {
                mem::vm_read(pid, &ranges, &mut arena[from..to])?;
                self.used = to;
                (from, None)
            }
            _ => {
                let mut own = memmap2::MmapMut::map_anon(total)
                    .ctx(|| "map memory to stage pages in".into())?;
                mem::vm_read(pid, &ranges, &mut own)?;
                // One map for all the pieces, each written from its part.
                (0, Some(std::sync::Arc::new(own)))
            }
        };
        for &(_, len, img) in now {
            let range = at..at + len;
            let bytes = match &own {
                Some(own) => Bytes::Own(own.clone(), range),
                None => Bytes::Arena(range),
            };
            self.runs.push((img, bytes));
            at += len;
        }
        Ok(())
    }

    /// Writes the staged pages to the image (the target may run by now).
    pub fn write(self, writer: &ImageWriter) -> Result<()> {
        for (at, bytes) in &self.runs {
            let data: &[u8] = match bytes {
                Bytes::Arena(r) => &self.arena.as_ref().expect("arena")[r.clone()],
                Bytes::Own(m, r) => &m[r.clone()],
                Bytes::Pre(r) => &self.pre.as_ref().expect("pre-read").arena[r.clone()],
            };
            writer.write_at(*at, data)?;
        }
        Ok(())
    }
}

/// The pages of `valid` (address, pages, arena offset) outside the sorted
/// (address, pages) runs `cut`, offsets kept.
fn subtract_pages(valid: &[(u64, u64, usize)], cut: &[(u64, u64)]) -> Vec<(u64, u64, usize)> {
    let mut out = Vec::new();
    for &(a, n, off) in valid {
        let end = a + n * PAGE_SIZE;
        let first = cut.partition_point(|c| c.0 + c.1 * PAGE_SIZE <= a);
        let mut at = a;
        for &(ca, cn) in cut[first..].iter().take_while(|c| c.0 < end) {
            if ca > at {
                out.push((at, (ca - at) / PAGE_SIZE, off + (at - a) as usize));
            }
            at = at.max(ca + cn * PAGE_SIZE);
        }
        if at < end {
            out.push((at, (end - at) / PAGE_SIZE, off + (at - a) as usize));
        }
    }
    out
}

/// (address, pages) runs.
type Runs = Vec<(u64, u64)>;

/// Runs (address, pages) of the VMA that pass `filter`, and its guard
/// pages, found in one walk of its page table where one will do (a walk
/// of 128 MiB costs about 0.2 ms, spent while the target is frozen).
fn memory_and_guards(
    pagemap: &File,
    m: &MapsEntry,
    filter: Filter,
) -> Result<(Runs, Vec<[u64; 2]>)> {
    let prot_none = !m.read && !m.write && !m.exec && m.path.is_empty();
    if m.path == "[vsyscall]" || prot_none {
        // PROT_NONE anonymous memory (guard pages) is never populated.
        return Ok((vec![], guard_runs(pagemap, m)?));
    }
    if filter == Filter::All {
        return Ok((
            vec![(m.start, m.len() / PAGE_SIZE)],
            guard_runs(pagemap, m)?,
        ));
    }
    let data = scan::PAGE_IS_PRESENT | scan::PAGE_IS_SWAPPED;
    let anyof = data | scan::PAGE_IS_GUARD;
    // Asking whether a page is a file's costs a lookup per page: only when
    // those are to be skipped.
    let file = match filter {
        Filter::PrivateCopy => scan::PAGE_IS_FILE,
        _ => 0,
    };
    let regions =
        proc::scan_regions_parallel(pagemap, (m.start, m.end), (0, anyof, anyof | file), 0)?;
    Ok(runs_and_guards(regions, file))
}

/// Splits walked regions (sorted) into the runs of pages to save and the
/// guard pages, leaving out pages with any of `skip`.
fn runs_and_guards(regions: Vec<(u64, u64, u64)>, skip: u64) -> (Runs, Vec<[u64; 2]>) {
    let data = scan::PAGE_IS_PRESENT | scan::PAGE_IS_SWAPPED;
    // Guard pages show as swapped, but reading one faults: never saved.
    let skip = scan::PAGE_IS_GUARD | skip;
    let (mut runs, mut guards) = (Vec::new(), Vec::new());
    for (a, n, cats) in regions {
        if cats & scan::PAGE_IS_GUARD != 0 {
            proc::push_run(&mut guards, a, n);
        } else if cats & data != 0 && cats & skip == 0 {
            proc::push_run(&mut runs, a, n);
        }
    }
    (runs, guards.into_iter().map(|(a, n)| [a, n]).collect())
}

/// `memory_and_guards` of an anonymous VMA (`Filter::Present`) from the
/// regions a walk before the freeze saw and that stayed as they were
/// (`cow::Armed::unchanged`): only the rest of the VMA, where pages may
/// have appeared since, is walked now. A walk costs ~20 ns per page here,
/// time the target is stopped; the rest is usually a few page tables.
fn memory_and_guards_since(
    pagemap: &File,
    m: &MapsEntry,
    seen: Vec<(u64, u64, u64)>,
) -> Result<(Runs, Vec<[u64; 2]>)> {
    // Past this many gaps, one walk of the VMA is cheaper than one per gap.
    const GAPS_MAX: usize = 64;
    let mut gaps = Vec::new();
    let mut at = m.start;
    for &(a, n, _) in &seen {
        if a > at {
            gaps.push((at, a));
        }
        at = a + n * PAGE_SIZE;
    }
    if at < m.end {
        gaps.push((at, m.end));
    }
    if gaps.len() > GAPS_MAX {
        return memory_and_guards(pagemap, m, Filter::Present);
    }
    let anyof = scan::PAGE_IS_PRESENT | scan::PAGE_IS_SWAPPED | scan::PAGE_IS_GUARD;
    let mut regions = seen;
    for g in gaps {
        regions.extend(proc::scan_regions(pagemap, g, (0, anyof, anyof), 0)?);
    }
    regions.sort_unstable();
    Ok(runs_and_guards(regions, 0))
}

/// Guard pages of the VMA, as [address, page count].
fn guard_runs(pagemap: &File, m: &MapsEntry) -> Result<Vec<[u64; 2]>> {
    if m.path == "[vsyscall]" {
        return Ok(vec![]);
    }
    let runs = proc::scan_pages(pagemap, m.start, m.end, scan::PAGE_IS_GUARD, 0)?;
    Ok(runs.into_iter().map(|(a, n)| [a, n]).collect())
}

/// Runs of allocated pages of a shared object, found with SEEK_DATA/SEEK_HOLE
/// on the mapped file (holes are not stored).
fn object_runs(pid: i32, m: &MapsEntry) -> Result<Vec<(u64, u64)>> {
    let f = open_mapped(pid, m)?;
    let size = f.metadata().ctx(|| "stat mapped object".into())?.len();
    let (lo, hi) = (
        m.offset,
        (m.offset + m.len()).min(size.div_ceil(PAGE_SIZE) * PAGE_SIZE),
    );
    let mut runs = Vec::new();
    let mut pos = lo;
    while pos < hi {
        let data = match seek(&f, pos, libc::SEEK_DATA) {
            Some(d) if d < hi => d / PAGE_SIZE * PAGE_SIZE,
            _ => break,
        };
        let hole = seek(&f, data, libc::SEEK_HOLE)
            .unwrap_or(hi)
            .min(hi)
            .div_ceil(PAGE_SIZE)
            * PAGE_SIZE;
        let hole = hole.min(hi).max(data + PAGE_SIZE);
        runs.push((m.start + (data - m.offset), (hole - data) / PAGE_SIZE));
        pos = hole;
    }
    Ok(runs)
}

fn open_mapped(pid: i32, m: &MapsEntry) -> Result<File> {
    let p = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    File::open(&p).ctx(|| format!("open {p} (needs root)"))
}

fn seek(f: &File, off: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    (r >= 0).then_some(r as u64)
}

/// Copies runs of the process's memory into the image: read here in
/// buffers of up to BATCH bytes (one process_vm_readv each), written by
/// `behind`.
fn copy_memory(pid: i32, runs: &[(u64, u64)], behind: &Behind) -> Result<Vec<[u64; 3]>> {
    let mut c = Copier {
        pid,
        batch: Vec::new(),
        fill: 0,
        out: Vec::new(),
    };
    for &(addr, pages) in runs {
        let mut a = addr;
        let mut left = (pages * PAGE_SIZE) as usize;
        while left > 0 {
            let take = left.min(BATCH - c.fill);
            c.batch.push((a, take));
            c.fill += take;
            a += take as u64;
            left -= take;
            if c.fill == BATCH {
                c.flush(behind)?;
            }
        }
    }
    c.flush(behind)?;
    Ok(c.out)
}

/// Ranges of one process_vm_readv being gathered, and the index so far.
struct Copier {
    pid: i32,
    batch: Vec<(u64, usize)>,
    fill: usize,
    out: Vec<[u64; 3]>,
}

impl Copier {
    fn flush(&mut self, behind: &Behind) -> Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let mut buf = behind.buffer()?;
        mem::vm_read(self.pid, &self.batch, &mut buf[..self.fill])?;
        let mut off = behind.reserve(self.fill as u64);
        behind.write(buf, vec![(off, 0..self.fill)])?;
        for &(addr, len) in &self.batch {
            let n = len as u64 / PAGE_SIZE;
            match self.out.last_mut() {
                Some(r) if r[0] + r[1] * PAGE_SIZE == addr && r[2] + r[1] * PAGE_SIZE == off => {
                    r[1] += n
                }
                _ => self.out.push([addr, n, off]),
            }
            off += len as u64;
        }
        self.batch.clear();
        self.fill = 0;
        Ok(())
    }
}

/// Copies runs of a shared object (through map_files) into the image.
fn copy_object(
    pid: i32,
    m: &MapsEntry,
    runs: &[(u64, u64)],
    behind: &Behind,
) -> Result<Vec<[u64; 3]>> {
    let f = open_mapped(pid, m)?;
    let mut out = Vec::new();
    for &(addr, pages) in runs {
        let mut done = 0u64;
        let total = pages * PAGE_SIZE;
        while done < total {
            let mut buf = behind.buffer()?;
            let take = (total - done).min(buf.len() as u64) as usize;
            let file_off = m.offset + (addr - m.start) + done;
            let chunk = &mut buf[..take];
            chunk.fill(0);
            let mut got = 0;
            while got < take {
                match f.read_at(&mut chunk[got..], file_off + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io("read shared memory object", e)),
                }
            }
            let off = behind.reserve(take as u64);
            behind.write(buf, vec![(off, 0..take)])?;
            out.push([addr + done, take as u64 / PAGE_SIZE, off]);
            done += take as u64;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    const P: u64 = PAGE_SIZE;

    #[test]
    fn pages_written_again_leave_the_pre_read_with_their_offsets_kept() {
        // Runs of 4 and 2 pages read at arena offsets 0 and 4 pages.
        let valid = [(0x10000, 4, 0), (0x40000, 2, 4 * P as usize)];
        // Pages 2 of the first run, and the whole second run, were written again.
        let cut = [(0x10000 + 2 * P, 1), (0x40000, 2)];
        assert_eq!(
            subtract_pages(&valid, &cut),
            vec![(0x10000, 2, 0), (0x10000 + 3 * P, 1, 3 * P as usize)]
        );
        assert_eq!(subtract_pages(&valid, &[]), valid.to_vec());
    }

    #[test]
    fn a_run_takes_each_page_from_the_pre_read_where_it_is_valid() {
        let staged = Staged {
            pre: Some(PreRead {
                arena: memmap2::MmapMut::map_anon(4 * P as usize).unwrap(),
                valid: vec![(0x10000 + P, 2, 8 * P as usize)],
                unread: vec![],
            }),
            ..Default::default()
        };
        assert_eq!(
            staged.sources(0x10000, 4),
            vec![
                (0x10000, P as usize, None),
                (0x10000 + P, 2 * P as usize, Some(8 * P as usize)),
                (0x10000 + 3 * P, P as usize, None),
            ]
        );
        assert_eq!(
            staged.sources(0x10000 + 2 * P, 1),
            vec![(0x10000 + 2 * P, P as usize, Some(9 * P as usize))]
        );
        assert_eq!(Staged::default().sources(0, 1), vec![(0, P as usize, None)]);
    }
}
