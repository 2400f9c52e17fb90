//! The error type of the library. Each variant is a class a caller can act
//! on (the CLI maps them to its exit codes); the message names the thing and,
//! where there is one, the fix.

use std::io;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A store, checkpoint or path does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A name is taken, a mountpoint or store is busy.
    #[error("{0}")]
    Conflict(String),
    /// The store is corrupt, truncated or of an unknown format version.
    #[error("{0}")]
    BadStore(String),
    /// A bad argument (block size, checkpoint name, ...).
    #[error("{0}")]
    Invalid(String),
    /// The host lacks something (FUSE, root).
    #[error("{0}")]
    Environment(String),
    /// Any other I/O failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach "what we were doing" to an I/O error.
pub trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
    fn at(self, verb: &str, path: &Path) -> Result<T>
    where
        Self: Sized,
    {
        self.ctx(|| format!("{verb} {}", path.display()))
    }
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(io::Error::from).ctx(what)
    }
}
