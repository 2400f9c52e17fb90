//! `vm image build`: a guest root filesystem built offline, with no mount
//! and no root needed: busybox-static and its applet links in a directory
//! tree, our /init, inittab and exec agent (tools/uml/), the user's extra
//! files, then `mkfs.ext4 -d TREE IMAGE`.

use super::state::parse_size;
use crate::exit::{fail, CliError, CliResult, Code};
use crate::output::Output;
use serde::Serialize;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const INIT: &str = include_str!("../../../../tools/uml/init");
const INITTAB: &str = include_str!("../../../../tools/uml/inittab");
const AGENT: &str = include_str!("../../../../tools/uml/agent");
const BUSYBOX: &str = "/bin/busybox";

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The image file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Image size (K, M or G).
    #[arg(long, default_value = "256M")]
    pub size: String,
    /// Copy a host file or directory into the image: HOSTPATH:GUESTPATH
    /// (repeatable). An executable /etc/umlctl/start runs at boot.
    #[arg(long = "add", value_name = "HOSTPATH:GUESTPATH")]
    pub add: Vec<String>,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Serialize)]
struct Built {
    image: PathBuf,
    size_bytes: u64,
    added: Vec<String>,
}

pub fn build(out: Output, a: BuildArgs) -> CliResult {
    let size = parse_size(&a.size).map_err(|e| CliError::new(Code::Usage, e))?;
    if size < 16 << 20 {
        return fail(
            Code::Usage,
            format!("--size {} is too small: use 32M or more", a.size),
        );
    }
    if a.out.exists() && !a.force {
        return fail(
            Code::Conflict,
            format!(
                "{} already exists: pick another --out or pass --force",
                a.out.display()
            ),
        );
    }
    let adds = a
        .add
        .iter()
        .map(|s| parse_add(s))
        .collect::<CliResult<Vec<_>>>()?;
    check_busybox()?;

    let tree = tempfile::Builder::new()
        .prefix("umlctl-image-")
        .tempdir()
        .map_err(|e| {
            CliError::new(
                Code::Environment,
                format!("cannot make a temporary directory: {e}"),
            )
        })?;
    lay_out_tree(tree.path())?;
    for (host, guest) in &adds {
        copy_in(host, &tree.path().join(guest.trim_start_matches('/')))?;
    }
    mkfs(tree.path(), &a.out, size)?;
    out.emit(
        &Built {
            image: a.out.clone(),
            size_bytes: size,
            added: a.add.clone(),
        },
        || format!("built {} ({} MiB)", a.out.display(), size >> 20),
    );
    Ok(())
}

fn parse_add(s: &str) -> CliResult<(PathBuf, String)> {
    match s.split_once(':') {
        Some((h, g)) if !h.is_empty() && g.starts_with('/') && g.len() > 1 => {
            let host = PathBuf::from(h);
            if !host.exists() {
                return fail(
                    Code::NotFound,
                    format!("--add {s}: host path {h} does not exist"),
                );
            }
            Ok((host, g.to_string()))
        }
        _ => fail(
            Code::Usage,
            format!("bad --add {s:?}: use HOSTPATH:GUESTPATH with an absolute guest path"),
        ),
    }
}

/// The guest has no C library: busybox must be the static build.
fn check_busybox() -> CliResult {
    let data = std::fs::read(BUSYBOX).map_err(|_| {
        CliError::new(
            Code::Environment,
            format!("{BUSYBOX} is missing: apt-get install busybox-static (or run tools/setup)"),
        )
    })?;
    if has_interpreter(&data) {
        return fail(
            Code::Environment,
            format!("{BUSYBOX} is dynamically linked: apt-get install busybox-static"),
        );
    }
    Ok(())
}

/// Whether an ELF64 file names a program interpreter (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).any(|i| u32_at(phoff + i * phentsize) == Some(PT_INTERP))
}

fn lay_out_tree(root: &Path) -> CliResult {
    for d in [
        "bin",
        "sbin",
        "etc/umlctl",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var",
        "usr/bin",
        "usr/sbin",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox"))?;
    // One link per applet, where busybox itself would install it.
    let list = Command::new(BUSYBOX).arg("--list-full").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = root.join(applet);
        if link.exists() || applet.ends_with("busybox") {
            continue;
        }
        let depth = applet.matches('/').count();
        symlink(format!("{}bin/busybox", "../".repeat(depth)), &link)?;
    }
    write_exec(&root.join("init"), INIT)?;
    write_exec(&root.join("sbin/umlctl-agent"), AGENT)?;
    std::fs::write(root.join("etc/inittab"), INITTAB)?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

fn write_exec(path: &Path, text: &str) -> CliResult {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn copy_in(host: &Path, dest: &Path) -> CliResult {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // cp -a keeps modes and copies directories whole.
    let st = Command::new("cp").arg("-a").arg(host).arg(dest).status()?;
    if !st.success() {
        return fail(
            Code::Internal,
            format!("copying {} into the image failed", host.display()),
        );
    }
    Ok(())
}

fn mkfs(tree: &Path, image: &Path, size: u64) -> CliResult {
    let _ = std::fs::remove_file(image);
    let res = Command::new("mkfs.ext4")
        // Initialise inode tables and journal now: otherwise every guest's
        // first boot writes them (ext4lazyinit), costing each VM's layer MBs.
        .args([
            "-q",
            "-F",
            "-L",
            "umlroot",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
        ])
        .arg(tree)
        .arg(image)
        .arg(format!("{}k", size / 1024))
        .output();
    match res {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(
            Code::Environment,
            "mkfs.ext4 is missing: apt-get install e2fsprogs (or run tools/setup)",
        ),
        Err(e) => Err(e.into()),
        Ok(o) if !o.status.success() => {
            let _ = std::fs::remove_file(image);
            fail(
                Code::Internal,
                format!(
                    "mkfs.ext4 failed for {}: {}",
                    image.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            )
        }
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_syntax() {
        assert!(parse_add("/etc/hostname:/etc/x").is_ok());
        assert_eq!(
            parse_add("/etc/hostname:rel").unwrap_err().code,
            Code::Usage
        );
        assert_eq!(
            parse_add("/nonexistent-x:/a").unwrap_err().code,
            Code::NotFound
        );
    }

    #[test]
    fn static_and_dynamic_elf() {
        assert!(has_interpreter(&std::fs::read("/bin/sh").unwrap()));
        if let Ok(bb) = std::fs::read(BUSYBOX) {
            assert!(!has_interpreter(&bb));
        }
    }
}
