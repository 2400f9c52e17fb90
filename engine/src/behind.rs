//! Write-behind: pages read from a process are written into the image by a
//! thread of their own, so that the next pages are read while the last ones
//! are written. Page-cache writes are the slower half here (about two
//! thirds of copying 1 GiB), and the reads are what a target waits for: a
//! frozen one in a stop-and-copy snapshot, a writing one in a lazy one.
//!
//! The copier takes a free buffer (`buffer`), fills it, and hands it over
//! with where its pieces go in pages.img (`write`); the writer thread
//! writes them and gives the buffer back. `inline` writes at once instead,
//! for copies too small to be worth a thread.

use crate::error::{Error, Result};
use crate::image::ImageWriter;
use crossbeam::channel::{bounded, Receiver, Sender};
use std::ops::Range;

/// Buffers in flight between the copier and the writer.
const BUFFERS: usize = 4;

/// A buffer: fresh anonymous memory, not the heap's (a heap block may be
/// reused memory that calloc must zero: 1 ms for 8 MiB, while the target
/// is frozen).
pub type Buffer = memmap2::MmapMut;

/// A filled buffer and (offset in pages.img, bytes of the buffer) pieces.
type Filled = (Buffer, Vec<(u64, Range<usize>)>);

pub struct Behind<'w> {
    free: Receiver<Buffer>,
    /// Where the writer returns buffers (and `inline` does itself).
    give_back: Sender<Buffer>,
    /// None: written at once, in the copier's thread.
    full: Option<Sender<Filled>>,
    writer: &'w ImageWriter,
}

impl<'w> Behind<'w> {
    /// Starts the writer thread in `scope`, with buffers of `size` bytes.
    /// Dropping the `Behind` ends the thread; join it for its result.
    pub fn start<'s>(
        scope: &'s std::thread::Scope<'s, 'w>,
        writer: &'w ImageWriter,
        size: usize,
    ) -> Result<(Behind<'w>, std::thread::ScopedJoinHandle<'s, Result<()>>)> {
        let (give_back, free) = bounded(BUFFERS);
        let (full, full_rx) = bounded::<Filled>(BUFFERS);
        for b in buffers(size, BUFFERS)? {
            let _ = give_back.send(b);
        }
        let back = give_back.clone();
        let thread = scope.spawn(move || {
            // Not on the CPU the copier may be pinned to (ptrace::Pinned).
            crate::ptrace::unpin_thread();
            for (buf, pieces) in full_rx {
                for (off, range) in pieces {
                    writer.write_at(off, &buf[range])?;
                }
                let _ = back.send(buf);
            }
            Ok(())
        });
        let behind = Behind {
            free,
            give_back,
            full: Some(full),
            writer,
        };
        Ok((behind, thread))
    }

    /// No thread: `write` writes at once (one buffer of `size` bytes).
    pub fn inline(writer: &'w ImageWriter, size: usize) -> Result<Behind<'w>> {
        let (give_back, free) = bounded(1);
        for b in buffers(size, 1)? {
            let _ = give_back.send(b);
        }
        Ok(Behind {
            free,
            give_back,
            full: None,
            writer,
        })
    }

    /// A free buffer; an error once the writer stopped (on a write error:
    /// joining the thread tells which).
    pub fn buffer(&self) -> Result<Buffer> {
        self.free
            .recv()
            .map_err(|_| Error::Restore("the image writer stopped".into()))
    }

    /// Hands `buf` over: each (offset, range) piece is written at offset.
    pub fn write(&self, buf: Buffer, pieces: Vec<(u64, Range<usize>)>) -> Result<()> {
        match &self.full {
            Some(full) => full
                .send((buf, pieces))
                .map_err(|_| Error::Restore("the image writer stopped".into())),
            None => {
                for (off, range) in pieces {
                    self.writer.write_at(off, &buf[range])?;
                }
                let _ = self.give_back.send(buf);
                Ok(())
            }
        }
    }

    /// Reserves `len` bytes of pages.img (see `ImageWriter::reserve`).
    pub fn reserve(&self, len: u64) -> u64 {
        self.writer.reserve(len)
    }
}

fn buffers(size: usize, n: usize) -> Result<Vec<Buffer>> {
    (0..n)
        .map(|_| {
            memmap2::MmapMut::map_anon(size)
                .map_err(|e| Error::io("map a buffer to copy pages through", e))
        })
        .collect()
}
