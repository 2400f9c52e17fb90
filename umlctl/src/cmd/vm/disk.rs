//! VM disks: a private copy-on-write layer over a shared, read-only base
//! image, in one of two kinds.
//!
//! - `cowfs` (the default): the VM's directory holds a cowfs store (`disk/`)
//!   over a base directory `$UMLCTL_VM_DIR/images/KEY/` that holds the image
//!   as `disk.img` (a hard link, or a copy when the image is on another
//!   filesystem; KEY is the image's device and inode, so VMs of one image
//!   share it). The supervisor mounts the store at `run/disk/` and UML opens
//!   `run/disk/disk.img` as a plain disk. Checkpoint and rollback are cowfs's
//!   own, O(1) in the data size.
//! - `uml-cow`: UML's own COW file (`ubd0=disk.cow,IMAGE`). A checkpoint is a
//!   sparse copy of the COW file, a rollback copies it back: both cost the
//!   size of the VM's own writes. Kept as the baseline for `bench vm` and for
//!   hosts without FUSE.

use super::state::{private_dir, Vm};
use crate::exit::{CliError, CliResult, Code};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DiskKind {
    /// A cowfs store over the image (block copy-up, O(1) checkpoints).
    Cowfs,
    /// UML's own COW file over the image.
    UmlCow,
}

/// The image's name inside a cowfs base directory.
const BASE_FILE: &str = "disk.img";

/// Sets up a new VM's disk layer; returns the cowfs base directory, if any.
pub fn create(vm_dir: &Path, kind: DiskKind, image: &Path) -> CliResult<Option<PathBuf>> {
    match kind {
        DiskKind::UmlCow => Ok(None), // UML makes the COW file at first boot
        DiskKind::Cowfs => {
            let base = base_dir_for(vm_dir.parent().unwrap_or(vm_dir), image)?;
            cowfs::Store::create(&vm_dir.join("disk"), &base, None).map_err(cowfs_error)?;
            Ok(Some(base))
        }
    }
}

/// The shared base directory of `image`, made on first use.
fn base_dir_for(vm_root: &Path, image: &Path) -> CliResult<PathBuf> {
    let meta = std::fs::metadata(image)?;
    let images = vm_root.join("images");
    let dir = images.join(format!("{:x}-{:x}", meta.dev(), meta.ino()));
    if dir.join(BASE_FILE).is_file() {
        return Ok(dir);
    }
    private_dir(&images)?;
    let tmp = images.join(format!(".new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    private_dir(&tmp)?;
    if std::fs::hard_link(image, tmp.join(BASE_FILE)).is_err() {
        tracing::warn!(image = %image.display(), "image is on another filesystem: copying it once as the base");
        sparse_copy(image, &tmp.join(BASE_FILE))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another create made it first; theirs is as good as ours.
        Err(_) if dir.join(BASE_FILE).is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e.into()),
    }
}

/// The file the VM's layer sits on.
pub fn base_image(vm: &Vm) -> PathBuf {
    match &vm.config.base_dir {
        Some(dir) => dir.join(BASE_FILE),
        None => vm.config.image.clone(),
    }
}

/// The `ubd0=` argument for UML.
pub fn kernel_arg(vm: &Vm) -> String {
    match vm.config.disk {
        DiskKind::UmlCow => format!(
            "ubd0={},{}",
            vm.dir.join("disk.cow").display(),
            vm.config.image.display()
        ),
        DiskKind::Cowfs => format!("ubd0={}", mounted_image(vm).display()),
    }
}

fn mountpoint(vm: &Vm) -> PathBuf {
    vm.run_dir().join("disk")
}

fn mounted_image(vm: &Vm) -> PathBuf {
    mountpoint(vm).join(BASE_FILE)
}

fn store(vm: &Vm) -> CliResult<cowfs::Store> {
    cowfs::Store::open(&vm.dir.join("disk")).map_err(cowfs_error)
}

/// Makes the disk available for UML: mounts the cowfs store, served by this
/// process until the returned handle drops.
pub fn attach(vm: &Vm) -> CliResult<Option<cowfs::Mount>> {
    if vm.config.disk == DiskKind::UmlCow {
        return Ok(None);
    }
    private_dir(&mountpoint(vm))?;
    let mount = store(vm)?
        .mount(&mountpoint(vm), &cowfs::MountOptions::default())
        .map_err(cowfs_error)?;
    Ok(Some(mount))
}

/// Unmounts the VM's disk once UML is gone. If something still holds it,
/// the mount is detached lazily rather than left behind in `run/` (whose
/// deletion would then fail): the writes it holds are lost only as in a
/// crash, and the kernel drops it when its last user closes.
pub fn detach(vm: &Vm, mount: cowfs::Mount) {
    if let Err(e) = mount.unmount() {
        tracing::warn!(vm = vm.name(), "unmounting the disk: {e}; detaching it");
        let _ = nix::mount::umount2(&mountpoint(vm), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Removes the mount a killed supervisor left (its FUSE server is gone).
pub fn detach_stale(vm: &Vm) {
    if vm.config.disk == DiskKind::Cowfs && cowfs::is_mountpoint(&mountpoint(vm)) {
        let _ = nix::mount::umount2(&mountpoint(vm), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Flushes what the host holds for the disk (page cache over FUSE) to the
/// layer, so that a checkpoint taken now contains it.
pub fn flush(vm: &Vm) -> CliResult {
    let path = match vm.config.disk {
        DiskKind::UmlCow => vm.dir.join("disk.cow"),
        DiskKind::Cowfs => mounted_image(vm),
    };
    if path.exists() {
        File::open(&path)?.sync_all()?;
    }
    Ok(())
}

/// Records the VM's disk as it is now under `name`.
pub fn checkpoint(vm: &Vm, name: &str) -> CliResult {
    match vm.config.disk {
        DiskKind::Cowfs => store(vm)?.checkpoint(name).map(|_| ()).map_err(cowfs_error),
        DiskKind::UmlCow => {
            let dir = vm.dir.join("checkpoints").join(name);
            private_dir(&dir)?;
            // A VM that never booted has no layer yet: nothing to save.
            let cow = vm.dir.join("disk.cow");
            if cow.exists() {
                sparse_copy(&cow, &dir.join("disk.cow"))?;
            }
            Ok(())
        }
    }
}

/// Puts the disk back as checkpoint `name` left it (the VM is stopped).
pub fn rollback(vm: &Vm, name: &str) -> CliResult {
    match vm.config.disk {
        DiskKind::Cowfs => store(vm)?.rollback(name).map_err(cowfs_error),
        DiskKind::UmlCow => {
            let saved = vm.dir.join("checkpoints").join(name).join("disk.cow");
            let cow = vm.dir.join("disk.cow");
            if saved.exists() {
                sparse_copy(&saved, &cow)
            } else {
                let _ = std::fs::remove_file(cow);
                Ok(())
            }
        }
    }
}

/// The VM's checkpoints, oldest first.
pub fn checkpoints(vm: &Vm) -> Vec<String> {
    match vm.config.disk {
        DiskKind::Cowfs => store(vm)
            .and_then(|s| s.list().map_err(cowfs_error))
            .map(|l| l.into_iter().map(|c| c.name).collect())
            .unwrap_or_default(),
        DiskKind::UmlCow => {
            let mut v: Vec<(std::time::SystemTime, String)> =
                std::fs::read_dir(vm.dir.join("checkpoints"))
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        Some((
                            e.metadata().ok()?.modified().ok()?,
                            e.file_name().into_string().ok()?,
                        ))
                    })
                    .collect();
            v.sort();
            v.into_iter().map(|(_, n)| n).collect()
        }
    }
}

/// Host bytes the VM's own layer and checkpoints take (not the base).
pub fn usage(vm: &Vm) -> u64 {
    match vm.config.disk {
        DiskKind::Cowfs => tree_bytes(&vm.dir.join("disk")),
        DiskKind::UmlCow => {
            allocated_bytes(&vm.dir.join("disk.cow")) + tree_bytes(&vm.dir.join("checkpoints"))
        }
    }
}

/// Deletes a cowfs base directory no VM uses any more (after `vm rm`).
pub fn release_base(base: &Path, still_used: bool) {
    if !still_used {
        let _ = std::fs::remove_dir_all(base);
    }
}

/// cowfs errors with their exit codes (`fs::cli`), named as the VM's disk.
fn cowfs_error(e: cowfs::Error) -> CliError {
    let mut err = crate::cmd::fs::cli(e);
    err.message = format!("VM disk (cowfs): {}", err.message);
    err
}

/// Bytes allocated to a file (sparse files count only their data).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::symlink_metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Bytes allocated to every file under a directory (or to one file).
pub fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return allocated_bytes(dir);
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            _ => allocated_bytes(&e.path()),
        })
        .sum()
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
