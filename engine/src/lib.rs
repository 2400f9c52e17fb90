//! engine: snapshot and resume of live Linux processes, driven by ptrace.
//!
//! ```no_run
//! # fn main() -> engine::Result<()> {
//! let report = engine::dump(1234, "/tmp/snap".as_ref(), &engine::DumpOptions::default())?;
//! let resumed = engine::resume(&report.dir, &engine::ResumeOptions::default())?;
//! println!("resumed as pid {}", resumed.pid);
//! # Ok(()) }
//! ```
//!
//! Module map (CRIU's split: dump, restore, memory, files, and the code that
//! makes the target act, kept apart; one module defines the image format):
//! - `image`: the on-disk format (layout drawn there), its writer and checks
//! - `dump`: snapshot flow: check, freeze, collect, copy, release, publish
//! - `behind`: write-behind: pages written into the image by a thread
//!   while the next are read
//! - `cow`: lazy snapshots: copy-before-write with userfaultfd write-protect
//! - `restore`: resume flow: build the process inside a puppet
//! - `puppet`: the process a resume starts from, and its scratch pages
//! - `clones`: many processes from one image, sharing unwritten memory
//! - `pager`: lazy resume: serves memory on demand from the image
//! - `uffd`: userfaultfd ioctls
//! - `track`: write tracking for incremental snapshots
//! - `memory`: which pages are saved, and copying them
//! - `files`: file descriptors, saved and reopened (by path, or as objects)
//! - `fds`: open file descriptions kept as objects (pipes, sockets, epoll,
//!   eventfd, signalfd, timerfd, memfd), one module per kind
//! - `tree`: process trees: freezing descendants, rebuilding parents,
//!   sessions and groups
//! - `pidns`: resuming into a new PID namespace with the original pids
//! - `timers`: POSIX timers and itimers
//! - `locks`: POSIX, OFD and flock file locks
//! - `seccomp`: refusing seccomp-confined processes (not restored yet)
//! - `inject`: remote syscall injection into a stopped thread
//! - `ptrace`: ptrace requests, freezing and releasing thread groups
//! - `proc`: /proc parsing
//! - `mem`: reading and writing another process's memory
//! - `sys`: kernel ABI constants and structs the libc crate lacks
//! - `error`: the error type
//!
//! # Image format
//! See [`image`]: a directory with `manifest` (magic, version, checksum,
//! JSON body) and `pages.img` (page-aligned pages, checksummed per MiB).

pub mod behind;
pub mod clones;
pub mod cow;
pub mod dump;
pub mod error;
pub mod fds;
pub mod files;
pub mod image;
pub mod inject;
pub mod locks;
pub mod mem;
pub mod memory;
pub mod pager;
pub mod pidns;
pub mod proc;
pub mod ptrace;
pub mod puppet;
pub mod restore;
pub mod seccomp;
pub mod sys;
pub mod timers;
pub mod track;
pub mod tree;
pub mod uffd;

pub use clones::{clone_image, CloneOptions, CloneReport};
pub use dump::{dump, DumpOptions, DumpReport};
pub use error::{Error, ErrorKind, Result};
pub use files::Stdio;
pub use image::Image;
pub use restore::{pager_thread, resume, PagerFor, PagerLauncher, ResumeOptions, ResumeReport};
