//! The commit point of checkpoint, rollback, delete and merge: `STORE/stack`,
//! a file of two equal slots, each holding one version of the stack as
//! space-padded JSON with a sequence number and a checksum.
//!
//! A commit overwrites the slot that holds the older version and calls
//! fdatasync once. The file never changes size or allocation after it is
//! made, so that fdatasync is one data write and a cache flush, with no
//! file system journal commit (write-temp-fsync-rename-fsync-directory
//! costs two of those). Crash safety: the slot being written is never the
//! one holding the newest committed version, so a torn write can only
//! damage a version that has not committed yet; readers take the valid slot
//! with the highest sequence number, and the checksum rejects a torn one.
//!
//! A stack too big for a slot (hundreds of checkpoints) makes the file
//! grow: it is rewritten whole, atomically, with both slots twice as big.

use crate::disk::{write_atomic, Stack};
use crate::error::{Context, Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64;

/// The size of a slot in a new file.
const FIRST_SLOT: usize = 16 << 10;

#[derive(Serialize, Deserialize)]
struct Slot {
    seq: u64,
    /// xxh3 of the JSON of `stack`.
    sum: u64,
    stack: Stack,
}

/// The newest valid version and its sequence number.
fn newest(bytes: &[u8]) -> Option<(u64, Stack)> {
    let half = bytes.len() / 2;
    if half == 0 || bytes.len() != 2 * half {
        return None;
    }
    [&bytes[..half], &bytes[half..]]
        .into_iter()
        .filter_map(|b| serde_json::from_slice::<Slot>(b.trim_ascii_end()).ok())
        .filter(|s| serde_json::to_vec(&s.stack).is_ok_and(|j| xxh3_64(&j) == s.sum))
        .max_by_key(|s| s.seq)
        .map(|s| (s.seq, s.stack))
}

fn encode(seq: u64, stack: &Stack) -> Vec<u8> {
    let json = serde_json::to_vec(stack).expect("serializable stack");
    let slot = Slot {
        seq,
        sum: xxh3_64(&json),
        stack: stack.clone(),
    };
    serde_json::to_vec(&slot).expect("serializable slot")
}

/// The committed stack in `path`.
pub fn read(path: &Path) -> Result<Stack> {
    let bytes = std::fs::read(path).at("read", path)?;
    newest(&bytes).map(|(_, s)| s).ok_or_else(|| {
        Error::BadStore(format!(
            "{} holds no valid stack; run `umlctl fs fsck`",
            path.display()
        ))
    })
}

/// The commit file held open, with the sequence number and slot size of
/// its last commit: a mounted store's commits are then one write and one
/// fdatasync. (Reading and checking both slots again costs about 40 us, a
/// tenth of a checkpoint.) Only one `Committer` of a file may commit: the
/// daemon's, which holds the store's lock.
pub struct Committer {
    path: PathBuf,
    /// None until the file exists.
    file: Option<File>,
    seq: u64,
    half: usize,
}

impl Committer {
    pub fn open(path: &Path) -> Result<Committer> {
        let mut c = Committer {
            path: path.to_owned(),
            file: None,
            seq: 0,
            half: 0,
        };
        if let Ok(file) = OpenOptions::new().read(true).write(true).open(path) {
            let len = file.metadata().at("stat", path)?.len() as usize;
            let mut bytes = vec![0u8; len];
            file.read_exact_at(&mut bytes, 0).at("read", path)?;
            c.seq = newest(&bytes).map_or(0, |(seq, _)| seq);
            c.half = len / 2;
            c.file = Some(file);
        }
        Ok(c)
    }

    /// Commit `stack`, making the file when it does not exist.
    pub fn commit(&mut self, stack: &Stack) -> Result<()> {
        let seq = self.seq + 1;
        let slot = encode(seq, stack);
        match &self.file {
            Some(file) if slot.len() < self.half => {
                // Padding the rest of the slot overwrites the older version
                // whole.
                let mut padded = slot;
                padded.resize(self.half, b' ');
                let at = (seq % 2) * self.half as u64;
                file.write_all_at(&padded, at).at("write", &self.path)?;
                file.sync_data().at("fsync", &self.path)?;
            }
            _ => {
                let size = match self.file {
                    None => FIRST_SLOT,
                    Some(_) => (slot.len() + 1).next_power_of_two(),
                };
                self.half = rewrite(&self.path, seq, stack, size)?;
                // The rewrite replaced the file.
                let file = OpenOptions::new().read(true).write(true).open(&self.path);
                self.file = Some(file.at("open", &self.path)?);
            }
        }
        self.seq = seq;
        Ok(())
    }
}

/// A whole new file with `stack` in both slots of `slot_size` bytes (at
/// least `FIRST_SLOT`); returns the slot size.
fn rewrite(path: &Path, seq: u64, stack: &Stack, slot_size: usize) -> Result<usize> {
    let slot_size = slot_size.max(FIRST_SLOT);
    let mut bytes = encode(seq, stack);
    bytes.resize(slot_size, b' ');
    bytes.extend_from_within(..);
    write_atomic(path, &bytes)?;
    Ok(slot_size)
}

/// Whether `path` holds a commit file (as opposed to nothing yet).
pub fn exists(path: &Path) -> bool {
    File::open(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(n: u32) -> Stack {
        let mut s = Stack::initial();
        for i in 0..n {
            s = s.with_checkpoint(&format!("c{i}")).unwrap();
        }
        s
    }

    /// A commit by a committer of its own, as offline operations do.
    fn write(path: &Path, stack: &Stack) -> Result<()> {
        Committer::open(path)?.commit(stack)
    }

    #[test]
    fn the_newest_commit_wins_and_a_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stack");
        write(&path, &stack(0)).unwrap();
        write(&path, &stack(1)).unwrap();
        write(&path, &stack(2)).unwrap();
        assert_eq!(read(&path).unwrap().layers, stack(2).layers);
        let len = std::fs::metadata(&path).unwrap().len();
        // Versions 1 to 3 were written; a crash in the middle of writing
        // version 4, which goes to slot 0 (the one holding version 2).
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"{\"seq\":4,\"sum\":1,\"st", 0).unwrap();
        assert_eq!(read(&path).unwrap().layers, stack(2).layers);
        // A bit flipped inside the stack is caught by the checksum.
        let mut bytes = std::fs::read(&path).unwrap();
        let odd = &mut bytes[(len / 2) as usize..];
        let at = odd.windows(8).position(|w| w == b"\"layers\"").unwrap();
        odd[at + 10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read(&path).is_err());
    }

    #[test]
    fn a_big_stack_grows_the_file_and_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stack");
        write(&path, &stack(0)).unwrap();
        let big = stack(400);
        write(&path, &big).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 2 * FIRST_SLOT as u64);
        assert_eq!(read(&path).unwrap().checkpoints, big.checkpoints);
        write(&path, &stack(3)).unwrap();
        assert_eq!(read(&path).unwrap().layers, stack(3).layers);
    }

    #[test]
    fn a_held_committer_keeps_the_sequence_through_growth() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stack");
        // One committer for all, as a mounted store holds it: it never
        // reads the file again, so its own count must stay right, also
        // across the rewrite that grows the file.
        let mut held = Committer::open(&path).unwrap();
        let stacks = [stack(0), stack(1), stack(400), stack(2), stack(3)];
        let mut inode = 0;
        for (n, s) in stacks.iter().enumerate() {
            held.commit(s).unwrap();
            // Only making the file and growing it (the big stack) replace
            // it; other commits overwrite a slot in place.
            let now = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
            assert_eq!(now == inode, ![0, 2].contains(&n), "commit {n}");
            inode = now;
            let bytes = std::fs::read(&path).unwrap();
            let (seq, newest) = newest(&bytes).unwrap();
            assert_eq!(newest.checkpoints, s.checkpoints);
            // A number that stood still would put every commit in one
            // slot, where a torn write destroys the last committed version.
            assert_eq!(seq, n as u64 + 1);
        }
        // The next owner (an offline operation, a later mount) carries on:
        // a sequence number that had fallen behind would lose to an older
        // version.
        write(&path, &stack(4)).unwrap();
        assert_eq!(read(&path).unwrap().checkpoints, stack(4).checkpoints);
        write(&path, &stack(5)).unwrap();
        assert_eq!(read(&path).unwrap().checkpoints, stack(5).checkpoints);
    }
}
