//! Work a view does off the caller's clock (the next spare layer, emptying
//! the trash, merging layers), tracked so that an unmount can end it: a
//! mount must not release the store lock while its threads still change
//! the store, or a clean unmount would leave layer directories that fsck
//! reports and an offline command could race with.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

#[derive(Default)]
pub struct Background {
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: AtomicBool,
}

impl Background {
    /// Run `work` in a new thread. Finished threads are reaped here, so
    /// the list stays as short as the work in flight.
    pub fn spawn(&self, name: &str, work: impl FnOnce() + Send + 'static) {
        let mut threads = self.threads.lock().unwrap();
        threads.retain(|t| !t.is_finished());
        let work = move || {
            lower_priority();
            work()
        };
        match std::thread::Builder::new().name(name.into()).spawn(work) {
            Ok(t) => threads.push(t),
            Err(e) => tracing::warn!("cannot start {name}: {e}"),
        }
    }

    /// Whether long work (a merge) should give up at its next step.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Ask long work to give up, and wait for every thread.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wait();
    }

    /// Wait for every thread, including work started while waiting (a
    /// merge ends by preparing a spare).
    pub fn wait(&self) {
        loop {
            let threads = std::mem::take(&mut *self.threads.lock().unwrap());
            if threads.is_empty() {
                return;
            }
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

/// Make the calling thread yield to the file system's callers: a rollback
/// answers while its layers are freed and deleted, and its caller should
/// not wait behind that for a CPU (on 2 cores it did, 1-4 ms). Nice, not
/// SCHED_IDLE: some of this work holds locks a caller may wait for.
pub fn lower_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on this thread's id; an error leaves it as it was.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) } != 0 {
        tracing::debug!("cannot lower a background thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn stop_waits_for_work_and_work_it_started() {
        let bg = Arc::new(Background::default());
        let done = Arc::new(AtomicUsize::new(0));
        let (bg2, done2) = (bg.clone(), done.clone());
        bg.spawn("outer", move || {
            std::thread::sleep(Duration::from_millis(50));
            let done3 = done2.clone();
            bg2.spawn("inner", move || {
                std::thread::sleep(Duration::from_millis(50));
                done3.fetch_add(1, Ordering::SeqCst);
            });
            done2.fetch_add(1, Ordering::SeqCst);
        });
        bg.stop();
        assert_eq!(done.load(Ordering::SeqCst), 2);
        assert!(bg.stopping());
    }
}
