//! The fsync log of the top layer: how a small fsync costs one cache flush
//! instead of two file system journal commits.
//!
//! Without it, fsync makes the written blocks durable in their data files
//! (a new data file or a newly allocated block: an ext4 journal commit),
//! then the layer journal that names them (it grew: another commit), 1-5 ms
//! on this machine. With it, when few blocks are dirty, fsync writes those
//! blocks and the pending journal records into this preallocated file,
//! whose blocks are already allocated and written, so its fdatasync
//! changes no file system metadata: a data write and a cache flush. The
//! data files and the journal get the same bytes with plain writes, made
//! durable later by a full sync (a bigger fsync, a checkpoint, unmount, a
//! full log), which then resets the log. After a crash, `recover` replays
//! the log's committed batches into the data files and the journal before
//! the store is read.
//!
//! ```text
//! [0, 4096)      header: "cowfswal" | u32 version | u64 generation | u64 xxh3 of the 20 bytes before
//! [4096, SIZE)   frames: u32 body length | u32 kind | u64 xxh3(generation, kind, body) | body
//!                  kind 1, a block: u64 inode | u64 offset | bytes (its content in the data file)
//!                  kind 2, journal records: u64 offset in the journal | bytes
//!                  kind 3, commit: ends the batch of one fsync (empty body)
//! ```
//! The generation in each frame's checksum makes a reset O(1): frames of
//! earlier generations fail their checksum and read as the end. Only
//! batches closed by a commit frame are replayed: a batch torn by a crash
//! was never acknowledged. Within a batch the blocks come before the
//! journal records that name them.

use crate::disk::{self, Layout};
use crate::error::{Context, Error, Result};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

const MAGIC: &[u8; 8] = b"cowfswal";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const FRAME: usize = 16;
/// The size of the log, written with zeros once, when the store is made:
/// a checkpoint or rollback hands the (empty) log on to the new top layer
/// with a rename, so writing it again is never on anyone's clock, nor
/// beside a first fsync (a 2 MiB write and fsync made one wait 3-5 ms).
pub const SIZE: u64 = 2 << 20;
/// The largest batch fsync logs; a bigger one takes the full sync, whose
/// cost no longer dominates (it moves that much data anyway).
pub const BATCH_MAX: u64 = 512 << 10;

const KIND_BLOCK: u32 = 1;
const KIND_JOURNAL: u32 = 2;
const KIND_COMMIT: u32 = 3;

/// One piece of a logged fsync.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    /// Bytes of the data file of `ino` in the top layer, at `off`.
    Block { ino: u64, off: u64, bytes: Vec<u8> },
    /// Bytes of the layer journal at `off` (whole records).
    Journal { off: u64, bytes: Vec<u8> },
}

impl Entry {
    /// Its frame kind and body.
    fn encode(&self) -> (u32, Vec<u8>) {
        let (kind, words, bytes) = match self {
            Entry::Block { ino, off, bytes } => (KIND_BLOCK, vec![*ino, *off], bytes),
            Entry::Journal { off, bytes } => (KIND_JOURNAL, vec![*off], bytes),
        };
        let mut body = Vec::with_capacity(8 * words.len() + bytes.len());
        for w in words {
            body.extend_from_slice(&w.to_le_bytes());
        }
        body.extend_from_slice(bytes);
        (kind, body)
    }

    /// Bytes this entry takes in the log.
    pub fn frame_len(bytes: usize) -> u64 {
        (FRAME + 16 + bytes) as u64
    }
}

/// The open log of the top layer.
pub struct Wal {
    path: PathBuf,
    file: File,
    generation: u64,
    /// Where the next batch goes.
    pos: u64,
}

impl Wal {
    /// Open the log of a layer, making it first if the layer has none
    /// (layers made by older versions). Its content must have been
    /// recovered: the writer starts a new generation.
    pub fn open(path: &Path) -> Result<Wal> {
        if !is_whole(path) {
            create(path)?;
        }
        let file = open_rw(path)?;
        let header = read_header(&file);
        let mut wal = Wal {
            path: path.to_owned(),
            file,
            // After a torn header, a generation no earlier frame can have.
            generation: header.unwrap_or_else(unused_generation),
            pos: HEADER,
        };
        // A new generation only if old frames would still read as valid:
        // a fresh log (a checkpoint's or rollback's new layer) needs no
        // fdatasync here.
        if header.is_none() || wal.first_frame_valid() {
            wal.reset()?;
        }
        Ok(wal)
    }

    /// Bytes left for batches.
    pub fn room(&self) -> u64 {
        SIZE - self.pos
    }

    /// Whether no batch was logged since the last reset.
    pub fn is_empty(&self) -> bool {
        self.pos == HEADER
    }

    /// Log one fsync's entries and make them durable (one fdatasync).
    pub fn append(&mut self, batch: &[Entry]) -> Result<()> {
        let mut buf = Vec::new();
        for e in batch {
            let (kind, body) = e.encode();
            self.frame(&mut buf, kind, &body);
        }
        self.frame(&mut buf, KIND_COMMIT, &[]);
        if self.pos + buf.len() as u64 > SIZE {
            return Err(Error::Io {
                context: format!("log {}", self.path.display()),
                source: io::Error::new(ErrorKind::StorageFull, "batch does not fit"),
            });
        }
        let written = self
            .file
            .write_all_at(&buf, self.pos)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Frames of this failed batch may be on disk, valid, past where
            // the next batch would end: no more batches in this generation
            // (the next fsync is full, and resets).
            self.pos = SIZE;
            return Err(e).at("write", &self.path);
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn first_frame_valid(&self) -> bool {
        matches!(frame_at(&self.file, HEADER, self.generation), Ok(Some(_)))
    }

    fn frame(&self, out: &mut Vec<u8>, kind: u32, body: &[u8]) {
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&checksum(self.generation, kind, body).to_le_bytes());
        out.extend_from_slice(body);
    }

    /// Hand the log on to the new top layer (`path`), emptied first if it
    /// holds batches (of a layer a rollback drops). A crash before the
    /// rename is durable leaves the new top without a log: mount makes one.
    pub fn move_to(&mut self, path: &Path) -> Result<()> {
        if !self.is_empty() {
            self.reset()?;
        }
        std::fs::rename(&self.path, path).at("rename", &self.path)?;
        self.path = path.to_owned();
        Ok(())
    }

    /// Forget every batch (their content is durable elsewhere now): a new
    /// generation, one header write and fdatasync.
    pub fn reset(&mut self) -> Result<()> {
        self.generation += 1;
        self.file
            .write_all_at(&header(self.generation), 0)
            .at("write", &self.path)?;
        self.file.sync_data().at("fsync", &self.path)?;
        self.pos = HEADER;
        Ok(())
    }
}

/// A generation from the clock, far from any a log counted up to.
fn unused_generation() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(1 << 62, |d| d.as_nanos() as u64)
}

fn checksum(generation: u64, kind: u32, body: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&generation.to_le_bytes());
    h.update(&kind.to_le_bytes());
    h.update(body);
    h.digest()
}

fn header(generation: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&generation.to_le_bytes());
    let sum = xxh3_64(&h);
    h.extend_from_slice(&sum.to_le_bytes());
    h.resize(HEADER as usize, 0);
    h
}

/// The generation in the header, `None` when it is not a valid header (a
/// torn reset: every batch it dropped was durable elsewhere already).
fn read_header(f: &File) -> Option<u64> {
    let mut h = [0u8; 28];
    f.read_exact_at(&mut h, 0).ok()?;
    let generation = u64::from_le_bytes(h[12..20].try_into().unwrap());
    let sum = u64::from_le_bytes(h[20..28].try_into().unwrap());
    let ok = &h[..8] == MAGIC
        && u32::from_le_bytes(h[8..12].try_into().unwrap()) == VERSION
        && xxh3_64(&h[..20]) == sum;
    ok.then_some(generation)
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .at("open", path)
}

fn is_whole(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == SIZE)
}

/// Make a log: written with zeros to its full size and made durable, so
/// that later writes into it change no file system metadata.
pub fn create(path: &Path) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .at("create", path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < SIZE {
        f.write_all_at(&zeros, off).at("write", path)?;
        off += zeros.len() as u64;
    }
    f.write_all_at(&header(1), 0).at("write", path)?;
    f.sync_all().at("fsync", path)?;
    if let Some(dir) = path.parent() {
        disk::sync_dir(dir)?;
    }
    Ok(())
}

/// Give layer `to` (the new top) the log of layer `from` (the old top),
/// emptied (what it held belongs to `from`: replayed into it before a
/// checkpoint, dropped with it by a rollback). For stores not mounted; a
/// mount does the same with its open `Wal`.
pub fn hand_on(layout: &Layout, from: u32, to: u32) -> Result<()> {
    let path = layout.wal(from);
    if path.exists() {
        Wal::open(&path)?.move_to(&layout.wal(to))?;
    }
    Ok(())
}

/// The frame at `pos` (its kind and body), if one of `generation` is
/// there whole: reading stops at the first that is not. An I/O error is
/// an error, not the end of the log.
fn frame_at(f: &File, pos: u64, generation: u64) -> io::Result<Option<(u32, Vec<u8>)>> {
    let read = |buf: &mut [u8], at: u64| match f.read_exact_at(buf, at) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    };
    let mut head = [0u8; FRAME];
    if !read(&mut head, pos)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as u64;
    let kind = u32::from_le_bytes(head[4..8].try_into().unwrap());
    let sum = u64::from_le_bytes(head[8..].try_into().unwrap());
    if pos + FRAME as u64 + len > SIZE {
        return Ok(None);
    }
    let mut body = vec![0u8; len as usize];
    if !read(&mut body, pos + FRAME as u64)? {
        return Ok(None);
    }
    Ok((checksum(generation, kind, &body) == sum).then_some((kind, body)))
}

/// The committed batches of the current generation, in order.
pub fn read(path: &Path) -> Result<Vec<Vec<Entry>>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).at("open", path),
    };
    let Some(generation) = read_header(&f) else {
        return Ok(Vec::new());
    };
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut pos = HEADER;
    while let Some((kind, body)) = frame_at(&f, pos, generation).at("read", path)? {
        let len = body.len();
        let word = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap());
        match kind {
            KIND_BLOCK if len >= 16 => batch.push(Entry::Block {
                ino: word(0),
                off: word(8),
                bytes: body[16..].to_vec(),
            }),
            KIND_JOURNAL if len >= 8 => batch.push(Entry::Journal {
                off: word(0),
                bytes: body[8..].to_vec(),
            }),
            KIND_COMMIT => batches.push(std::mem::take(&mut batch)),
            _ => break,
        }
        pos += (FRAME + len) as u64;
    }
    Ok(batches)
}

/// Replay the committed batches of layer `top`'s log into its data files
/// and journal, make them durable, and reset the log. Returns the number
/// of batches replayed. Run before the layer's journal is read, by mount
/// and by fsck.
pub fn recover(layout: &Layout, top: u32) -> Result<usize> {
    let path = layout.wal(top);
    let batches = read(&path)?;
    if batches.is_empty() {
        return Ok(0);
    }
    let journal_path = layout.journal(top);
    let journal = open_rw(&journal_path)?;
    let mut files: BTreeSet<u64> = BTreeSet::new();
    for e in batches.iter().flatten() {
        match e {
            Entry::Block { ino, off, bytes } => {
                let p = layout.data(top, *ino);
                let f = crate::data::open_data_file(&p, true).at("open", &p)?;
                f.write_all_at(bytes, *off).at("write", &p)?;
                files.insert(*ino);
            }
            Entry::Journal { off, bytes } => {
                journal
                    .write_all_at(bytes, *off)
                    .at("write", &journal_path)?;
            }
        }
    }
    for ino in &files {
        let p = layout.data(top, *ino);
        File::open(&p).and_then(|f| f.sync_data()).at("fsync", &p)?;
    }
    disk::sync_dir(&layout.data_dir(top))?;
    journal.sync_data().at("fsync", &journal_path)?;
    tracing::info!(
        "layer {top}: replayed {} fsynced batches from {}",
        batches.len(),
        path.display()
    );
    Wal::open(&path)?;
    Ok(batches.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(ino: u64, fill: u8) -> Entry {
        Entry::Block {
            ino,
            off: 65536 * ino,
            bytes: vec![fill; 5000],
        }
    }

    #[test]
    fn committed_batches_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut w = Wal::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
        let j = Entry::Journal {
            off: 77,
            bytes: b"records".to_vec(),
        };
        w.append(&[block(1, 1), j]).unwrap();
        w.append(&[block(2, 2)]).unwrap();
        assert!(!w.is_empty());
        let got = read(&path).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0][0], block(1, 1));
        assert_eq!(
            got[0][1],
            Entry::Journal {
                off: 77,
                bytes: b"records".to_vec()
            }
        );
        assert_eq!(got[1], vec![block(2, 2)]);
    }

    #[test]
    fn reset_and_reopen_forget_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut w = Wal::open(&path).unwrap();
        w.append(&[block(1, 1)]).unwrap();
        w.reset().unwrap();
        assert!(read(&path).unwrap().is_empty());
        w.append(&[block(3, 3)]).unwrap();
        drop(w);
        assert_eq!(read(&path).unwrap(), vec![vec![block(3, 3)]]);
        Wal::open(&path).unwrap();
        assert!(read(&path).unwrap().is_empty());
    }

    #[test]
    fn a_torn_batch_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut w = Wal::open(&path).unwrap();
        w.append(&[block(1, 1)]).unwrap();
        let end = w.pos;
        w.append(&[block(2, 2), block(4, 4)]).unwrap();
        // The crash hit the middle of the second batch: its last frames
        // never reached the disk.
        let f = open_rw(&path).unwrap();
        let torn = end + Entry::frame_len(5000) + 100;
        f.write_all_at(&vec![0u8; (w.pos - torn) as usize], torn)
            .unwrap();
        assert_eq!(read(&path).unwrap(), vec![vec![block(1, 1)]]);
    }

    #[test]
    fn a_corrupt_header_or_frame_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut w = Wal::open(&path).unwrap();
        w.append(&[block(1, 1)]).unwrap();
        let second = w.pos;
        w.append(&[block(2, 2)]).unwrap();
        let f = open_rw(&path).unwrap();
        f.write_all_at(b"X", second + FRAME as u64 + 20).unwrap();
        assert_eq!(read(&path).unwrap(), vec![vec![block(1, 1)]]);
        f.write_all_at(b"X", 2).unwrap();
        assert!(read(&path).unwrap().is_empty());
        // A log too short to be whole is made again.
        f.set_len(HEADER).unwrap();
        Wal::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    }

    #[test]
    fn a_batch_that_does_not_fit_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut w = Wal::open(&path).unwrap();
        let big = Entry::Block {
            ino: 1,
            off: 0,
            bytes: vec![9; BATCH_MAX as usize],
        };
        while w.room() > BATCH_MAX + 64 {
            w.append(std::slice::from_ref(&big)).unwrap();
        }
        let pos = w.pos;
        assert!(w.append(&[big]).is_err());
        assert_eq!(w.pos, pos);
    }
}
