//! The per-chunk checksums of pages.img, computed from the bytes as they are
//! written, in whatever order they come.
//!
//! A lazy snapshot writes its pages out of order (write faults first, then
//! the rest), and xxh3 of a chunk needs the chunk's bytes in order. Reading
//! the whole file back at the end cost a quarter of a lazy 1 GiB snapshot's
//! time, so instead: a chunk written whole in one piece is hashed at once;
//! the pieces of other chunks are gathered in memory until the chunk is
//! complete, then hashed. At most `GATHER_LIMIT` chunks are gathered at a
//! time; a chunk beyond that (or written twice over, which the writers never
//! do) is hashed from the file at the end instead.

use super::CHUNK_SIZE;
use crate::error::{IoContext, Result};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use xxhash_rust::xxh3::xxh3_64;

/// Chunks gathered at once (1 MiB of memory each).
const GATHER_LIMIT: usize = 64;

#[derive(Default)]
pub struct Sums {
    done: HashMap<u64, u64>,
    partial: HashMap<u64, Partial>,
    from_file: BTreeSet<u64>,
}

struct Partial {
    bytes: Vec<u8>,
    filled: u64,
}

impl Sums {
    /// Takes note of `data` written at `off`.
    pub fn note(&mut self, off: u64, data: &[u8]) {
        let (mut at, mut rest) = (off, data);
        while !rest.is_empty() {
            let (idx, within) = (at / CHUNK_SIZE, at % CHUNK_SIZE);
            let take = rest.len().min((CHUNK_SIZE - within) as usize);
            self.piece(idx, within, &rest[..take]);
            at += take as u64;
            rest = &rest[take..];
        }
    }

    fn piece(&mut self, idx: u64, within: u64, piece: &[u8]) {
        if within == 0 && piece.len() as u64 == CHUNK_SIZE {
            self.done.insert(idx, xxh3_64(piece));
            return;
        }
        if self.from_file.contains(&idx) {
            return;
        }
        if !self.partial.contains_key(&idx) && self.partial.len() >= GATHER_LIMIT {
            self.from_file.insert(idx);
            return;
        }
        let p = self.partial.entry(idx).or_insert_with(|| Partial {
            bytes: vec![0; CHUNK_SIZE as usize],
            filled: 0,
        });
        let at = within as usize;
        p.bytes[at..at + piece.len()].copy_from_slice(piece);
        p.filled += piece.len() as u64;
        if p.filled == CHUNK_SIZE {
            self.done.insert(idx, xxh3_64(&p.bytes));
            self.partial.remove(&idx);
        } else if p.filled > CHUNK_SIZE {
            self.partial.remove(&idx);
            self.from_file.insert(idx);
        }
    }

    /// The checksum of every chunk of a file of `len` bytes; chunks not seen
    /// whole are read from `file`.
    pub fn finish(&self, len: u64, file: &File) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for idx in 0..len.div_ceil(CHUNK_SIZE) {
            let n = (len - idx * CHUNK_SIZE).min(CHUNK_SIZE);
            let known = match (self.done.get(&idx), self.partial.get(&idx)) {
                (Some(&s), _) if n == CHUNK_SIZE => Some(s),
                (None, Some(p)) if p.filled == n && !self.from_file.contains(&idx) => {
                    Some(xxh3_64(&p.bytes[..n as usize]))
                }
                _ => None,
            };
            let sum = match known {
                Some(s) => s,
                None => {
                    let mut buf = vec![0u8; n as usize];
                    file.read_exact_at(&mut buf, idx * CHUNK_SIZE)
                        .ctx(|| "read pages.img back for its checksums".into())?;
                    xxh3_64(&buf)
                }
            };
            out.push(sum);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes `data` in `pieces` (offset, length) in the given order, both
    /// to a file and to `Sums`; the sums must equal those of the bytes.
    fn check(data: &[u8], pieces: &[(usize, usize)]) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0u8; data.len()]).unwrap();
        let mut s = Sums::default();
        for &(off, len) in pieces {
            f.write_all_at(&data[off..off + len], off as u64).unwrap();
            s.note(off as u64, &data[off..off + len]);
        }
        let want: Vec<u64> = data.chunks(CHUNK_SIZE as usize).map(xxh3_64).collect();
        assert_eq!(s.finish(data.len() as u64, &f).unwrap(), want);
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn in_order_whole_and_tail() {
        let c = CHUNK_SIZE as usize;
        let d = data(3 * c + 8192);
        check(&d, &[(0, 2 * c), (2 * c, c + 8192)]);
    }

    #[test]
    fn out_of_order_pieces_across_chunks() {
        let c = CHUNK_SIZE as usize;
        let d = data(2 * c);
        let page = 4096;
        let mut pieces: Vec<(usize, usize)> = (0..2 * c / page).map(|i| (i * page, page)).collect();
        pieces.reverse();
        pieces.swap(3, 400);
        check(&d, &pieces);
        // A piece straddling a chunk boundary.
        check(
            &d,
            &[(c - page, 2 * page), (0, c - page), (c + page, c - page)],
        );
    }

    #[test]
    fn beyond_the_gather_limit_reads_the_file() {
        let c = CHUNK_SIZE as usize;
        let n = GATHER_LIMIT + 3;
        let d = data(n * c);
        // The first page of every chunk, then the rest of each.
        let mut pieces: Vec<(usize, usize)> = (0..n).map(|i| (i * c, 4096)).collect();
        pieces.extend((0..n).map(|i| (i * c + 4096, c - 4096)));
        check(&d, &pieces);
    }

    #[test]
    fn unwritten_holes_read_as_zeros() {
        let c = CHUNK_SIZE as usize;
        let mut d = data(c);
        d[4096..8192].fill(0);
        check(&d, &[(0, 4096), (8192, c - 8192)]);
    }
}
