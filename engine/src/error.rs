//! The engine's one error type. Each variant says what went wrong in terms a
//! user can act on; `kind()` groups them for exit codes.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no process with pid {0}: check the pid (ps -p {0})")]
    NoSuchProcess(i32),
    #[error("pid {0} is a kernel thread: only user processes can be snapshotted")]
    KernelThread(i32),
    #[error("pid {0} is a zombie (exited, not yet reaped): nothing left to snapshot")]
    Zombie(i32),
    #[error("pid {pid} is already traced by pid {tracer} (a debugger?): detach it first")]
    AlreadyTraced { pid: i32, tracer: i32 },
    #[error("not permitted to trace pid {0}: run as root or as the process's owner")]
    NotPermitted(i32),
    #[error("pid {pid}: {what}")]
    Unsupported { pid: i32, what: String },
    #[error("image {path}: {what}")]
    BadImage { path: PathBuf, what: String },
    #[error("{path}: already exists; choose another --out or remove it")]
    Exists { path: PathBuf },
    #[error("pid {0} is in use: it cannot be restored with its pid (--same-pid, or a process tree) while that process lives; resume with --pid-ns new to give the copy a namespace of its own")]
    PidInUse(i32),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {errno}")]
    Sys {
        what: String,
        errno: nix::errno::Errno,
    },
    #[error("{path} changed since the snapshot (its size, time or inode differ): the image maps it and needs the same file; restore the original file")]
    FileChanged { path: String },
    #[error("address {0} is taken (is the original still running?): stop whatever holds it, then resume again")]
    AddressInUse(String),
    #[error("lazy snapshot abandoned: {0}")]
    LazyConflict(String),
    #[error("interrupted: the operation was cancelled and rolled back")]
    Interrupted,
    #[error("{0}")]
    Restore(String),
}

/// Coarse classes of errors, for callers that map them to exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Target,
    Unsupported,
    BadImage,
    Conflict,
    Interrupted,
    Other,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoSuchProcess(_)
            | Error::KernelThread(_)
            | Error::Zombie(_)
            | Error::AlreadyTraced { .. }
            | Error::NotPermitted(_) => ErrorKind::Target,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::BadImage { .. } => ErrorKind::BadImage,
            Error::Exists { .. }
            | Error::PidInUse(_)
            | Error::FileChanged { .. }
            | Error::AddressInUse(_) => ErrorKind::Conflict,
            Error::Interrupted => ErrorKind::Interrupted,
            _ => ErrorKind::Other,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn sys(what: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::Sys {
            what: what.into(),
            errno,
        }
    }

    pub fn bad_image(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::BadImage {
            path: path.into(),
            what: what.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to io::Result in one call.
pub trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
