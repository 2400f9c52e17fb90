//! VM disks and their checkpoints. Each VM's disk is a UML COW file
//! (`ubd0=disk.cow,IMAGE`): blocks the guest writes land in the VM's own
//! sparse file, the base image is opened read-only and shared by every VM.
//! A checkpoint is a sparse copy of the COW file, taken while the VM is
//! frozen right after a guest `sync`; a rollback copies it back while the VM
//! is stopped. Both cost the size of the VM's own writes, never the base's.

use crate::exit::{CliError, CliResult, Code};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Bytes actually allocated to a file (sparse files count only their data).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Copies `from` to `to` (replacing it atomically), keeping holes as holes:
/// only the data ranges that SEEK_DATA/SEEK_HOLE report are copied.
pub fn sparse_copy(from: &Path, to: &Path) -> CliResult {
    let err = |what: &str, e: std::io::Error| {
        CliError::new(
            Code::Internal,
            format!("{what} {} → {}: {e}", from.display(), to.display()),
        )
    };
    let src = File::open(from).map_err(|e| err("opening", e))?;
    let len = src.metadata().map_err(|e| err("stat", e))?.len();
    let tmp = to.with_extension("partial");
    let dst = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err("creating", e))?;
    dst.set_len(len).map_err(|e| err("sizing", e))?;
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(&src, pos, libc::SEEK_DATA) else {
            break;
        };
        let end = seek(&src, start, libc::SEEK_HOLE).unwrap_or(len);
        copy_range(&src, &dst, start, end - start).map_err(|e| err("copying", e))?;
        pos = end;
    }
    dst.sync_all().map_err(|e| err("syncing", e))?;
    std::fs::rename(&tmp, to).map_err(|e| err("renaming", e))?;
    Ok(())
}

/// lseek with SEEK_DATA or SEEK_HOLE; None past the last data.
fn seek(f: &File, from: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own has no memory-safety preconditions.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// Copies `len` bytes at `offset` from one file to the same offset in another.
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let (mut src, mut dst) = (src.try_clone()?, dst.try_clone()?);
    src.seek(SeekFrom::Start(offset))?;
    dst.seek(SeekFrom::Start(offset))?;
    let copied = std::io::copy(&mut std::io::Read::take(&mut src, len), &mut dst)?;
    if copied != len {
        return Err(std::io::Error::other("file shrank while copying"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"first", 4096).unwrap();
        f.write_all_at(b"last", (64 << 20) - 4).unwrap();
        (&f).flush().unwrap();
        let b = dir.path().join("b");
        sparse_copy(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(allocated_bytes(&b) < 1 << 20, "the copy is sparse");
    }
}
