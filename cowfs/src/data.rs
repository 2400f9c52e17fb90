//! File data by block: where each byte range of a file is read from, and
//! the raw I/O on layer data files.
//!
//! A file's bytes come, block by block, from the highest layer that holds
//! the block (the node's block map says which, so reads never walk the
//! stack), else from the base file up to `base_limit`, else zeros.

use crate::state::{Loc, Node};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Where a byte range is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Base,
    Layer(u32),
    Zero,
}

/// A byte range `start..end` of a file and its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub start: u64,
    pub end: u64,
    pub loc: Src,
}

/// Whether block `b` of the file has non-zero content below the top write.
pub fn has_data_below(n: &Node, b: u64, bs: u64) -> bool {
    match n.blocks.get(&b) {
        Some(Loc::Layer(_)) => true,
        Some(Loc::Zero) => false,
        None => n.origin.is_some() && b * bs < n.base_limit,
    }
}

/// The sources of bytes `start..end` of file `n`, merged into runs.
pub fn plan(n: &Node, start: u64, end: u64, bs: u64) -> Vec<Seg> {
    let mut out: Vec<Seg> = Vec::new();
    let mut push = |s: u64, e: u64, loc: Src| {
        if e <= s {
            return;
        }
        match out.last_mut() {
            Some(last) if last.loc == loc && last.end == s => last.end = e,
            _ => out.push(Seg {
                start: s,
                end: e,
                loc,
            }),
        }
    };
    let mut pos = start;
    while pos < end {
        let b = pos / bs;
        let bend = ((b + 1) * bs).min(end);
        match n.blocks.get(&b) {
            Some(Loc::Layer(l)) => push(pos, bend, Src::Layer(*l)),
            Some(Loc::Zero) => push(pos, bend, Src::Zero),
            None if n.origin.is_some() => {
                let limit = n.base_limit.clamp(pos, bend);
                push(pos, limit, Src::Base);
                push(limit, bend, Src::Zero);
            }
            None => push(pos, bend, Src::Zero),
        }
        pos = bend;
    }
    out
}

/// Sorted block numbers as (first, count) runs.
pub fn runs(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((first, count)) if *first + *count == b => *count += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

pub fn open_data_file(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// Read as much as the file has; the rest of `buf` is left as it is (zeros).
pub fn pread_full(f: &File, buf: &mut [u8], mut off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn pwrite_all(f: &File, buf: &[u8], off: u64) -> io::Result<()> {
    f.write_all_at(buf, off)
}

pub fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    fallocate(
        f,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off as i64,
        len as i64,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Kind, Meta, Ts};

    fn file(size: u64, origin: bool) -> Node {
        let t = Ts { sec: 0, nsec: 0 };
        let meta = Meta {
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size,
            rdev: 0,
            atime: t,
            mtime: t,
            ctime: t,
        };
        Node::new(
            meta,
            origin.then(|| "f".into()),
            if origin { size } else { 0 },
        )
    }

    #[test]
    fn plan_takes_each_block_from_its_layer() {
        let mut n = file(40, true);
        n.blocks.insert(1, Loc::Layer(3));
        n.blocks.insert(2, Loc::Zero);
        n.base_limit = 35;
        let p = plan(&n, 5, 40, 10);
        let want = vec![
            Seg {
                start: 5,
                end: 10,
                loc: Src::Base,
            },
            Seg {
                start: 10,
                end: 20,
                loc: Src::Layer(3),
            },
            Seg {
                start: 20,
                end: 30,
                loc: Src::Zero,
            },
            Seg {
                start: 30,
                end: 35,
                loc: Src::Base,
            },
            Seg {
                start: 35,
                end: 40,
                loc: Src::Zero,
            },
        ];
        assert_eq!(p, want);
        assert!(has_data_below(&n, 1, 10));
        assert!(!has_data_below(&n, 2, 10));
        assert!(!has_data_below(&n, 4, 10));
    }

    #[test]
    fn runs_merge_consecutive_blocks() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
    }
}
