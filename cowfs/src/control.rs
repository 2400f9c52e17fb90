//! The daemon's control socket (`STORE/control.sock`): how `umlctl fs
//! checkpoint` and friends reach a mounted store. One JSON request per
//! connection, one JSON answer.

use crate::error::{Error, Result};
use crate::fuse::KernelCache;
use crate::view::View;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Checkpoint(String),
    Rollback(String),
    Delete(String),
    /// Make everything durable (before an offline diff, say).
    Sync,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Ok,
    /// An error class (as in `Error`) and its message.
    Err(String, String),
}

fn to_answer(r: Result<()>) -> Answer {
    match r {
        Ok(()) => Answer::Ok,
        Err(e) => {
            let class = match e {
                Error::NotFound(_) => "NotFound",
                Error::Conflict(_) => "Conflict",
                Error::BadStore(_) => "BadStore",
                Error::Invalid(_) => "Invalid",
                Error::Environment(_) => "Environment",
                Error::Io { .. } => "Io",
            };
            Answer::Err(class.into(), e.to_string())
        }
    }
}

fn from_answer(a: Answer) -> Result<()> {
    match a {
        Answer::Ok => Ok(()),
        Answer::Err(class, m) => Err(match class.as_str() {
            "NotFound" => Error::NotFound(m),
            "Conflict" => Error::Conflict(m),
            "BadStore" => Error::BadStore(m),
            "Invalid" => Error::Invalid(m),
            "Environment" => Error::Environment(m),
            _ => Error::Io {
                context: "daemon".into(),
                source: std::io::Error::other(m),
            },
        }),
    }
}

/// Send one request to the daemon of a mounted store.
pub fn call(socket: &Path, req: &Request) -> Result<()> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        Error::Conflict(format!(
            "store is locked by another process but its daemon does not answer on {} ({e})",
            socket.display()
        ))
    })?;
    let mut line = serde_json::to_vec(req).expect("serializable");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(|e| Error::Io {
        context: "send to the cowfs daemon".into(),
        source: e,
    })?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| Error::Io {
            context: "read the cowfs daemon's answer".into(),
            source: e,
        })?;
    let a: Answer = serde_json::from_str(&answer).map_err(|e| Error::Io {
        context: "the cowfs daemon's answer".into(),
        source: std::io::Error::other(e),
    })?;
    from_answer(a)
}

/// What the server needs to act on a live mount.
pub struct Live {
    pub view: Arc<View>,
    pub kernel: Arc<KernelCache>,
    pub notifier: fuser::Notifier,
    pub mountpoint: PathBuf,
    /// The session's /dev/fuse descriptor, for notifications fuser lacks.
    pub fuse_fd: std::os::fd::OwnedFd,
}

impl Live {
    pub fn handle(&self, req: &Request) -> Result<()> {
        match req {
            Request::Checkpoint(name) => {
                // Writes the kernel still holds (writeback cache) were made
                // before the checkpoint: they belong in it.
                let t = std::time::Instant::now();
                self.write_back();
                let synced = t.elapsed();
                self.view.checkpoint(name)?;
                tracing::debug!(
                    "checkpoint {name}: writeback {synced:?}, committed {:?}",
                    t.elapsed()
                );
                Ok(())
            }
            Request::Rollback(name) => self.rollback(name),
            Request::Delete(name) => self.view.delete_checkpoint(name),
            Request::Sync => {
                // What `sync` cannot do for a FUSE mount (the kernel sends
                // FUSE_SYNCFS only to virtiofs): the writes the kernel
                // still holds first, then this daemon's.
                self.write_back();
                self.view.sync_all()
            }
        }
    }

    /// What a request leaves to do once its caller has the answer: make
    /// the next layer directory ahead of the next checkpoint, and merge
    /// layers no checkpoint separates any more. Both start threads (tens
    /// of microseconds), kept off the caller's clock.
    fn after_answer(&self, req: &Request) {
        match req {
            Request::Checkpoint(_) => {
                self.view.prepare_spare();
                crate::merge::spawn(self.view.clone());
            }
            Request::Rollback(_) => self.view.prepare_spare(),
            Request::Delete(_) => crate::merge::spawn(self.view.clone()),
            Request::Sync => {}
        }
    }

    /// Have the kernel send the daemon every write it still holds. A
    /// syncfs costs two round trips to the kernel's flusher (about 0.1 ms)
    /// even when nothing is dirty, so it is skipped when no file is open
    /// for writing.
    fn write_back(&self) {
        if !self.kernel.may_hold_writes() {
            return;
        }
        if let Ok(f) = std::fs::File::open(&self.mountpoint) {
            let _ = nix::unistd::syncfs(&f);
        }
        self.kernel.write_back_writers();
    }

    fn rollback(&self, name: &str) -> Result<()> {
        let t = std::time::Instant::now();
        // Write back what the kernel still holds dirty, so that it lands
        // before the switch and not after.
        self.write_back();
        let synced = t.elapsed();
        let changed = self.view.rollback(name)?;
        let switched = t.elapsed();
        use std::os::fd::AsFd;
        self.kernel
            .after_rollback(&self.view, &self.notifier, self.fuse_fd.as_fd(), &changed);
        tracing::debug!(
            "rollback {name}: writeback {synced:?}, switch {switched:?}, invalidation done {:?} ({} changed inodes)",
            t.elapsed(),
            changed.len()
        );
        Ok(())
    }
}

/// The socket server thread; stops when dropped.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(path: &Path, live: Live) -> Result<Server> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| Error::Io {
            context: format!("listen on {}", path.display()),
            source: e,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cowfs-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        serve_one(&live, conn);
                    }
                }
            })
            .map_err(|e| Error::Io {
                context: "start the control thread".into(),
                source: e,
            })?;
        Ok(Server {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

fn serve_one(live: &Live, conn: UnixStream) {
    let mut line = String::new();
    if BufReader::new(&conn).read_line(&mut line).is_err() {
        return;
    }
    let req = serde_json::from_str::<Request>(&line);
    let answer = match &req {
        Ok(req) => {
            tracing::info!("control: {req:?}");
            to_answer(live.handle(req))
        }
        Err(e) => Answer::Err("Invalid".into(), format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&answer).expect("serializable");
    out.push(b'\n');
    let _ = (&conn).write_all(&out);
    drop(conn);
    if let Ok(req) = req {
        live.after_answer(&req);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
