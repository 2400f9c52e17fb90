//! Reading a view: the merge of a `State` (what layers changed) over the
//! base. Used by the live `View` and by `diff` on replayed states.

use crate::base::Base;
use crate::state::{Ino, Kind, Loc, Meta, Node, State};
use std::ffi::{OsStr, OsString};

/// An errno value.
pub type Errno = i32;
pub type Res<T> = std::result::Result<T, Errno>;

/// `stat` of one inode.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: Ino,
    pub meta: Meta,
    pub blocks512: u64,
}

#[derive(Clone, Copy)]
pub struct Tree<'a> {
    pub base: &'a Base,
    pub state: &'a State,
    pub block_size: u64,
}

impl Tree<'_> {
    pub fn node(&self, ino: Ino) -> Option<&Node> {
        self.state.nodes.get(&ino)
    }

    fn base_origin(&self, ino: Ino) -> Res<std::path::PathBuf> {
        Ok(self.base.inode(ino).ok_or(libc::ESTALE)?.origin)
    }

    pub fn attr(&self, ino: Ino) -> Res<Attr> {
        match self.node(ino) {
            Some(n) => Ok(Attr {
                ino,
                meta: n.meta,
                blocks512: self.blocks512(n),
            }),
            None => {
                let b = self.base.inode(ino).ok_or(libc::ESTALE)?;
                Ok(Attr {
                    ino,
                    meta: b.meta,
                    blocks512: b.blocks512,
                })
            }
        }
    }

    /// An estimate of the space used, as `du` would want it: blocks held in
    /// layers plus the visible part of the base file.
    fn blocks512(&self, n: &Node) -> u64 {
        match n.meta.kind {
            Kind::File => {
                let in_layers = n
                    .blocks
                    .values()
                    .filter(|l| matches!(l, Loc::Layer(_)))
                    .count() as u64;
                let base = match &n.origin {
                    Some(_) => n.base_limit.div_ceil(512),
                    None => 0,
                };
                let inline = n.inline.as_ref().map_or(0, |b| b.len() as u64);
                let used = in_layers * self.block_size / 512 + base + inline.div_ceil(512);
                used.min(n.meta.size.div_ceil(4096) * 8)
            }
            Kind::Dir => 8,
            _ => 0,
        }
    }

    /// The inode named `name` in directory `dir`, if any.
    pub fn child(&self, dir: Ino, name: &OsStr) -> Res<Option<Ino>> {
        let origin = match self.node(dir) {
            Some(n) => {
                if n.meta.kind != Kind::Dir {
                    return Err(libc::ENOTDIR);
                }
                if let Some(e) = n.entries.get(name) {
                    return Ok(*e);
                }
                n.origin.clone()
            }
            None => Some(self.base_origin(dir)?),
        };
        Ok(origin.and_then(|o| self.base.lookup(&o, name)))
    }

    /// The entries of a directory (without "." and "..").
    pub fn list(&self, dir: Ino) -> Res<Vec<(OsString, Ino, Kind)>> {
        let (origin, entries) = match self.node(dir) {
            Some(n) if n.meta.kind != Kind::Dir => return Err(libc::ENOTDIR),
            Some(n) => (n.origin.clone(), Some(&n.entries)),
            None => (Some(self.base_origin(dir)?), None),
        };
        let mut out = Vec::new();
        if let Some(o) = origin {
            for (name, ino, kind) in self.base.list(&o).iter() {
                if entries.is_none_or(|e| !e.contains_key(name)) {
                    out.push((name.clone(), *ino, *kind));
                }
            }
        }
        for (name, ino) in entries.into_iter().flatten() {
            if let Some(ino) = ino {
                let kind = self.attr(*ino).map(|a| a.meta.kind).unwrap_or(Kind::File);
                out.push((name.clone(), *ino, kind));
            }
        }
        Ok(out)
    }
}
