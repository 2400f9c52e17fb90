//! The metadata journal of one layer: an append-only file of records, each
//! framed as `[u32 length][u64 xxh3 of the payload][JSON payload]`.
//!
//! Records are buffered in memory and written out only by `sync`, which
//! the view calls on fsync, checkpoint, unmount and when the buffer is
//! `full`, each time after making the data of the blocks they name
//! durable, or by a small fsync once the fsync log (`wal`) holds both them
//! and those blocks: a record in the file never names a block whose bytes
//! may still be lost. A crash can leave a torn last record, which replay detects
//! (length or checksum) and stops before. Everything fsync returned for is
//! complete before the torn tail.

use crate::error::{Context, Result};
use crate::state::{Ino, Meta};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64;

/// One metadata change. Replaying a layer's records in order over the state
/// of the layers below rebuilds the view of that layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Record {
    /// The whole metadata of an inode (created, changed, or taken over from
    /// the base, then `origin` is its path in the base).
    Node {
        ino: Ino,
        meta: Meta,
        origin: Option<PathBuf>,
        base_limit: u64,
        /// The data of a small file kept in the metadata (see
        /// `state::Node::inline`); absent in records of older versions.
        #[serde(default, skip_serializing_if = "Option::is_none", with = "hex")]
        inline: Option<Vec<u8>>,
    },
    /// The target of a symlink created in a layer.
    Symlink { ino: Ino, target: Vec<u8> },
    /// A directory entry set (`Some`) or whited out (`None`).
    Entry {
        dir: Ino,
        name: Vec<u8>,
        ino: Option<Ino>,
    },
    /// All extended attributes of an inode.
    Xattrs {
        ino: Ino,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Blocks `first..first+count` now live in this layer (or read as zero).
    Blocks {
        ino: Ino,
        first: u64,
        count: u64,
        zero: bool,
    },
    /// The file was cut to `size`: blocks past it are dropped and base bytes
    /// past it are no longer visible.
    Truncate { ino: Ino, size: u64 },
    /// The inode is gone (last link removed and last open file closed).
    Drop { ino: Ino },
}

impl Record {
    /// The inode a record changes (for an entry: the directory).
    pub fn ino(&self) -> Ino {
        match self {
            Record::Node { ino, .. }
            | Record::Symlink { ino, .. }
            | Record::Xattrs { ino, .. }
            | Record::Blocks { ino, .. }
            | Record::Truncate { ino, .. }
            | Record::Drop { ino } => *ino,
            Record::Entry { dir, .. } => *dir,
        }
    }
}

/// Inline file data as a hex string: half the size of serde_json's array
/// of numbers, and no crate is needed for it.
mod hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => {
                let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                s.serialize_some(&text)
            }
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let digits = text.as_bytes();
        if digits.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        let byte = |pair: &[u8]| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| serde::de::Error::custom("bad hex digit"))
        };
        digits
            .chunks(2)
            .map(byte)
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

const HEADER: usize = 12;
/// The view syncs (data, then this journal) once the buffer holds this much.
const FULL_AT: usize = 1 << 20;

/// The open journal of the writable top layer.
pub struct Writer {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// The file's length: where `buf` goes.
    len: u64,
    /// Bytes written to the file since the last fsync.
    unsynced: bool,
}

impl Writer {
    pub fn open(path: &Path) -> Result<Writer> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .at("open journal", path)?;
        let len = file.metadata().at("stat", path)?.len();
        Ok(Writer {
            path: path.to_owned(),
            file,
            buf: Vec::new(),
            len,
            unsynced: false,
        })
    }

    pub fn append(&mut self, rec: &Record) -> Result<()> {
        encode(rec, &mut self.buf);
        Ok(())
    }

    /// Whether enough is buffered that the view should sync.
    pub fn full(&self) -> bool {
        self.buf.len() >= FULL_AT
    }

    /// The buffered records and the file offset they will be written at
    /// (what the fsync log keeps of them).
    pub fn pending(&self) -> (u64, &[u8]) {
        (self.len, &self.buf)
    }

    /// Write buffered records to the file (no fsync).
    pub fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all(&self.buf)
                .at("write journal", &self.path)?;
            self.len += self.buf.len() as u64;
            self.buf.clear();
            self.unsynced = true;
        }
        Ok(())
    }

    /// Write and fsync: every record appended so far survives a crash.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        if self.unsynced {
            self.file.sync_data().at("fsync journal", &self.path)?;
            self.unsynced = false;
        }
        Ok(())
    }
}

pub fn encode(rec: &Record, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(rec).expect("records serialize");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&xxh3_64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// What a journal file holds.
pub struct Replay {
    pub records: Vec<Record>,
    /// Bytes of complete, valid records.
    pub valid_len: u64,
    /// Bytes after them (a torn or corrupt tail), 0 when clean.
    pub torn_bytes: u64,
}

pub fn read(path: &Path) -> Result<Replay> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .at("read journal", path)?;
    let mut records = Vec::new();
    let mut pos = 0usize;
    while bytes.len() - pos >= HEADER {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let sum = u64::from_le_bytes(bytes[pos + 4..pos + 12].try_into().unwrap());
        let Some(payload) = bytes.get(pos + HEADER..pos + HEADER + len) else {
            break;
        };
        if xxh3_64(payload) != sum {
            break;
        }
        let Ok(rec) = serde_json::from_slice(payload) else {
            break;
        };
        records.push(rec);
        pos += HEADER + len;
    }
    Ok(Replay {
        records,
        valid_len: pos as u64,
        torn_bytes: (bytes.len() - pos) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_is_detected_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut w = Writer::open(&path).unwrap();
        let rec = Record::Drop { ino: 7 };
        w.append(&rec).unwrap();
        w.append(&Record::Truncate { ino: 7, size: 3 }).unwrap();
        w.sync().unwrap();
        // A crash in the middle of the next record.
        let mut partial = Vec::new();
        encode(&Record::Drop { ino: 9 }, &mut partial);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&partial[..partial.len() - 3]).unwrap();
        let r = read(&path).unwrap();
        assert_eq!(r.records, vec![rec, Record::Truncate { ino: 7, size: 3 }]);
        assert_eq!(r.torn_bytes as usize, partial.len() - 3);
    }
}
