//! Background merge of layers. After `delete NAME`, the sealed layer that
//! was NAME's no longer needs to stay apart from the sealed layer above it:
//! both become one new layer, which frees the blocks the upper one
//! overwrote and shortens the journal replay at mount. Reads never need
//! it (each block map points straight at its layer).
//!
//! The merged layer is built aside, while the view keeps running:
//! - its data files are hard links of the upper layer's files (or of the
//!   lower one's where the upper has none), into which the lower layer's
//!   blocks that are still visible are copied (offsets the upper layer does
//!   not claim, so the upper layer's own view is unchanged);
//! - its journal is the lower journal followed by the upper one.
//!
//! Then, under the view's lock, the stack commit swaps the two layers for the new
//! one (the commit point; a crash before it leaves a `merge-*` directory
//! that fsck removes), the old ids become aliases of the new one for the
//! in-memory block maps, and the old layers go to the trash.

use crate::disk::{self, Stack};
use crate::error::{Context, Result};
use crate::journal;
use crate::state::{Loc, State};
use crate::view::{replay_upto, View};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The first pair (lower, upper) of sealed layers that may be merged: the
/// lower one is no checkpoint's, the upper one is not the writable top.
pub fn candidate(stack: &Stack) -> Option<(u32, u32)> {
    let sealed = &stack.layers[..stack.layers.len() - 1];
    sealed.windows(2).find_map(|w| {
        let referenced = stack.checkpoints.iter().any(|c| c.layer == w[0]);
        (!referenced).then_some((w[0], w[1]))
    })
}

/// Merge every mergeable pair, one after the other, in a background thread.
/// One merger works at a time: a second one waits, then finds what is left.
pub fn spawn(view: Arc<View>) {
    let v = view.clone();
    view.background.spawn("cowfs-merge", move || merge_all(&v));
}

fn merge_all(view: &View) {
    let _one = view.merging.lock().unwrap();
    while let Some((lower, upper)) = candidate(&view.stack()) {
        if view.background.stopping() {
            break;
        }
        match merge(view, lower, upper) {
            Ok(true) => tracing::info!("merged layers {lower} and {upper}"),
            Ok(false) => break,
            Err(e) => {
                tracing::warn!("merge of layers {lower} and {upper} failed: {e}");
                break;
            }
        }
    }
}

fn merge(view: &View, lower: u32, upper: u32) -> Result<bool> {
    let layout = &view.layout;
    let dir = layout.layers().join(format!("merge-{lower}-{upper}"));
    if dir.exists() {
        fs::remove_dir_all(&dir).at("remove", &dir)?;
    }
    disk::mkdir(&dir)?;
    disk::mkdir(&dir.join("data"))?;
    // The blocks of `lower` still visible once `upper` is applied.
    let state = replay_upto(layout, &view.stack(), upper, view.block_size)?;
    if !build_data(view, &state, lower, upper, &dir)? {
        // Unmounting: the half-built directory goes (mount and fsck would
        // clear it away too).
        fs::remove_dir_all(&dir).at("remove", &dir)?;
        return Ok(false);
    }
    let mut journal = Vec::new();
    for layer in [lower, upper] {
        let path = layout.journal(layer);
        let valid = journal::read(&path)?.valid_len as usize;
        let bytes = fs::read(&path).at("read", &path)?;
        journal.extend_from_slice(&bytes[..valid.min(bytes.len())]);
    }
    disk::write_atomic(&dir.join("journal"), &journal)?;
    disk::sync_dir(&dir.join("data"))?;
    disk::sync_dir(&dir)?;
    view.commit_merge(lower, upper, &dir)
}

/// Link the data files into the merged layer and copy in the visible
/// blocks of `lower`. Returns false if it gave up (the view is unmounting).
fn build_data(view: &View, state: &State, lower: u32, upper: u32, dir: &Path) -> Result<bool> {
    let (layout, block_size) = (&view.layout, view.block_size);
    let mut inos = BTreeSet::new();
    for layer in [lower, upper] {
        let data = layout.data_dir(layer);
        for e in fs::read_dir(&data).at("read", &data)?.flatten() {
            if let Ok(ino) = e.file_name().to_string_lossy().parse::<u64>() {
                inos.insert(ino);
            }
        }
    }
    for ino in inos {
        if view.background.stopping() {
            return Ok(false);
        }
        let target: PathBuf = dir.join("data").join(ino.to_string());
        let (from_upper, from_lower) = (layout.data(upper, ino), layout.data(lower, ino));
        if !from_upper.exists() {
            fs::hard_link(&from_lower, &target).at("link", &from_lower)?;
            continue;
        }
        fs::hard_link(&from_upper, &target).at("link", &from_upper)?;
        let Some(node) = state.nodes.get(&ino) else {
            continue;
        };
        let visible: Vec<u64> = node
            .blocks
            .iter()
            .filter(|(_, l)| **l == Loc::Layer(lower))
            .map(|(b, _)| *b)
            .collect();
        if visible.is_empty() {
            continue;
        }
        let src = fs::File::open(&from_lower).at("open", &from_lower)?;
        let dst = fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .at("open", &target)?;
        let mut buf = vec![0u8; block_size as usize];
        for b in visible {
            if view.background.stopping() {
                return Ok(false);
            }
            buf.fill(0);
            crate::data::pread_full(&src, &mut buf, b * block_size).at("read", &from_lower)?;
            dst.write_all_at(&buf, b * block_size)
                .at("write", &target)?;
        }
        dst.sync_data().at("fsync", &target)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::{new_file, view_with_blocks};

    const BLOCK: usize = 4096;

    fn view_of(dir: &Path) -> View {
        let base = dir.join("base");
        fs::create_dir(&base).unwrap();
        view_with_blocks(dir, &base, Some(BLOCK as u64))
    }

    /// A file of 64 blocks; each checkpoint round overwrites every other
    /// block of a different stride, so that the merged layer needs blocks
    /// of both the layers it merges.
    fn three_checkpoints(view: &View) -> (u64, Vec<Vec<u8>>) {
        let ino = new_file(view, "f");
        let mut content = vec![0u8; 64 * BLOCK];
        let mut at_checkpoint = Vec::new();
        for (round, name) in [(1u8, "a"), (2, "b"), (3, "c"), (4, "")] {
            for b in (0..64).filter(|b| b % (round as usize) == 0) {
                let block = vec![round; BLOCK];
                view.write(ino, (b * BLOCK) as u64, &block, None).unwrap();
                content[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&block);
            }
            if !name.is_empty() {
                view.checkpoint(name).unwrap();
                at_checkpoint.push(content.clone());
            }
        }
        at_checkpoint.push(content);
        (ino, at_checkpoint)
    }

    fn read_all(view: &View, ino: u64) -> Vec<u8> {
        view.read(ino, 0, (64 * BLOCK) as u32).unwrap()
    }

    /// Mergers started together (a checkpoint's and a delete's, say) must
    /// not build in each other's directory: one works, the others wait and
    /// find nothing left to do.
    #[test]
    fn mergers_started_together_merge_once_and_exactly() {
        for round in 0..20u64 {
            let t = tempfile::tempdir().unwrap();
            let view = Arc::new(view_of(t.path()));
            let (ino, contents) = three_checkpoints(&view);
            view.delete_checkpoint("b").unwrap();
            let start = Arc::new(std::sync::Barrier::new(8));
            let mergers: Vec<_> = (0..8)
                .map(|i| {
                    let (view, start) = (view.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        // Staggered, so that later ones arrive while the
                        // first is building or committing.
                        let step = 100 + 100 * (round % 5);
                        std::thread::sleep(std::time::Duration::from_micros(i * step));
                        merge_all(&view);
                    })
                })
                .collect();
            for m in mergers {
                m.join().unwrap();
            }
            view.background.wait();
            assert_eq!(view.stack().layers.len(), 3, "{:?}", view.stack());
            assert!(read_all(&view, ino) == contents[3], "the view changed");
            view.rollback("c").unwrap();
            assert!(read_all(&view, ino) == contents[2], "checkpoint c changed");
            view.rollback("a").unwrap();
            assert!(read_all(&view, ino) == contents[0], "checkpoint a changed");
            view.background.stop();
        }
    }

    /// A merge that gives up at unmount leaves the stack as it was and no
    /// directory behind.
    #[test]
    fn a_merge_stopped_by_unmount_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let view = view_of(t.path());
        let (ino, contents) = three_checkpoints(&view);
        view.delete_checkpoint("b").unwrap();
        let before = view.stack();
        view.background.stop();
        let (lower, upper) = candidate(&before).unwrap();
        assert!(!merge(&view, lower, upper).unwrap());
        assert_eq!(view.stack().layers, before.layers);
        let names: Vec<String> = fs::read_dir(view.layout.layers())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n.parse::<u32>().is_ok()),
            "left behind: {names:?}"
        );
        assert!(read_all(&view, ino) == contents[3]);
    }
}
