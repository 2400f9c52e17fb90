//! Where VMs live on the host. One directory, `$UMLCTL_VM_DIR` (default
//! /var/lib/umlctl/vm as root, else ~/.local/state/umlctl/vm), mode 0700,
//! holding one directory per VM:
//!
//! ```text
//! NAME/vm.json          the VM's settings (image, memory, network, disk kind)
//! NAME/disk/            its disk layer: a cowfs store over images/KEY/
//!                       (or, with --disk uml-cow: NAME/disk.cow, UML's COW
//!                       file, and NAME/checkpoints/CK/disk.cow)
//! NAME/console.log      console output of the current or last boot
//! NAME/dead.json        why the VM died, when it did without `vm stop`
//! NAME/lock             serialises start, stop and rm
//! NAME/run/             only while running: supervisor.pid, uml.pid,
//!                       control.sock, uml/mconsole (UML's own umid dir),
//!                       disk/ (the cowfs mount UML's disk is read from)
//! images/KEY/disk.img   a base image, shared by the cowfs stores of its VMs
//! ```
//! Every file is created 0600 and every directory 0700.

use super::disk::DiskKind;
use crate::exit::{fail, CliError, CliResult, Code};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The directory holding every VM.
pub struct Store {
    pub root: PathBuf,
}

/// A VM's settings, as `vm create` wrote them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    /// Absolute path of the read-only base image.
    pub image: PathBuf,
    pub disk: DiskKind,
    /// For cowfs disks: the store's base directory (under images/).
    pub base_dir: Option<PathBuf>,
    pub mem_mib: u64,
    /// The VM's address on the host-only network, if it has a NIC.
    pub ip: Option<String>,
    pub created_unix: u64,
}

/// A VM on disk: its directory and settings.
#[derive(Clone)]
pub struct Vm {
    pub dir: PathBuf,
    pub config: VmConfig,
}

/// What a VM is doing, as far as the host can see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Status {
    Stopped,
    Running {
        pid: u32,
    },
    /// Its UML process ended without `vm stop` (crash, kill, OOM on the host).
    Dead {
        reason: String,
    },
}

impl Status {
    pub fn word(&self) -> &'static str {
        match self {
            Status::Stopped => "stopped",
            Status::Running { .. } => "running",
            Status::Dead { .. } => "dead",
        }
    }
}

impl Store {
    pub fn open() -> CliResult<Store> {
        let root = match std::env::var_os("UMLCTL_VM_DIR") {
            Some(d) => PathBuf::from(d),
            None if nix::unistd::geteuid().is_root() => PathBuf::from("/var/lib/umlctl/vm"),
            None => {
                let home = std::env::var_os("HOME").ok_or_else(|| {
                    CliError::new(Code::Environment, "HOME is not set: set UMLCTL_VM_DIR")
                })?;
                PathBuf::from(home).join(".local/state/umlctl/vm")
            }
        };
        private_dir(&root)?;
        Ok(Store { root })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The VM called `name`, or a NotFound error naming it.
    pub fn load(&self, name: &str) -> CliResult<Vm> {
        check_name(name)?;
        let dir = self.path(name);
        let text = match std::fs::read_to_string(dir.join("vm.json")) {
            Ok(t) => t,
            Err(_) => {
                return fail(
                    Code::NotFound,
                    format!("no VM named {name}: see `umlctl vm list`, or create it with `umlctl vm create {name} --image IMG`"),
                )
            }
        };
        let config = serde_json::from_str(&text).map_err(|e| {
            CliError::new(
                Code::BadImage,
                format!(
                    "{}/vm.json is corrupt ({e}): remove the VM with `umlctl vm rm {name}`",
                    dir.display()
                ),
            )
        })?;
        Ok(Vm { dir, config })
    }

    /// Every VM, sorted by name.
    pub fn all(&self) -> CliResult<Vec<Vm>> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("vm.json").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names.iter().map(|n| self.load(n)).collect()
    }
}

impl Vm {
    pub fn name(&self) -> &str {
        &self.config.name
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    /// Deletes run/ as one step for readers: it is renamed aside first, so
    /// `status` never sees a run/ whose supervisor.pid is already gone (that
    /// reads as "killed from outside") while the supervisor is cleaning up.
    pub fn remove_run_dir(&self) {
        let aside = self.dir.join("run.gone");
        let _ = std::fs::remove_dir_all(&aside);
        match std::fs::rename(self.run_dir(), &aside) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&aside);
            }
            Err(_) => {
                let _ = std::fs::remove_dir_all(self.run_dir());
            }
        }
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join("control.sock")
    }
    /// UML's umid directory (`uml_dir=run umid=uml`), holding its mconsole socket.
    pub fn mconsole_socket(&self) -> PathBuf {
        self.run_dir().join("uml/mconsole")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn dead_file(&self) -> PathBuf {
        self.dir.join("dead.json")
    }

    pub fn save(&self) -> CliResult {
        let json = serde_json::to_vec_pretty(&self.config).expect("serializable config");
        write_private(&self.dir.join("vm.json"), &json)
    }

    /// Takes the VM's lock, held until the returned guard drops.
    pub fn lock(&self) -> CliResult<Flock<File>> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join("lock"))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| {
            CliError::new(Code::Internal, format!("locking VM {}: {e}", self.name()))
        })
    }

    /// The supervisor's pid, if one is alive for this VM.
    pub fn supervisor_pid(&self) -> Option<u32> {
        let ours = format!("__supervise\0{}\0", self.name());
        read_live_pid(&self.run_dir().join("supervisor.pid"), &ours)
    }

    /// The UML kernel process's pid, if it is alive.
    pub fn uml_pid(&self) -> Option<u32> {
        let ours = format!("uml_dir={}\0", self.run_dir().display());
        read_live_pid(&self.run_dir().join("uml.pid"), &ours)
    }

    pub fn status(&self) -> Status {
        if let Some(sup) = self.supervisor_pid() {
            // Without a UML pid the supervisor is starting UML or cleaning up.
            let pid = self.uml_pid().unwrap_or(sup);
            return Status::Running { pid };
        }
        if self.run_dir().exists() {
            return Status::Dead {
                reason: "its supervisor and UML processes are gone (killed from outside)".into(),
            };
        }
        match std::fs::read_to_string(self.dead_file()) {
            Ok(t) => Status::Dead {
                reason: serde_json::from_str::<serde_json::Value>(&t)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_string))
                    .unwrap_or(t),
            },
            Err(_) => Status::Stopped,
        }
    }
}

/// VM and checkpoint names: short, and safe as a file name and a hostname.
pub fn check_name(name: &str) -> CliResult {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        fail(
            Code::Usage,
            format!("bad name {name:?}: use 1 to 32 letters, digits, '-' or '_', starting with a letter or digit"),
        )
    }
}

/// Parses sizes such as 128M, 1G, 512K or a byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("bad size {s:?}: use a number with K, M or G")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}: use a number with K, M or G, e.g. 128M"))
}

/// Creates a directory (and parents) with mode 0700.
pub fn private_dir(path: &Path) -> CliResult {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| {
            CliError::new(
                Code::Environment,
                format!("cannot create {}: {e}", path.display()),
            )
        })
}

/// Writes a file with mode 0600, replacing it atomically.
pub fn write_private(path: &Path, data: &[u8]) -> CliResult {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie still answers kill(0); /proc/PID/stat tells it apart.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// The processes of group `pgid`, zombies included.
pub fn group_members(pgid: i32) -> std::io::Result<Vec<u32>> {
    Ok(std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32)))
                .is_ok_and(|g| g.as_raw() == pgid)
        })
        .collect())
}

/// The pid in a pid file, if that process lives and is still the one we
/// started (its command line holds `mark`): a pid file that outlived a host
/// reboot must not make an unrelated process look like our VM.
fn read_live_pid(path: &Path, mark: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = String::from_utf8_lossy(&cmdline).contains(mark);
    (ours && pid_alive(pid)).then_some(pid)
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("web-1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"a".repeat(33)).is_err());
    }
}
