//! Small safe wrappers over the few libc calls std and nix do not cover.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// Names of the extended attributes of `path` (not following symlinks).
pub fn list_xattrs(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let c = cpath(path)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: c is a valid C string and buf is writable for buf.len() bytes.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| s.to_vec())
                .collect());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
        buf.resize(buf.len() * 4, 0);
    }
}

/// The value of one extended attribute of `path` (not following symlinks).
pub fn get_xattr(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cpath(path)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: both strings are valid C strings; buf is writable for its length.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
        buf.resize(buf.len() * 4, 0);
    }
}

/// Sets one extended attribute of `path` (not following symlinks): the
/// daemon keeps its own, so only tests write host xattrs.
#[cfg(test)]
pub fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cpath(path)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both are valid C strings; value is readable for its length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raise the soft limit of open files to the hard limit: the daemon keeps
/// many layer and base files open.
pub fn raise_nofile_limit() {
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// FUSE_NOTIFY_INC_EPOCH (Linux 6.16, FUSE 7.44): every cached name of the
/// mount becomes stale at once, which makes a rollback's invalidation O(1).
const FUSE_NOTIFY_INC_EPOCH: i32 = 8;

/// Send FUSE_NOTIFY_INC_EPOCH on the /dev/fuse descriptor of a session.
pub fn fuse_inc_epoch(fuse: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique (0) }
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_INC_EPOCH.to_ne_bytes());
    let n = nix::unistd::write(fuse, &msg).map_err(io::Error::from)?;
    if n != msg.len() {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

/// Start writing back the dirty pages of `len` bytes at `off` in `f`
/// without waiting for them (sync_file_range(2), SYNC_FILE_RANGE_WRITE).
/// Not a durability point: fsync is still needed.
pub fn start_writeback(f: &std::fs::File, off: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WRITE;
    // SAFETY: the descriptor stays open for the call; no memory is passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), off as i64, len as i64, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
