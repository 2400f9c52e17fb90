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

use crate::disk::{self, Layout, Stack};
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
pub fn spawn(view: Arc<View>) {
    std::thread::spawn(move || {
        while let Some((lower, upper)) = candidate(&view.stack()) {
            match merge(&view, lower, upper) {
                Ok(true) => tracing::info!("merged layers {lower} and {upper}"),
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!("merge of layers {lower} and {upper} failed: {e}");
                    break;
                }
            }
        }
    });
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
    build_data(layout, &state, lower, upper, &dir, view.block_size)?;
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
/// blocks of `lower`.
fn build_data(
    layout: &Layout,
    state: &State,
    lower: u32,
    upper: u32,
    dir: &Path,
    block_size: u64,
) -> Result<()> {
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
            buf.fill(0);
            crate::data::pread_full(&src, &mut buf, b * block_size).at("read", &from_lower)?;
            dst.write_all_at(&buf, b * block_size)
                .at("write", &target)?;
        }
        dst.sync_data().at("fsync", &target)?;
    }
    Ok(())
}
