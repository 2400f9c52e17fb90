//! `vm checkpoint` and `vm rollback`: the paper's asynchronous path. A
//! checkpoint of a running VM syncs the guest, freezes it (mconsole `stop`)
//! just long enough to flush and record its disk layer, and thaws it (`go`):
//! the VM keeps running. A rollback stops the VM, puts the layer back as the
//! checkpoint left it, and starts the VM again if it was running.

use super::lifecycle::{boot, stop_locked};
use super::state::{check_name, Status, Store, Vm};
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
}

pub fn checkpoint(out: Output, a: CheckpointArgs) -> CliResult {
    check_name(&a.checkpoint)?;
    let store = Store::open()?;
    let vm = store.load(&a.name)?;
    let _lock = vm.lock()?;
    if disk::checkpoints(&vm).contains(&a.checkpoint) {
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
    let pause = match running {
        true => checkpoint_frozen(&vm, &a.checkpoint)?,
        false => disk::checkpoint(&vm, &a.checkpoint).map(|_| Duration::ZERO)?,
    };
    let taken = Taken {
        vm: &a.name,
        checkpoint: &a.checkpoint,
        running,
        pause_ms: pause.as_secs_f64() * 1e3,
        total_ms: began.elapsed().as_secs_f64() * 1e3,
    };
    out.emit(&taken, || {
        format!(
            "checkpoint {} of VM {}: VM paused {:.1} ms, {:.1} ms in all",
            taken.checkpoint, taken.vm, taken.pause_ms, taken.total_ms
        )
    });
    Ok(())
}

/// Guest sync, freeze, flush and record the layer, thaw. Returns how long
/// the VM was frozen. The VM is thawed whatever happens.
fn checkpoint_frozen(vm: &Vm, name: &str) -> CliResult<Duration> {
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
    let taken = disk::flush(vm).and_then(|_| disk::checkpoint(vm, name));
    let pause = frozen.elapsed();
    mconsole::call(&mc, "go").map_err(mc_err)?;
    taken.map(|_| pause)
}

pub fn rollback(out: Output, a: CheckpointArgs) -> CliResult {
    let store = Store::open()?;
    let vm = store.load(&a.name)?;
    let _lock = vm.lock()?;
    let have = disk::checkpoints(&vm);
    if !have.contains(&a.checkpoint) {
        let have = if have.is_empty() {
            "none".to_string()
        } else {
            have.join(", ")
        };
        return fail(
            Code::NotFound,
            format!(
                "VM {} has no checkpoint {} (it has: {have})",
                a.name, a.checkpoint
            ),
        );
    }
    let began = Instant::now();
    let was_running = matches!(vm.status(), Status::Running { .. });
    if was_running {
        stop_locked(&vm, Duration::from_secs(20))?;
    }
    disk::rollback(&vm, &a.checkpoint)?;
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
