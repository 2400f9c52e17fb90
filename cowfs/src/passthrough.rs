//! FUSE passthrough, opt-in (`MountOptions::passthrough`): a read-only open
//! of a file no layer has changed is served by the kernel straight from the
//! base file, with no request to this daemon (warm sequential reads at the
//! native speed instead of about half of it: the FUSE page cache holds 4 KiB
//! folios, ext4 large ones).
//!
//! The price, and why it is not the default: the kernel does not combine
//! passthrough with its writeback cache, so a passthrough mount writes
//! through (4 KiB buffered writes pay a round trip each).
//!
//! The kernel requires every open of an inode open in passthrough to be a
//! passthrough open with the same backing file (others fail with EIO), and
//! refuses passthrough while the inode has cached opens. So the mode of
//! each open is decided here, under one lock, from the opens granted so far:
//! - passthrough: read-only, the file unchanged, no cached open of it;
//! - passthrough with direct I/O (reads and writes go to this daemon, only
//!   mmap uses the backing file): any other open of an inode that has
//!   passthrough opens, a writer for one;
//! - cached: the rest.
//!
//! An open in passthrough reads the base file until it is closed, even if
//! the file is written or rolled back meanwhile: overlayfs has the same
//! limit for a file opened before its copy-up. A shared writable mapping
//! of a file that also has passthrough opens is refused (the backing file
//! is the read-only base).

use crate::state::Ino;
use crate::view::View;
use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};
use std::collections::HashMap;
use std::sync::Mutex;

/// Bits of a file handle: a writable open (counted by `KernelCache`) and
/// a passthrough one (counted here).
pub const WRITER_BIT: u64 = 1;
pub const PASSTHROUGH_BIT: u64 = 2;

#[derive(Default)]
pub struct Passthrough {
    inodes: Mutex<HashMap<Ino, Opens>>,
}

/// The opens of one inode this daemon has granted.
#[derive(Default)]
struct Opens {
    /// The shared backing file and the number of passthrough opens (with
    /// or without direct I/O).
    backing: Option<(BackingId, u32)>,
    /// Cached opens.
    cached: u32,
}

impl Passthrough {
    /// Answer an OPEN of `ino` (already counted by the view) with handle
    /// `fh`. `cached`: the flags of a cached open.
    pub fn open(
        &self,
        view: &View,
        ino: Ino,
        fh: FileHandle,
        writable: bool,
        cached: FopenFlags,
        reply: ReplyOpen,
    ) {
        let mut inodes = self.inodes.lock().unwrap();
        let opens = inodes.entry(ino).or_default();
        let pass = FileHandle(fh.0 | PASSTHROUGH_BIT);
        let reader_of_base = || (!writable).then(|| view.unchanged_base_file(ino)).flatten();
        if let Some((id, n)) = &mut opens.backing {
            *n += 1;
            let flags = match reader_of_base() {
                Some(_) => FopenFlags::empty(),
                None => FopenFlags::FOPEN_DIRECT_IO,
            };
            return reply.opened_passthrough(pass, flags, id);
        }
        if opens.cached == 0 {
            if let Some(file) = reader_of_base() {
                match reply.open_backing(&*file) {
                    Ok(id) => {
                        reply.opened_passthrough(pass, FopenFlags::empty(), &id);
                        opens.backing = Some((id, 1));
                        return;
                    }
                    // A base on a stacked file system (ELOOP), say.
                    Err(e) => tracing::debug!("no passthrough for inode {ino}: {e}"),
                }
            }
        }
        opens.cached += 1;
        reply.opened(fh, cached)
    }

    /// A new file was created and opened (cached: nothing passes it through).
    pub fn created(&self, ino: Ino) {
        self.inodes.lock().unwrap().entry(ino).or_default().cached += 1;
    }

    /// The open `fh` of `ino` was released.
    pub fn released(&self, ino: Ino, fh: FileHandle) {
        let mut inodes = self.inodes.lock().unwrap();
        let Some(opens) = inodes.get_mut(&ino) else {
            return;
        };
        if fh.0 & PASSTHROUGH_BIT != 0 {
            if let Some((_, n)) = &mut opens.backing {
                *n -= 1;
                if *n == 0 {
                    // Dropping the id closes the backing file in the kernel.
                    opens.backing = None;
                }
            }
        } else {
            opens.cached = opens.cached.saturating_sub(1);
        }
        if opens.backing.is_none() && opens.cached == 0 {
            inodes.remove(&ino);
        }
    }
}
