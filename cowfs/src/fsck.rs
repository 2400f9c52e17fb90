//! `fsck`: check a store that is not mounted, and with `repair` fix what a
//! crash can leave behind: fsynced writes still only in the fsync log, a
//! torn journal tail (unfinished writes), layer
//! directories a checkpoint, rollback or merge did not commit, temporary
//! files, inodes left with no link.

use crate::disk::{Layout, Stack};
use crate::error::{Context, Error, Result};
use crate::journal::{self, Record};
use crate::mount;
use crate::store::Store;
use crate::view::replay;
use crate::wal;
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    /// What a crash leaves normally (torn journal tails, orphans, ...).
    pub unfinished: Vec<String>,
    /// Real damage (missing layers, corrupt records in sealed layers, ...).
    pub errors: Vec<String>,
    /// Whether the findings were repaired.
    pub repaired: bool,
}

impl FsckReport {
    pub fn clean(&self) -> bool {
        self.unfinished.is_empty() && self.errors.is_empty()
    }
}

impl Store {
    pub fn fsck(&self, repair: bool) -> Result<FsckReport> {
        let l = self.layout().clone();
        let _lock = mount::lock(&l)?.ok_or_else(|| {
            Error::Conflict(format!(
                "store {} is mounted; unmount it before fsck",
                l.dir.display()
            ))
        })?;
        let mut r = FsckReport::default();
        let mut stack = l.read_stack()?;
        check_wal(&l, &stack, repair, &mut r)?;
        check_journals(&l, &stack, repair, &mut r)?;
        check_checkpoints(&l, &mut stack, repair, &mut r)?;
        check_leftovers(&l, &stack, repair, &mut r)?;
        // Dropped layers waiting in the trash are housekeeping, not damage.
        if repair {
            l.empty_trash();
        }
        check_orphans(&l, &stack, self.block_size(), repair, &mut r)?;
        r.repaired = repair && !r.clean();
        Ok(r)
    }
}

/// Fsynced writes the fsync log holds and the data files and journal may
/// not: what a crash leaves normally. Replayed first, as mount does, so
/// that the journal checks see them.
fn check_wal(l: &Layout, stack: &Stack, repair: bool, r: &mut FsckReport) -> Result<()> {
    let top = stack.top();
    let batches = if repair {
        wal::recover(l, top)?
    } else {
        wal::read(&l.wal(top))?.len()
    };
    if batches > 0 {
        r.unfinished.push(format!(
            "{batches} fsynced writes in the fsync log of layer {top} to replay"
        ));
    }
    Ok(())
}

/// Torn journal tails: normal in the top layer, damage in a sealed one.
fn check_journals(l: &Layout, stack: &Stack, repair: bool, r: &mut FsckReport) -> Result<()> {
    for &layer in &stack.layers {
        let path = l.journal(layer);
        if !path.exists() {
            r.errors
                .push(format!("layer {layer} is missing ({})", path.display()));
            continue;
        }
        let j = journal::read(&path)?;
        if j.torn_bytes == 0 {
            continue;
        }
        let msg = format!(
            "layer {layer}: {} bytes of unfinished journal records",
            j.torn_bytes
        );
        if layer == stack.top() {
            r.unfinished.push(msg)
        } else {
            r.errors.push(msg)
        }
        if repair {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .at("open", &path)?;
            f.set_len(j.valid_len).at("truncate", &path)?;
            f.sync_all().at("fsync", &path)?;
        }
    }
    Ok(())
}

fn check_checkpoints(
    l: &Layout,
    stack: &mut Stack,
    repair: bool,
    r: &mut FsckReport,
) -> Result<()> {
    let bad: Vec<String> = stack
        .checkpoints
        .iter()
        .filter(|c| !stack.layers.contains(&c.layer))
        .map(|c| c.name.clone())
        .collect();
    for name in &bad {
        r.errors
            .push(format!("checkpoint {name:?} refers to a dropped layer"));
    }
    if repair && !bad.is_empty() {
        stack.checkpoints.retain(|c| !bad.contains(&c.name));
        l.write_stack(stack)?;
    }
    Ok(())
}

/// Layer directories no commit reached (an interrupted checkpoint,
/// rollback or merge) and temporary files of interrupted rewrites.
fn check_leftovers(l: &Layout, stack: &Stack, repair: bool, r: &mut FsckReport) -> Result<()> {
    for e in std::fs::read_dir(l.layers())
        .at("read", &l.layers())?
        .flatten()
    {
        let Ok(id) = e.file_name().to_string_lossy().parse::<u32>() else {
            // A layer being built by background work (a merge, the next
            // spare layer) when the daemon stopped: housekeeping.
            if repair {
                std::fs::remove_dir_all(e.path()).at("remove", &e.path())?;
            }
            continue;
        };
        let spare = id == stack.next_layer && l.is_empty_layer(id);
        if !spare && !stack.layers.contains(&id) {
            r.unfinished.push(format!(
                "uncommitted layer directory {}",
                e.path().display()
            ));
            if repair {
                std::fs::remove_dir_all(e.path()).at("remove", &e.path())?;
            }
        }
    }
    for e in std::fs::read_dir(&l.dir).at("read", &l.dir)?.flatten() {
        if e.path().extension().is_some_and(|x| x == "tmp") {
            r.unfinished
                .push(format!("temporary file {}", e.path().display()));
            if repair {
                std::fs::remove_file(e.path()).at("remove", &e.path())?;
            }
        }
    }
    Ok(())
}

/// Inodes whose last name went while they were open, then the crash.
fn check_orphans(
    l: &Layout,
    stack: &Stack,
    block_size: u64,
    repair: bool,
    r: &mut FsckReport,
) -> Result<()> {
    let (state, _) = replay(l, stack, block_size, false)?;
    let orphans: Vec<u64> = state
        .nodes
        .iter()
        .filter(|(_, n)| n.meta.nlink == 0)
        .map(|(i, _)| *i)
        .collect();
    if orphans.is_empty() {
        return Ok(());
    }
    r.unfinished.push(format!(
        "{} inodes with no name left (unlinked while open)",
        orphans.len()
    ));
    if repair {
        let mut w = journal::Writer::open(&l.journal(stack.top()))?;
        for ino in orphans {
            w.append(&Record::Drop { ino })?;
        }
        w.sync()?;
    }
    Ok(())
}
