//! Reading a process's state from /proc: maps, status, stat, fds, pagemap.
//!
//! Only parsing lives here; deciding what to save is the dump's job.

use crate::error::{Error, IoContext, Result};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

pub const PAGE_SIZE: u64 = 4096;

/// One line of /proc/PID/maps.
#[derive(Clone, Debug)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    /// The path column as printed: a file path (maybe with " (deleted)"),
    /// a pseudo name like "[heap]", or empty for anonymous memory.
    pub path: String,
}

impl MapsEntry {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

pub fn maps(pid: i32) -> Result<Vec<MapsEntry>> {
    let text = read_proc(pid, "maps")?;
    text.lines().map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Result<MapsEntry> {
    let bad = || Error::Restore(format!("unexpected /proc maps line: {line}"));
    let mut it = line.splitn(6, ' ');
    let range = it.next().ok_or_else(bad)?;
    let perms = it.next().ok_or_else(bad)?.as_bytes();
    let offset = u64::from_str_radix(it.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
    let _dev = it.next().ok_or_else(bad)?;
    let inode: u64 = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    if perms.len() < 4 {
        return Err(bad());
    }
    Ok(MapsEntry {
        start: u64::from_str_radix(s, 16).map_err(|_| bad())?,
        end: u64::from_str_radix(e, 16).map_err(|_| bad())?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset,
        inode,
        path,
    })
}

/// Reads /proc/PID/NAME, mapping "no such file" to NoSuchProcess.
pub fn read_proc(pid: i32, name: &str) -> Result<String> {
    fs::read_to_string(format!("/proc/{pid}/{name}")).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => Error::NoSuchProcess(pid),
        Some(libc::EACCES) | Some(libc::EPERM) => Error::NotPermitted(pid),
        _ => Error::io(format!("read /proc/{pid}/{name}"), e),
    })
}

/// /proc/PID/status as key -> value (trimmed).
pub fn status(pid: i32) -> Result<BTreeMap<String, String>> {
    Ok(read_proc(pid, "status")?
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

/// Numbers from a status field such as "Uid:\t0\t0\t0\t0".
pub fn status_nums(st: &BTreeMap<String, String>, key: &str) -> Vec<u64> {
    st.get(key)
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A hex status field such as "CapEff:\t000001ffffffffff".
pub fn status_hex(st: &BTreeMap<String, String>, key: &str) -> u64 {
    st.get(key)
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or(0)
}

/// The fields of /proc/PID/stat after the command name, numbered as in
/// proc(5): `stat_fields(pid)[n - 3]` is field n (field 3 is the state).
pub fn stat_fields(pid: i32) -> Result<Vec<String>> {
    let text = read_proc(pid, "stat")?;
    let after = text
        .rfind(')')
        .map(|i| &text[i + 2..])
        .ok_or_else(|| Error::Restore(format!("bad /proc/{pid}/stat")))?;
    Ok(after.split_whitespace().map(str::to_string).collect())
}

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat, as a number.
pub fn stat_field(fields: &[String], n: usize) -> u64 {
    fields
        .get(n - 3)
        .and_then(|f| f.parse::<i64>().ok())
        .unwrap_or(0) as u64
}

/// Thread ids of a process, sorted, main thread first.
pub fn threads(pid: i32) -> Result<Vec<i32>> {
    let dir = fs::read_dir(format!("/proc/{pid}/task")).map_err(|_| Error::NoSuchProcess(pid))?;
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_by_key(|&t| (t != pid, t));
    Ok(tids)
}

pub fn readlink(path: &str) -> Result<PathBuf> {
    fs::read_link(path).ctx(|| format!("readlink {path}"))
}

/// Open file descriptor numbers of a process, sorted.
pub fn fds(pid: i32) -> Result<Vec<i32>> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ctx(|| format!("list /proc/{pid}/fd"))?;
    let mut fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    Ok(fds)
}

/// /proc/PID/fdinfo/FD as key -> value.
pub fn fdinfo(pid: i32, fd: i32) -> Result<BTreeMap<String, String>> {
    Ok(read_proc(pid, &format!("fdinfo/{fd}"))?
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

/// Bits of a /proc/PID/pagemap entry (see Documentation/admin-guide/mm/pagemap.rst).
pub mod pm {
    pub const PRESENT: u64 = 1 << 63;
    pub const SWAPPED: u64 = 1 << 62;
    /// File-backed or shared-anonymous page: for a private file mapping,
    /// a present page without this bit is a private (copied-on-write) copy.
    pub const FILE: u64 = 1 << 61;
}

/// Reads the pagemap entries for [start, end).
pub fn pagemap(pagemap: &fs::File, start: u64, end: u64) -> Result<Vec<u64>> {
    let n = ((end - start) / PAGE_SIZE) as usize;
    let mut raw = vec![0u8; n * 8];
    let off = start / PAGE_SIZE * 8;
    let mut done = 0;
    while done < raw.len() {
        let got = pagemap
            .read_at(&mut raw[done..], off + done as u64)
            .ctx(|| "read pagemap".into())?;
        if got == 0 {
            break;
        }
        done += got;
    }
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// PAGEMAP_SCAN (linux/fs.h): the kernel walks the page tables and
/// returns ranges of pages by category, much faster than reading one
/// pagemap entry per page.
pub mod scan {
    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
    pub const PAGE_IS_FILE: u64 = 1 << 2;
    /// Write-protect (again) the pages that match, in the same walk.
    pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    /// Fail with EPERM unless every VMA is registered with an async-WP userfaultfd.
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
    pub const PAGE_IS_PRESENT: u64 = 1 << 3;
    pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
    /// A guard page (MADV_GUARD_INSTALL, Linux 6.13): faults, holds nothing.
    pub const PAGE_IS_GUARD: u64 = 1 << 8;
    /// _IOWR('f', 16, struct pm_scan_arg)
    pub const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;
}

/// Page ranges in [start, end) having any of `anyof` and none of `none`
/// (PAGEMAP_SCAN), as (address, page count).
pub fn scan_pages(
    pagemap: &fs::File,
    start: u64,
    end: u64,
    anyof: u64,
    none: u64,
) -> Result<Vec<(u64, u64)>> {
    scan_pages_flags(pagemap, start, end, anyof, none, 0)
}

/// Appends `pages` pages at `addr` to sorted (address, pages) runs,
/// extending the last run when this one continues it.
pub fn push_run(runs: &mut Vec<(u64, u64)>, addr: u64, pages: u64) {
    match runs.last_mut() {
        Some(l) if l.0 + l.1 * PAGE_SIZE == addr => l.1 += pages,
        _ => runs.push((addr, pages)),
    }
}

/// `scan_pages` with PAGEMAP_SCAN flags (see `scan`).
pub fn scan_pages_flags(
    pagemap: &fs::File,
    start: u64,
    end: u64,
    anyof: u64,
    none: u64,
    flags: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, pages, _) in scan_regions(pagemap, (start, end), (none, anyof, anyof), flags)? {
        push_run(&mut out, a, pages);
    }
    Ok(out)
}

/// CPUs this process may use. Asked once: the answer reads cgroup files
/// (~10 us), which a snapshot asks for every VMA while the target is frozen.
pub fn cpus() -> u64 {
    static CPUS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) as u64)
}

/// `scan_regions` over a large range in pieces walked by parallel threads
/// (walks take the address space's lock for reading, so they run at once):
/// a 1 GiB walk costs ~2.5 ms here, spent while the target is frozen.
pub fn scan_regions_parallel(
    pagemap: &fs::File,
    (start, end): (u64, u64),
    masks: (u64, u64, u64),
    flags: u64,
) -> Result<Vec<(u64, u64, u64)>> {
    // Smaller walks cost less than starting a thread (~0.3 ms here).
    const PIECE_MIN: u64 = 256 << 20;
    let threads = cpus();
    let pieces = ((end - start) / PIECE_MIN).clamp(1, threads);
    if pieces == 1 {
        return scan_regions(pagemap, (start, end), masks, flags);
    }
    // Cut on 2 MiB boundaries: a page table is walked by one thread.
    let step = ((end - start) / pieces).next_multiple_of(2 << 20);
    let bounds: Vec<(u64, u64)> = (0..pieces)
        .map(|i| (start + i * step, (start + (i + 1) * step).min(end)))
        .filter(|(a, b)| a < b)
        .collect();
    let parts: Vec<Result<Vec<(u64, u64, u64)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = bounds
            .iter()
            .map(|&b| {
                s.spawn(move || {
                    crate::ptrace::unpin_thread();
                    scan_regions(pagemap, b, masks, flags)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("page-table walk thread"))
            .collect()
    });
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for part in parts {
        for r in part? {
            // Join a region the cut split in two.
            match out.last_mut() {
                Some(l) if l.0 + l.1 * PAGE_SIZE == r.0 && l.2 == r.2 => l.1 += r.1,
                _ => out.push(r),
            }
        }
    }
    Ok(out)
}

/// One PAGEMAP_SCAN walk of [start, end): the regions of pages that have
/// none of `none` and any of `anyof`, as (address, pages, their categories
/// among `ret`). Adjacent regions differ in those categories.
pub fn scan_regions(
    pagemap: &fs::File,
    (start, end): (u64, u64),
    (none, anyof, ret): (u64, u64, u64),
    flags: u64,
) -> Result<Vec<(u64, u64, u64)>> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut regions = vec![[0u64; 3]; 512];
    let mut at = start;
    while at < end {
        // struct pm_scan_arg: size, flags, start, end, walk_end, vec, vec_len,
        // max_pages, category_inverted, category_mask, category_anyof_mask, return_mask
        let mut arg: [u64; 12] = [
            96,
            flags,
            at,
            end,
            0,
            regions.as_mut_ptr() as u64,
            regions.len() as u64,
            0,
            none,
            none,
            anyof,
            ret,
        ];
        // SAFETY: arg is a pm_scan_arg whose vec points at `regions`.
        let n = unsafe {
            libc::ioctl(
                pagemap.as_raw_fd(),
                scan::PAGEMAP_SCAN as _,
                arg.as_mut_ptr(),
            )
        };
        if n < 0 {
            return Err(Error::io("PAGEMAP_SCAN", std::io::Error::last_os_error()));
        }
        out.extend(
            regions[..n as usize]
                .iter()
                .map(|r| (r[0], (r[1] - r[0]) / PAGE_SIZE, r[2])),
        );
        let walk_end = arg[4];
        if walk_end <= at {
            break;
        }
        at = walk_end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let e = parse_maps_line(
            "7f00a0000000-7f00a0021000 r-xp 00002000 fd:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!(e.start, 0x7f00a0000000);
        assert_eq!(e.len(), 0x21000);
        assert!(e.read && e.exec && !e.write && !e.shared);
        assert_eq!(e.offset, 0x2000);
        assert_eq!(e.inode, 1234);
        assert_eq!(e.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        let a =
            parse_maps_line("7ffd1000-7ffd2000 rw-s 00000000 00:01 5 /dev/zero (deleted)").unwrap();
        assert!(a.shared);
        assert_eq!(a.path, "/dev/zero (deleted)");
        let anon = parse_maps_line("55550000-55551000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(anon.path, "");
    }

    #[test]
    fn reads_own_state() {
        let me = std::process::id() as i32;
        assert!(maps(me).unwrap().iter().any(|m| m.path == "[stack]"));
        let st = status(me).unwrap();
        assert_eq!(status_nums(&st, "Tgid"), vec![me as u64]);
        assert_eq!(threads(me).unwrap()[0], me);
        assert!(matches!(status(-5), Err(Error::NoSuchProcess(-5))));
    }
}
