//! epoll: every registration (fd, events, data) from fdinfo.
//!
//! The kernel keys a registration by (file, fd number in the process that
//! added it), and EPOLL_CTL_MOD/DEL look it up that way; so the instance is
//! made empty in the resumer and the registrations are added from inside
//! the owning puppet, once its fds have their numbers (`register`).

use super::{owned, Target};
use crate::error::{Error, Result};
use crate::image::{EpollItem, ObjectKind};
use crate::puppet::Puppet;
use std::os::fd::OwnedFd;

pub fn dump(t: &Target) -> Result<ObjectKind> {
    let text = crate::proc::read_proc(t.pid, &format!("fdinfo/{}", t.fd))?;
    let mut items = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("tfd:")) {
        let mut w = line.split_whitespace();
        let mut field = |k: &str| -> Option<&str> { w.by_ref().skip_while(|x| *x != k).nth(1) };
        let item = (|| {
            Some(EpollItem {
                fd: field("tfd:")?.parse().ok()?,
                events: u32::from_str_radix(field("events:")?, 16).ok()?,
                data: u64::from_str_radix(field("data:")?, 16).ok()?,
            })
        })()
        .ok_or_else(|| {
            t.unsupported(format!(
                "is an epoll whose registration '{line}' cannot be read"
            ))
        })?;
        if !std::path::Path::new(&format!("/proc/{}/fd/{}", t.pid, item.fd)).exists() {
            return Err(t.unsupported(format!(
                "is an epoll watching fd {}, which the process has closed (a dup keeps the file alive): close the epoll's registration first",
                item.fd
            )));
        }
        items.push(item);
    }
    Ok(ObjectKind::Epoll {
        owner: t.pid,
        items,
    })
}

pub fn create() -> Result<OwnedFd> {
    // SAFETY: epoll_create1 takes no pointers.
    owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }, || {
        "epoll_create1".into()
    })
}

/// Adds the registrations of the epoll at `epfd` inside the puppet.
pub fn register(p: &mut Puppet, epfd: i32, items: &[EpollItem]) -> Result<()> {
    for it in items {
        let mut ev = [0u8; 12];
        ev[..4].copy_from_slice(&it.events.to_ne_bytes());
        ev[4..].copy_from_slice(&it.data.to_ne_bytes());
        let addr = p.put(0, &ev)?;
        p.sys(
            &format!("epoll_ctl(ADD fd {}) on epoll fd {epfd}", it.fd),
            libc::SYS_epoll_ctl,
            &[epfd as u64, libc::EPOLL_CTL_ADD as u64, it.fd as u64, addr],
        )
        .map_err(|e| Error::Restore(format!("{e}")))?;
    }
    Ok(())
}
