//! `vm checkpoint` and `vm rollback`: the paper's asynchronous path. A
//! checkpoint freezes a running VM just long enough to copy its disk layer
//! (after a guest `sync`, so the copy holds everything written so far); a
//! rollback stops the VM, puts the layer back, and starts it again.

use super::lifecycle::{boot, stop_locked};
use super::state::{check_name, now_unix, private_dir, write_private, Status, Store, Vm};
use super::{control, disk, mconsole};
use crate::exit::{fail, CliError, CliResult, Code};
use crate::output::Output;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct CheckpointArgs {
    pub name: String,
    /// The checkpoint's name.
    pub checkpoint: String,
}

#[derive(Serialize)]
struct Taken<'a> {
    vm: &'a str,
    checkpoint: &'a str,
    running: bool,
    /// How long the VM was frozen.
    pause_ms: f64,
    total_ms: f64,
    bytes: u64,
}

/// The checkpoints of a VM, sorted.
pub fn names(vm: &Vm) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(vm.dir.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("meta.json").is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn checkpoint(out: Output, a: CheckpointArgs) -> CliResult {
    check_name(&a.checkpoint)?;
    let store = Store::open()?;
    let vm = store.load(&a.name)?;
    let _lock = vm.lock()?;
    let dir = vm.checkpoint_dir(&a.checkpoint);
    if dir.exists() {
        return fail(
            Code::Conflict,
            format!(
                "VM {} already has a checkpoint {}: pick another name",
                a.name, a.checkpoint
            ),
        );
    }
    let began = Instant::now();
    let running = matches!(vm.status(), Status::Running { .. });
    private_dir(&dir)?;
    let pause = match running {
        true => copy_while_frozen(&vm, &dir),
        false => copy_layer(&vm, &dir).map(|_| Duration::ZERO),
    }
    .inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&dir);
    })?;
    let meta =
        serde_json::json!({"vm": a.name, "created_unix": now_unix(), "vm_was_running": running});
    write_private(&dir.join("meta.json"), meta.to_string().as_bytes())?;
    let taken = Taken {
        vm: &a.name,
        checkpoint: &a.checkpoint,
        running,
        pause_ms: pause.as_secs_f64() * 1e3,
        total_ms: began.elapsed().as_secs_f64() * 1e3,
        bytes: disk::allocated_bytes(&dir.join("disk.cow")),
    };
    out.emit(&taken, || {
        format!(
            "checkpoint {} of VM {}: {} KiB, VM paused {:.1} ms, {:.1} ms in all",
            taken.checkpoint,
            taken.vm,
            taken.bytes / 1024,
            taken.pause_ms,
            taken.total_ms
        )
    });
    Ok(())
}

/// Guest sync, freeze (mconsole stop), copy, thaw (mconsole go). Returns
/// how long the VM was frozen. The VM is thawed whatever happens.
fn copy_while_frozen(vm: &Vm, dir: &std::path::Path) -> CliResult<Duration> {
    let sync = control::exec(vm, &["sync".to_string()], Some(Duration::from_secs(60)))?;
    if sync.status != 0 {
        return fail(Code::Internal, format!("sync in VM {} failed", vm.name()));
    }
    let mc = vm.mconsole_socket();
    let mc_err = |e: std::io::Error| {
        CliError::new(Code::Internal, format!("mconsole of VM {}: {e}", vm.name()))
    };
    mconsole::call(&mc, "stop").map_err(mc_err)?;
    let frozen = Instant::now();
    let copied = copy_layer(vm, dir);
    let pause = frozen.elapsed();
    mconsole::call(&mc, "go").map_err(mc_err)?;
    copied.map(|_| pause)
}

fn copy_layer(vm: &Vm, dir: &std::path::Path) -> CliResult {
    // A VM that never booted has no layer yet: the checkpoint is "empty".
    if vm.disk().exists() {
        disk::sparse_copy(&vm.disk(), &dir.join("disk.cow"))?;
    }
    Ok(())
}

pub fn rollback(out: Output, a: CheckpointArgs) -> CliResult {
    let store = Store::open()?;
    let vm = store.load(&a.name)?;
    let _lock = vm.lock()?;
    let dir = vm.checkpoint_dir(&a.checkpoint);
    if !dir.join("meta.json").is_file() {
        let have = names(&vm);
        return fail(
            Code::NotFound,
            format!(
                "VM {} has no checkpoint {} (it has: {})",
                a.name,
                a.checkpoint,
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            ),
        );
    }
    let began = Instant::now();
    let was_running = matches!(vm.status(), Status::Running { .. });
    if was_running {
        stop_locked(&vm, Duration::from_secs(20))?;
    }
    let saved = dir.join("disk.cow");
    if saved.exists() {
        disk::sparse_copy(&saved, &vm.disk())?;
    } else {
        let _ = std::fs::remove_file(vm.disk());
    }
    if was_running {
        boot(&store, &vm)?;
    }
    let ms = began.elapsed().as_secs_f64() * 1e3;
    out.emit(
        &serde_json::json!({"vm": a.name, "checkpoint": a.checkpoint, "restarted": was_running, "ms": ms}),
        || format!("VM {} rolled back to {} in {ms:.0} ms", a.name, a.checkpoint),
    );
    Ok(())
}
