//! memfd: its contents (stored in pages.img), name and seals. Seals are
//! added last, once the contents are written back.

use super::{owned, Target};
use crate::error::{Error, IoContext, Result};
use crate::image::{ImageWriter, ObjectKind};
use std::os::fd::{AsRawFd, OwnedFd};

pub fn dump(t: &Target, writer: &mut ImageWriter) -> Result<ObjectKind> {
    let f = std::fs::File::open(t.proc_path())
        .ctx(|| format!("open memfd fd {} of pid {}", t.fd, t.pid))?;
    let data = std::fs::read(t.proc_path()).ctx(|| format!("read memfd fd {}", t.fd))?;
    // SAFETY: F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) }.max(0);
    let offset = writer.append_padded(&data)?;
    let name = t
        .link
        .trim_start_matches("/memfd:")
        .trim_end_matches(" (deleted)")
        .to_string();
    Ok(ObjectKind::Memfd {
        name,
        len: data.len() as u64,
        offset,
        seals,
        pos: t.info.get("pos").and_then(|p| p.parse().ok()).unwrap_or(0),
        ino: t.info.get("ino").and_then(|i| i.parse().ok()).unwrap_or(0),
    })
}

pub fn create_empty(name: &str) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(name.chars().take(200).collect::<String>())
        .unwrap_or_else(|_| c"umlctl".into());
    // SAFETY: c is a valid C string.
    let r = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    owned(r, || format!("memfd_create {name}"))
}

pub fn create(kind: &ObjectKind, pages: &[u8]) -> Result<OwnedFd> {
    let ObjectKind::Memfd {
        name,
        len,
        offset,
        seals,
        pos,
        ..
    } = kind
    else {
        unreachable!("memfd::create of another kind")
    };
    let fd = create_empty(name)?;
    let data = pages
        .get(*offset as usize..(*offset + *len) as usize)
        .ok_or_else(|| Error::Restore(format!("memfd {name}: contents out of the image")))?;
    let f = std::fs::File::from(fd);
    use std::os::unix::fs::FileExt;
    f.write_all_at(data, 0)
        .ctx(|| format!("write memfd {name}"))?;
    let fd = OwnedFd::from(f);
    // SAFETY: lseek and F_ADD_SEALS take integers.
    unsafe {
        libc::lseek(fd.as_raw_fd(), *pos as i64, libc::SEEK_SET);
        if *seals != 0 && libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, *seals) < 0 {
            return Err(Error::sys(
                format!("add seals to memfd {name}"),
                nix::errno::Errno::last(),
            ));
        }
    }
    Ok(fd)
}
