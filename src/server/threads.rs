//! Named threads that can be waited for as a group, with a deadline.
//!
//! `JoinHandle::join` has no timeout and needs the handle in one place; the
//! server instead gives every thread it spawns a clone of a group's token (a
//! crossbeam `Sender` that is never sent on). When the last clone is dropped
//! the group's receiver disconnects — crossbeam's disconnection rule — so
//! "every thread of this group has ended" is one `recv_deadline`.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender};

/// Never sent: the channel only ever disconnects.
pub enum Never {}

/// The owner's end of a group: spawns through [`GroupHandle`]s, then waits.
pub struct ThreadGroup {
    handle: Option<GroupHandle>,
    live: Arc<AtomicUsize>,
    done: Receiver<Never>,
}

/// A cloneable right to spawn threads into a group. While any handle (or any
/// thread spawned through one) is alive, the group has not ended.
#[derive(Clone)]
pub struct GroupHandle {
    token: Sender<Never>,
    live: Arc<AtomicUsize>,
}

/// Decrements the live count when a thread ends, even by panic.
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ThreadGroup {
    pub fn new() -> ThreadGroup {
        let (token, done) = bounded(0);
        let live = Arc::new(AtomicUsize::new(0));
        ThreadGroup {
            handle: Some(GroupHandle {
                token,
                live: Arc::clone(&live),
            }),
            live,
            done,
        }
    }

    /// A handle to spawn threads into this group (and to keep it alive while held).
    pub fn handle(&self) -> GroupHandle {
        self.handle.clone().expect("handle is only taken by wait")
    }

    /// Threads of this group still running.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Drops this group's own handle and waits until every thread and handle is
    /// gone. On timeout returns how many threads are still running.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<(), usize> {
        self.handle = None;
        match self.done.recv_deadline(deadline) {
            Err(RecvTimeoutError::Disconnected) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(self.live()),
            Ok(never) => match never {},
        }
    }
}

impl Default for ThreadGroup {
    fn default() -> Self {
        ThreadGroup::new()
    }
}

impl GroupHandle {
    /// Spawns a named thread that counts in this group and in every group of `also`.
    pub fn spawn<F>(&self, name: String, also: &[&GroupHandle], f: F) -> io::Result<()>
    where
        F: FnOnce() + Send + 'static,
    {
        let mut tokens: Vec<(Sender<Never>, Arc<AtomicUsize>)> = Vec::with_capacity(1 + also.len());
        for h in std::iter::once(self).chain(also.iter().copied()) {
            h.live.fetch_add(1, Ordering::SeqCst);
            tokens.push((h.token.clone(), Arc::clone(&h.live)));
        }
        let guards: Vec<(Sender<Never>, LiveGuard)> = tokens
            .into_iter()
            .map(|(t, live)| (t, LiveGuard(live)))
            .collect();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // Held until the thread returns; dropping them is the signal.
                let _guards = guards;
                f();
            })
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wait_returns_when_every_thread_ended() {
        let g = ThreadGroup::new();
        let h = g.handle();
        let (tx, rx) = bounded::<()>(0);
        h.spawn("t".into(), &[], move || {
            let _ = rx.recv();
        })
        .unwrap();
        drop(h);
        assert_eq!(g.live(), 1);
        let soon = Instant::now() + Duration::from_millis(50);
        let mut g2 = g;
        assert_eq!(g2.wait_until(soon), Err(1));
        drop(tx);
        assert_eq!(
            g2.wait_until(Instant::now() + Duration::from_secs(5)),
            Ok(())
        );
    }

    #[test]
    fn a_thread_counts_in_every_group_it_joined() {
        let mut a = ThreadGroup::new();
        let mut b = ThreadGroup::new();
        let (tx, rx) = bounded::<()>(0);
        a.handle()
            .spawn("t".into(), &[&b.handle()], move || {
                let _ = rx.recv();
            })
            .unwrap();
        let soon = || Instant::now() + Duration::from_millis(30);
        assert_eq!(b.wait_until(soon()), Err(1));
        drop(tx);
        assert!(a
            .wait_until(Instant::now() + Duration::from_secs(5))
            .is_ok());
        assert!(b
            .wait_until(Instant::now() + Duration::from_secs(5))
            .is_ok());
    }
}
