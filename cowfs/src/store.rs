//! `Store`: the public handle on a store directory. Operations work the
//! same whether or not the store is mounted: when a daemon holds the store,
//! they go to it over the control socket; otherwise they act on the files
//! under the store's lock.

use crate::control::{self, Request};
use crate::disk::{self, Checkpoint, Layout, Stack, StoreConfig, DEFAULT_BLOCK_SIZE};
use crate::error::{Context, Error, Result};
use crate::mount::{self, Mount, MountOptions};
use crate::view::View;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Store {
    layout: Layout,
    config: StoreConfig,
}

impl Store {
    /// Create a store at `dir` (new or empty) over the base directory `base`.
    /// `block_size`: the copy-up unit, a power of two from 4 KiB to 16 MiB.
    pub fn create(dir: &Path, base: &Path, block_size: Option<u64>) -> Result<Store> {
        let bs = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        if !bs.is_power_of_two() || !(4096..=16 << 20).contains(&bs) {
            return Err(Error::Invalid(format!(
                "bad block size {bs}: use a power of two from 4096 to 16777216"
            )));
        }
        let base = base
            .canonicalize()
            .ok()
            .filter(|b| b.is_dir())
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "base directory {} does not exist or is not a directory",
                    base.display()
                ))
            })?;
        let layout = Layout {
            dir: dir.to_owned(),
        };
        if layout.config().exists() {
            return Err(Error::Conflict(format!(
                "{} is already a cowfs store",
                dir.display()
            )));
        }
        if dir.exists() && dir.read_dir().at("read", dir)?.next().is_some() {
            return Err(Error::Conflict(format!(
                "{} exists and is not empty; pick a new directory for the store",
                dir.display()
            )));
        }
        if !dir.exists() {
            disk::mkdir(dir)?;
        }
        let abs = dir.canonicalize().at("resolve", dir)?;
        if abs.starts_with(&base) {
            let _ = std::fs::remove_dir(dir);
            return Err(Error::Invalid(format!(
                "store {} is inside its base {}: put it elsewhere, the base must stay unchanged",
                dir.display(),
                base.display()
            )));
        }
        let layout = Layout { dir: abs };
        disk::mkdir(&layout.layers())?;
        disk::mkdir(&layout.trash())?;
        let stack = Stack::initial();
        layout.make_layer(stack.top())?;
        crate::wal::create(&layout.wal(stack.top()))?;
        layout.write_stack(&stack)?;
        let config = StoreConfig {
            magic: disk::MAGIC.into(),
            format: disk::FORMAT_VERSION,
            base,
            block_size: bs,
        };
        // store.json last: its presence means the store is complete.
        disk::write_atomic(
            &layout.config(),
            &serde_json::to_vec_pretty(&config).expect("serializable"),
        )?;
        Ok(Store { layout, config })
    }

    pub fn open(dir: &Path) -> Result<Store> {
        if !dir.is_dir() {
            return Err(Error::NotFound(format!(
                "store {} does not exist; create it with `umlctl fs create`",
                dir.display()
            )));
        }
        let layout = Layout {
            dir: dir.canonicalize().at("resolve", dir)?,
        };
        let config = layout.read_config()?;
        layout.read_stack()?;
        Ok(Store { layout, config })
    }

    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }
    pub fn base(&self) -> &Path {
        &self.config.base
    }
    pub fn block_size(&self) -> u64 {
        self.config.block_size
    }
    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether a daemon (in this or another process) has the store mounted.
    pub fn is_mounted(&self) -> Result<bool> {
        Ok(mount::lock(&self.layout)?.is_none())
    }

    fn prepare(&self, mountpoint: &Path, opts: &MountOptions) -> Result<mount::Prepared> {
        let lock = mount::lock(&self.layout)?.ok_or_else(|| {
            Error::Conflict(format!(
                "store {} is already mounted; unmount it first",
                self.dir().display()
            ))
        })?;
        mount::check(mountpoint, opts)?;
        let view = View::load(self.layout.clone(), &self.config)?;
        mount::prepare(&self.layout, view, lock, mountpoint, opts)
    }

    /// Mount the store at `mountpoint`, served by background threads of
    /// this process until the returned handle is dropped.
    pub fn mount(&self, mountpoint: &Path, opts: &MountOptions) -> Result<Mount> {
        Mount::start(self.prepare(mountpoint, opts)?)
    }

    /// Mount and serve in this thread until unmounted; `ready` runs (in a
    /// session thread) once requests are served at full speed.
    pub fn serve(
        &self,
        mountpoint: &Path,
        opts: &MountOptions,
        ready: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
        mount::run(self.prepare(mountpoint, opts)?, ready)
    }

    /// Run `offline` under the store's lock, or send `req` to its daemon.
    fn route(&self, req: Request, offline: impl FnOnce(&Layout) -> Result<()>) -> Result<()> {
        match mount::lock(&self.layout)? {
            Some(_lock) => offline(&self.layout),
            None => control::call(&self.layout.socket(), &req),
        }
    }

    /// Seal the current state as checkpoint `name`.
    pub fn checkpoint(&self, name: &str) -> Result<Checkpoint> {
        disk::check_name(name)?;
        self.route(Request::Checkpoint(name.into()), |l| {
            let stack = l.read_stack()?;
            let next = stack.with_checkpoint(name)?;
            // Writes a crash left only in the fsync log belong to the
            // layer being sealed.
            crate::wal::recover(l, stack.top())?;
            l.make_layer(next.top())?;
            l.write_stack(&next)?;
            crate::wal::hand_on(l, stack.top(), next.top())
        })?;
        Ok(self.layout.read_stack()?.find(name)?.clone())
    }

    /// Return the view to checkpoint `name`; checkpoints after it go.
    pub fn rollback(&self, name: &str) -> Result<()> {
        self.route(Request::Rollback(name.into()), |l| {
            let stack = l.read_stack()?;
            let (next, dropped) = stack.rolled_back(name)?;
            l.make_layer(next.top())?;
            l.write_stack(&next)?;
            crate::wal::hand_on(l, stack.top(), next.top())?;
            // Deleted by the next mount (or fsck) in the background.
            dropped.iter().try_for_each(|&id| l.trash_layer(id))
        })
    }

    /// Forget checkpoint `name` (the view does not change).
    pub fn delete(&self, name: &str) -> Result<()> {
        self.route(Request::Delete(name.into()), |l| {
            let next = l.read_stack()?.without_checkpoint(name)?;
            l.write_stack(&next)
        })
    }

    pub fn list(&self) -> Result<Vec<Checkpoint>> {
        Ok(self.layout.read_stack()?.checkpoints)
    }

    /// Make everything written to a mounted store durable on disk,
    /// including writes the kernel still holds in its cache (sync(1) and
    /// syncfs(2) cannot: the kernel does not pass them on to a FUSE
    /// daemon). A no-op when unmounted: an unmounted store is durable.
    pub fn sync(&self) -> Result<()> {
        self.route(Request::Sync, |_| Ok(()))
    }

    /// Where a background daemon (`umlctl fs mount`) writes its log.
    pub fn log_path(&self) -> PathBuf {
        self.layout.log()
    }
}
