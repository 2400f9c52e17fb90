//! `diff A B`: the paths whose content or metadata differ between two
//! checkpoints (or a checkpoint and the current state), found by walking
//! both views side by side over replayed states.

use crate::base::Base;
use crate::error::{Error, Result};
use crate::state::{Ino, Kind, State, ROOT};
use crate::store::Store;
use crate::tree::Tree;
use crate::view::replay;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Deleted,
    Modified,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Change {
    pub path: PathBuf,
    pub change: ChangeKind,
}

impl Store {
    /// Changes from checkpoint `from` to checkpoint `to` (`None`: the
    /// current state; a mounted store is synced first).
    pub fn diff(&self, from: &str, to: Option<&str>) -> Result<Vec<Change>> {
        self.sync()?;
        let layout = self.layout();
        let stack = layout.read_stack()?;
        // Unmounted after a crash: fsynced writes may still be only in the
        // fsync log; replay it as a mount would (a mounted store's was
        // emptied by the sync).
        if let Some(_lock) = crate::mount::lock(layout)? {
            crate::wal::recover(layout, stack.top())?;
        }
        let (current, snaps) = replay(layout, &stack, self.block_size(), false)?;
        let pick = |name: &str| -> Result<State> {
            let layer = stack.find(name)?.layer;
            snaps
                .get(&layer)
                .cloned()
                .ok_or_else(|| Error::BadStore(format!("no state for checkpoint {name:?}")))
        };
        let a = pick(from)?;
        let b = match to {
            Some(n) => pick(n)?,
            None => current,
        };
        let base = Base::open(self.base()).map_err(|e| {
            Error::NotFound(format!(
                "base {} is not readable: {e}",
                self.base().display()
            ))
        })?;
        let ta = Tree {
            base: &base,
            state: &a,
            block_size: self.block_size(),
        };
        let tb = Tree {
            base: &base,
            state: &b,
            block_size: self.block_size(),
        };
        let mut out = Vec::new();
        walk(&ta, &tb, Some(ROOT), Some(ROOT), Path::new("/"), &mut out);
        Ok(out)
    }
}

fn listing(t: &Tree, dir: Option<Ino>) -> BTreeMap<std::ffi::OsString, (Ino, Kind)> {
    dir.and_then(|d| t.list(d).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|(n, i, k)| (n, (i, k)))
        .collect()
}

fn walk(a: &Tree, b: &Tree, da: Option<Ino>, db: Option<Ino>, path: &Path, out: &mut Vec<Change>) {
    let la = listing(a, da);
    let lb = listing(b, db);
    let mut names: Vec<_> = la.keys().chain(lb.keys()).cloned().collect();
    names.sort();
    names.dedup();
    for name in names {
        let p = path.join(&name);
        let (ea, eb) = (la.get(&name), lb.get(&name));
        let change = match (ea, eb) {
            (None, Some(_)) => Some(ChangeKind::Added),
            (Some(_), None) => Some(ChangeKind::Deleted),
            (Some((ia, ka)), Some((ib, kb))) => {
                let same = ia == ib && ka == kb && a.node(*ia) == b.node(*ib);
                (!same).then_some(ChangeKind::Modified)
            }
            (None, None) => None,
        };
        if let Some(c) = change {
            out.push(Change {
                path: p.clone(),
                change: c,
            });
        }
        let dir_a = ea.filter(|e| e.1 == Kind::Dir).map(|e| e.0);
        let dir_b = eb.filter(|e| e.1 == Kind::Dir).map(|e| e.0);
        if dir_a.is_some() || dir_b.is_some() {
            walk(a, b, dir_a, dir_b, &p, out);
        }
    }
}
