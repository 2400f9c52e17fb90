//! The image format: the one place that defines what a snapshot looks like
//! on disk, how it is written (atomically) and how it is checked.
//!
//! ```text
//! DIR/                       0700, published by rename(DIR.partial, DIR)
//! ├── manifest               0600
//! │   ├── header (32 bytes)  magic "UMLCTLIM" | version u32 | 0 u32
//! │   │                      | body length u64 | xxh3-64 of the body u64
//! │   └── body               JSON: the `Manifest` below (processes of
//! │                          the tree, threads, registers, VMAs, fds,
//! │                          timers, page index, checksums of pages.img;
//! │                          `objects`: open file descriptions shared by
//! │                          id (pipes, sockets, epoll...); `pipes`:
//! │                          their buffered bytes)
//! └── pages.img              0600: page-aligned raw memory pages (and the
//!                            contents of deleted files), so it can be
//!                            mmapped; each VMA lists its runs of stored
//!                            pages as [address, page count, offset here];
//!                            xxh3-64 per 1 MiB chunk in the manifest.
//! ```
//!
//! Pages a process never touched are not stored: they read as zeros (anonymous
//! memory) or come from the file (private file mappings store only the pages
//! the process changed). Readers check everything (magic, version, body
//! checksum, pages length and every chunk's checksum) before acting on it.

use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64;

pub const MAGIC: [u8; 8] = *b"UMLCTLIM";
/// Bump on any incompatible change; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
pub const CHUNK_SIZE: u64 = 1 << 20;
pub const MANIFEST_FILE: &str = "manifest";
pub const PAGES_FILE: &str = "pages.img";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub tool_version: String,
    pub created_unix_ms: u64,
    pub kernel: String,
    /// Size of the XSAVE area on the snapshotting host.
    pub xstate_size: usize,
    pub pages: PagesInfo,
    /// Root first; a tree (`--tree`) lists every descendant after it.
    pub processes: Vec<Process>,
    /// Open file descriptions that are not reopened by path (pipes,
    /// sockets, event objects...); fds refer to them by id, so that a
    /// description shared between fds or processes is shared again.
    #[serde(default)]
    pub objects: Vec<FileObject>,
    /// The contents and sizes of the pipes and FIFOs the objects refer to.
    #[serde(default)]
    pub pipes: Vec<PipeBuffer>,
    /// For an incremental snapshot: the image it builds on.
    #[serde(default)]
    pub parent: Option<ParentRef>,
}

/// The parent of an incremental image: where it is, and the checksum its
/// manifest had, so that a changed or replaced parent is refused.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParentRef {
    pub dir: PathBuf,
    pub manifest_sum: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PagesInfo {
    pub len: u64,
    pub chunk_size: u64,
    pub chunk_checksums: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Process {
    pub pid: i32,
    /// Parent, process group and session, as pids of the host at snapshot
    /// time (0 for an image written before trees existed).
    #[serde(default)]
    pub ppid: i32,
    #[serde(default)]
    pub pgid: i32,
    #[serde(default)]
    pub sid: i32,
    pub comm: String,
    pub exe: String,
    pub cwd: String,
    pub umask: u32,
    pub personality: u64,
    pub creds: Creds,
    /// (resource, soft, hard) as prlimit64 reports them.
    pub rlimits: Vec<(u32, u64, u64)>,
    pub mm: MmFields,
    /// Signal actions other than the default, by signal number.
    pub sigactions: Vec<(i32, crate::sys::KernelSigaction)>,
    /// Process-wide pending signals, raw siginfo records.
    #[serde(with = "hex_list")]
    pub shared_pending: Vec<Vec<u8>>,
    pub threads: Vec<Thread>,
    pub vmas: Vec<Vma>,
    pub fds: Vec<Fd>,
    /// POSIX timers (timer_create), by id.
    #[serde(default)]
    pub posix_timers: Vec<PosixTimer>,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF (alarm() is ITIMER_REAL):
    /// (which, interval ns, value ns), only those armed.
    #[serde(default)]
    pub itimers: Vec<(i32, u64, u64)>,
}

/// A POSIX timer: how it was created and how far it is from firing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    /// SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID (SIGEV_THREAD is glibc's
    /// SIGEV_THREAD_ID to its helper thread).
    pub notify: i32,
    pub signo: i32,
    /// sigev_value as the handler sees it (si_value).
    pub value: u64,
    /// The thread signalled, for SIGEV_THREAD_ID.
    pub tid: i32,
    /// Nanoseconds until the next expiry (0 = disarmed) and the period.
    pub value_ns: u64,
    pub interval_ns: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inheritable: u64,
    pub cap_permitted: u64,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub no_new_privs: bool,
    pub dumpable: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Thread {
    pub tid: i32,
    pub comm: String,
    pub regs: Registers,
    #[serde(with = "hex_bytes")]
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    pub rseq: Option<Rseq>,
    /// set_tid_address(): where the kernel clears the tid at exit (glibc's
    /// pthread tid field, which the resumer also rewrites to the new tid).
    pub clear_child_tid: u64,
    pub robust_list: u64,
    pub robust_list_len: u64,
    /// sigaltstack(): stack pointer, flags, size.
    pub altstack: (u64, i32, u64),
    #[serde(with = "hex_list")]
    pub pending: Vec<Vec<u8>>,
    /// Seccomp filters, oldest first (restored last).
    #[serde(default)]
    pub seccomp: Vec<SeccompFilter>,
}

/// One seccomp filter: its SECCOMP_FILTER_FLAG_* flags and BPF program
/// (struct sock_filter records).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeccompFilter {
    pub flags: u64,
    #[serde(with = "hex_bytes")]
    pub prog: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub growsdown: bool,
    pub kind: VmaKind,
    /// Stored pages: [address, page count, byte offset in pages.img].
    pub pages: Vec<[u64; 3]>,
    /// Pages unchanged since an ancestor image (incremental snapshots):
    /// [address, page count, byte offset in that image's pages.img, depth]
    /// with depth 1 for the parent, 2 for its parent...
    #[serde(default)]
    pub inherited: Vec<[u64; 4]>,
    /// Guard pages (MADV_GUARD_INSTALL, as glibc puts below thread stacks):
    /// [address, page count]; installed again at resume.
    #[serde(default)]
    pub guards: Vec<[u64; 2]>,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    pub fn stored_bytes(&self) -> u64 {
        self.pages.iter().map(|r| r[1] * 4096).sum()
    }
    pub fn prot(&self) -> i32 {
        (if self.read { libc::PROT_READ } else { 0 })
            | (if self.write { libc::PROT_WRITE } else { 0 })
            | (if self.exec { libc::PROT_EXEC } else { 0 })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VmaKind {
    /// Private anonymous memory (incl. [heap] and [stack]).
    Anon {
        name: String,
    },
    /// A file mapped from the host's filesystem, which must be unchanged at resume.
    File {
        path: String,
        offset: u64,
        id: FileId,
    },
    /// Memory with no file to come back from (shared anonymous, memfd,
    /// deleted files, tmpfs files): every page that exists is stored.
    Shmem {
        name: String,
        offset: u64,
        /// The shared object's inode: VMAs (of one or several processes)
        /// with the same one map the same memory again at resume.
        #[serde(default)]
        object: u64,
    },
    /// Kernel-provided mappings that are placed, not dumped.
    Vdso,
    Vvar,
    VvarVclock,
    Vsyscall,
}

/// Identifies a file's version: a resume refuses a file that changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

impl FileId {
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    pub cloexec: bool,
    pub kind: FdKind,
    /// File locks held through this fd (POSIX ones by the process).
    #[serde(default)]
    pub locks: Vec<FileLock>,
}

/// A file lock: POSIX (fcntl, owned by the process), OFD (fcntl, owned by
/// the open file description) or flock (the description too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    pub kind: LockKind,
    pub write: bool,
    pub start: u64,
    /// Last byte locked; None = to the end of the file, whatever it becomes.
    pub end: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    Posix,
    Ofd,
    Flock,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FdKind {
    /// A regular file or directory reopened by path at its offset.
    File {
        path: String,
        flags: i32,
        pos: u64,
        id: FileId,
    },
    /// A file that was deleted while open: its contents are stored.
    DeletedFile {
        path: String,
        flags: i32,
        pos: u64,
        len: u64,
        offset: u64,
    },
    /// A character device reopened by path (/dev/null, /dev/urandom...).
    CharDev { path: String, flags: i32 },
    /// A std stream (fd 0-2) that was a pipe, socket or terminal: what it
    /// becomes is the resumer's choice (--stdio).
    Stdio { was: String, flags: i32 },
    /// An open file description of `Manifest::objects`.
    Object { id: u32 },
}

/// One open file description, shared by every fd that refers to its id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileObject {
    pub id: u32,
    /// File status flags (O_NONBLOCK, O_APPEND, access mode...).
    pub flags: i32,
    /// O_ASYNC owner (F_SETOWN_EX: type, pid) and F_SETSIG signal, if set.
    #[serde(default)]
    pub owner: Option<(i32, i32, i32)>,
    pub kind: ObjectKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ObjectKind {
    /// One end of a pipe or FIFO (`path` set for a FIFO); the buffered
    /// bytes are in the `PipeBuffer` with the same inode.
    Pipe {
        ino: u64,
        /// The write end (a FIFO opened O_RDWR is both: see `flags`).
        write: bool,
        path: Option<String>,
    },
    EventFd {
        count: u64,
        semaphore: bool,
    },
    /// An epoll instance and its registrations; `fd` numbers are those of
    /// the process `owner`, which made them.
    Epoll {
        owner: i32,
        items: Vec<EpollItem>,
    },
    SignalFd {
        mask: u64,
    },
    TimerFd {
        clock: i32,
        /// Nanoseconds until the next expiry (0 = disarmed), period, and
        /// expirations not read yet.
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
    },
    /// A memfd: its contents are `len` bytes at `offset` in pages.img.
    Memfd {
        name: String,
        len: u64,
        offset: u64,
        seals: i32,
        pos: u64,
        /// Its inode: mappings of it map this object again.
        #[serde(default)]
        ino: u64,
    },
    Socket(Socket),
    /// A regular file or directory shared by processes of a tree, reopened
    /// once by path at its offset (so that the offset stays shared).
    File {
        path: String,
        pos: u64,
        id: FileId,
    },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct EpollItem {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

/// The buffered bytes of a pipe (or FIFO) and its capacity.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PipeBuffer {
    pub ino: u64,
    pub size: u32,
    #[serde(with = "hex_bytes")]
    pub data: Vec<u8>,
}

/// A socket: family, type and addresses, options, and for unix sockets
/// the peer and the queued messages.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Socket {
    pub family: i32,
    pub stype: i32,
    pub protocol: i32,
    /// The kernel's inode number, which peers refer to.
    pub ino: u64,
    /// Raw sockaddr bytes (empty when unbound / unconnected).
    #[serde(with = "hex_bytes")]
    pub local: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub remote: Vec<u8>,
    pub state: SocketState,
    /// Listen backlog (listening sockets).
    pub backlog: i32,
    /// Peer's inode (unix sockets; 0 = none).
    pub peer: u64,
    /// Options as (level, name, value) for the int-valued ones that are set.
    pub options: Vec<(i32, i32, i32)>,
    /// Messages queued for reading (stream sockets: one blob).
    #[serde(with = "hex_list")]
    pub queue: Vec<Vec<u8>>,
    /// SHUT_RD / SHUT_WR already done (bit 0 / bit 1).
    pub shutdown: i32,
    /// The owner's working directory, which a relative unix socket path
    /// is bound from.
    #[serde(default)]
    pub cwd: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketState {
    #[default]
    Unconnected,
    Listening,
    Connected,
    /// An established TCP connection saved with --tcp-established close:
    /// it comes back reset.
    Reset,
}

/// Hex (de)serialization of byte blobs, which JSON would otherwise write as
/// number arrays four times as large.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::from_hex(&s).ok_or_else(|| serde::de::Error::custom("bad hex"))
    }
}

mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|b| super::to_hex(b)))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| super::from_hex(s).ok_or_else(|| serde::de::Error::custom("bad hex")))
            .collect()
    }
}

fn to_hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The general-purpose registers, by name, as user_regs_struct has them.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registers {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

macro_rules! regs_convert {
    ($($f:ident),*) => {
        impl From<&libc::user_regs_struct> for Registers {
            fn from(r: &libc::user_regs_struct) -> Self { Registers { $($f: r.$f),* } }
        }
        impl Registers {
            pub fn to_user_regs(&self) -> libc::user_regs_struct {
                // SAFETY: user_regs_struct is plain integers; all-zero is valid.
                let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
                $(r.$f = self.$f;)*
                r
            }
        }
    };
}
regs_convert!(
    r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
    eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
);

/// Writes an image into DIR.partial and publishes it as DIR on `finish`.
/// Dropped unfinished, it removes DIR.partial: no half image is ever visible.
pub struct ImageWriter {
    dir: PathBuf,
    partial: PathBuf,
    pages: File,
    /// Bytes appended or reserved so far (atomic: `reserve` and `write_at`
    /// are used by a copier and a writer thread at once).
    len: std::sync::atomic::AtomicU64,
    /// Checksums of what was written, in any order (see `sums`); behind a
    /// lock because `write_at` is shared by the threads of a lazy snapshot.
    sums: std::sync::Mutex<sums::Sums>,
    finished: bool,
}

/// Creates a file readable and writable by its owner only.
pub fn create_private(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .ctx(|| format!("create {}", path.display()))
}

impl ImageWriter {
    pub fn create(dir: &Path) -> Result<ImageWriter> {
        if dir.exists() {
            return Err(Error::Exists { path: dir.into() });
        }
        let partial = partial_path(dir);
        if partial.exists() {
            // Left by a run that was killed: it was never published.
            fs::remove_dir_all(&partial).ctx(|| format!("remove stale {}", partial.display()))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&partial)
            .ctx(|| format!("create {}", partial.display()))?;
        let pages = create_private(&partial.join(PAGES_FILE))?;
        Ok(ImageWriter {
            dir: dir.into(),
            partial,
            pages,
            len: 0.into(),
            sums: Default::default(),
            finished: false,
        })
    }

    pub fn partial_dir(&self) -> &Path {
        &self.partial
    }

    /// Appends whole pages; returns their offset in pages.img.
    pub fn append(&mut self, data: &[u8]) -> Result<u64> {
        debug_assert_eq!(data.len() % 4096, 0, "pages.img holds whole pages");
        let off = self.reserve(data.len() as u64);
        self.write_at(off, data)?;
        Ok(off)
    }

    /// Reserves `len` bytes (whole pages) to be written later with
    /// `write_at`; returns their offset.
    pub fn reserve(&self, len: u64) -> u64 {
        // No ftruncate here: reserving happens while the target is frozen,
        // and a metadata change can wait on the filesystem's journal (2 ms
        // right after another snapshot's fsync). Writes extend the file;
        // `pages_info` sets its final length.
        self.len
            .fetch_add(len, std::sync::atomic::Ordering::Relaxed)
    }

    fn total(&self) -> u64 {
        self.len.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes into space made by `reserve`.
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        debug_assert!(off + data.len() as u64 <= self.total());
        self.pages
            .write_all_at(data, off)
            .ctx(|| "write pages.img".into())?;
        self.sums.lock().expect("sums").note(off, data);
        self.write_behind(off, data.len() as u64);
        Ok(())
    }

    /// Starts writing back the dirty pages of whole 8 MiB stretches of
    /// pages.img that `[off, off+len)` completes, so that the disk works
    /// while we copy and the final fsync waits only for the tail. (No crate
    /// wraps sync_file_range; it is advice, so its failure is ignored.)
    fn write_behind(&self, off: u64, len: u64) {
        const STRETCH: u64 = 8 << 20;
        let (from, to) = (off / STRETCH, (off + len) / STRETCH);
        if from == to {
            return;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range on our own open file; no memory is passed.
        unsafe {
            libc::sync_file_range(
                self.pages.as_raw_fd(),
                (from * STRETCH) as i64,
                ((to - from) * STRETCH) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }

    /// Appends bytes padded with zeros to a whole page.
    pub fn append_padded(&mut self, data: &[u8]) -> Result<u64> {
        let mut v = data.to_vec();
        v.resize(data.len().div_ceil(4096) * 4096, 0);
        self.append(&v)
    }

    pub fn pages_info(&mut self) -> Result<PagesInfo> {
        let len = self.total();
        self.pages
            .set_len(len)
            .ctx(|| "set the length of pages.img".into())?;
        let sums = self.sums.lock().expect("sums").finish(len, &self.pages)?;
        Ok(PagesInfo {
            len,
            chunk_size: CHUNK_SIZE,
            chunk_checksums: sums,
        })
    }

    /// Writes the manifest, makes everything durable and publishes DIR.
    pub fn finish(mut self, manifest: &Manifest) -> Result<PathBuf> {
        let body = serde_json::to_vec(manifest).expect("manifest serializes");
        let mut f = create_private(&self.partial.join(MANIFEST_FILE))?;
        f.write_all(&encode_header(&body))
            .and_then(|_| f.write_all(&body))
            .and_then(|_| f.sync_all())
            .ctx(|| "write manifest".into())?;
        self.pages.sync_all().ctx(|| "fsync pages.img".into())?;
        sync_dir(&self.partial)?;
        fs::rename(&self.partial, &self.dir).ctx(|| format!("publish {}", self.dir.display()))?;
        sync_dir(self.dir.parent().unwrap_or(Path::new(".")))?;
        self.finished = true;
        Ok(self.dir.clone())
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_dir_all(&self.partial);
        }
    }
}

pub fn partial_path(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("fsync {}", d.display()))
}

fn encode_header(body: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    h[24..32].copy_from_slice(&xxh3_64(body).to_le_bytes());
    h
}

/// An image opened for reading: the manifest is checked; `verify_pages`
/// checks pages.img, and `pages` maps it.
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The checksum of the manifest's body (what children refer to).
    pub manifest_sum: u64,
}

impl Image {
    /// Opens and checks the manifest (magic, version, length, checksum, JSON).
    pub fn open(dir: &Path) -> Result<Image> {
        let bad = |what: String| Error::bad_image(dir, what);
        if !dir.is_dir() {
            return Err(bad(
                "not a directory (give the --out directory of a snapshot)".into(),
            ));
        }
        let path = dir.join(MANIFEST_FILE);
        let raw = fs::read(&path).map_err(|e| bad(format!("cannot read {MANIFEST_FILE}: {e}")))?;
        if raw.len() < HEADER_LEN || raw[..8] != MAGIC {
            return Err(bad(format!(
                "{MANIFEST_FILE} is not an umlctl image manifest (bad magic)"
            )));
        }
        let version = u32::from_le_bytes(raw[8..12].try_into().expect("4"));
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version} is not supported (this umlctl reads version {FORMAT_VERSION}); use a matching umlctl"
            )));
        }
        let body_len = u64::from_le_bytes(raw[16..24].try_into().expect("8")) as usize;
        let sum = u64::from_le_bytes(raw[24..32].try_into().expect("8"));
        let body = &raw[HEADER_LEN..];
        if body.len() != body_len {
            return Err(bad(format!(
                "{MANIFEST_FILE} is truncated or padded ({} body bytes, header says {body_len})",
                body.len()
            )));
        }
        if xxh3_64(body) != sum {
            return Err(bad(format!(
                "{MANIFEST_FILE} checksum mismatch: the file is corrupt"
            )));
        }
        let manifest: Manifest = serde_json::from_slice(body)
            .map_err(|e| bad(format!("{MANIFEST_FILE} does not parse: {e}")))?;
        Ok(Image {
            dir: dir.into(),
            manifest,
            manifest_sum: sum,
        })
    }

    /// Opens, then checks pages.img in full: length and every chunk checksum,
    /// and that every page run points inside it.
    pub fn open_verified(dir: &Path) -> Result<Image> {
        let img = Image::open(dir)?;
        img.verify_pages()?;
        Ok(img)
    }

    pub fn verify_pages(&self) -> Result<()> {
        self.verify_index()?;
        let bad = |what: String| Error::bad_image(&self.dir, what);
        let info = &self.manifest.pages;
        let map = self.pages()?;
        let chunks = map
            .chunks(info.chunk_size as usize)
            .zip(&info.chunk_checksums);
        for (i, (chunk, sum)) in chunks.enumerate() {
            if xxh3_64(chunk) != *sum {
                return Err(bad(format!(
                    "{PAGES_FILE} chunk {i} (bytes {}..) checksum mismatch: the file is corrupt",
                    i as u64 * info.chunk_size
                )));
            }
        }
        Ok(())
    }

    /// The cheap checks, for a lazy resume that verifies each chunk's
    /// checksum when it first reads it: pages.img's length, the checksum
    /// list's coverage, and that every page run points inside pages.img.
    pub fn verify_index(&self) -> Result<()> {
        let bad = |what: String| Error::bad_image(&self.dir, what);
        let info = &self.manifest.pages;
        let path = self.dir.join(PAGES_FILE);
        let len = fs::metadata(&path)
            .map_err(|e| bad(format!("cannot read {PAGES_FILE}: {e}")))?
            .len();
        if len != info.len {
            return Err(bad(format!(
                "{PAGES_FILE} has {len} bytes, the manifest says {}: truncated or altered",
                info.len
            )));
        }
        let expected_chunks = info.len.div_ceil(info.chunk_size.max(1)) as usize;
        if info.chunk_size == 0 || info.chunk_checksums.len() != expected_chunks {
            return Err(bad(
                "the manifest's chunk checksums do not cover pages.img".into()
            ));
        }
        for p in &self.manifest.processes {
            for v in &p.vmas {
                for r in &v.pages {
                    let inside = r[0] >= v.start && r[0] + r[1] * 4096 <= v.end;
                    if !inside || r[2] + r[1] * 4096 > info.len || r[2] % 4096 != 0 {
                        return Err(bad(format!(
                            "page run {:#x}+{} is out of bounds",
                            r[0], r[1]
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The images this one builds on, parent first, each checked to be
    /// the one the child was taken against.
    pub fn ancestors(&self) -> Result<Vec<Image>> {
        let mut out: Vec<Image> = Vec::new();
        let mut next = self.manifest.parent.clone();
        while let Some(p) = next {
            let child = out.last().map_or(&self.dir, |i| &i.dir).clone();
            let img = Image::open(&p.dir).map_err(|e| {
                Error::bad_image(&child, format!("its parent image {} cannot be used ({e}); flatten images before moving or deleting their parents", p.dir.display()))
            })?;
            if img.manifest_sum != p.manifest_sum {
                return Err(Error::bad_image(
                    &child,
                    format!(
                        "its parent image {} changed since the child was taken",
                        p.dir.display()
                    ),
                ));
            }
            if out.len() > 64 {
                return Err(Error::bad_image(
                    &self.dir,
                    "its chain of parent images is too long (a loop?)",
                ));
            }
            next = img.manifest.parent.clone();
            out.push(img);
        }
        Ok(out)
    }

    /// pages.img, mapped read-only.
    pub fn pages(&self) -> Result<Pages> {
        let path = self.dir.join(PAGES_FILE);
        let f = File::open(&path)
            .map_err(|e| Error::bad_image(&self.dir, format!("cannot open {PAGES_FILE}: {e}")))?;
        let len = f.metadata().ctx(|| "stat pages.img".into())?.len();
        if len == 0 {
            return Ok(Pages { map: None });
        }
        // SAFETY: the image is ours (0600) and not modified while mapped;
        // a concurrent truncation would be a user error that SIGBUSes.
        let map = unsafe { memmap2::Mmap::map(&f) }.ctx(|| "mmap pages.img".into())?;
        Ok(Pages { map: Some(map) })
    }
}

/// Writes `dir` (an incremental image) with everything its ancestors hold
/// for it into the new, standalone image `out`. Its own pages.img is
/// copied first, so that every offset in the manifest stays valid; the
/// inherited pages follow.
pub fn flatten(dir: &Path, out: &Path) -> Result<PathBuf> {
    let img = Image::open(dir)?;
    img.verify_pages()?;
    let ancestors = img.ancestors()?;
    for a in &ancestors {
        a.verify_pages()?;
    }
    let layers = ancestors
        .iter()
        .map(|a| a.pages())
        .collect::<Result<Vec<_>>>()?;
    let mut writer = ImageWriter::create(out)?;
    let own = img.pages()?;
    let mut at = 0;
    while at < own.len() {
        let end = (at + (8 << 20)).min(own.len());
        writer.append(&own[at..end])?;
        at = end;
    }
    let mut manifest = img.manifest.clone();
    for p in &mut manifest.processes {
        for v in &mut p.vmas {
            for r in std::mem::take(&mut v.inherited) {
                let len = r[1] * 4096;
                let data = layers
                    .get((r[3] as usize).wrapping_sub(1))
                    .and_then(|l| l.get(r[2] as usize..(r[2] + len) as usize))
                    .ok_or_else(|| {
                        Error::bad_image(
                            dir,
                            format!("inherited pages at {:#x} point outside its parent", r[0]),
                        )
                    })?;
                let off = writer.append(data)?;
                v.pages.push([r[0], r[1], off]);
            }
            v.pages.sort_by_key(|r| r[0]);
        }
    }
    manifest.parent = None;
    manifest.pages = writer.pages_info()?;
    writer.finish(&manifest)
}

/// pages.img mapped in memory (empty images have no mapping).
pub struct Pages {
    map: Option<memmap2::Mmap>,
}

impl std::ops::Deref for Pages {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

#[cfg(test)]
pub(crate) mod tests;

mod sums;
