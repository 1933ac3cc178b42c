//! Named threads that can be waited for as a group, with a deadline.
//!
//! `JoinHandle::join` has no timeout and needs the handle in one place; the
//! server instead gives every thread it spawns a clone of a group's token (a
//! crossbeam `Sender` that is never sent on). When the last clone is dropped
//! the group's receiver disconnects — crossbeam's disconnection rule — so
//! "every thread of this group has ended" is one `recv_deadline`.
//!
//! Connection threads come and go with every session (four per session), and
//! creating a thread costs 0.2–0.3 ms on the machines we measured — most of the
//! time it takes to open a session. So a thread whose work is done waits
//! [`IDLE_KEEP`] for the next piece of work before it exits ([`Idle`]); a
//! reused thread takes the new work's name. Group membership is per piece of
//! work, so waiting for a group is unchanged.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam::channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

/// How long a thread whose work is done waits for more before it exits.
const IDLE_KEEP: Duration = Duration::from_secs(5);
/// Idle threads kept at most; a thread finishing beyond this exits at once.
const IDLE_MAX: usize = 64;

type Work = Box<dyn FnOnce() + Send>;

/// Threads whose work is done, waiting for more. `idle` counts the threads
/// waiting that nobody has claimed: a spawner claims one by decrementing it and
/// then sends exactly one piece of work, which some waiting thread receives; a
/// thread that times out may exit only if it too can claim itself, otherwise
/// work is on its way to the waiting threads and it must stay for it.
struct Idle {
    idle: AtomicUsize,
    /// OS threads started so far (the rest of the work ran on reused ones).
    started: AtomicUsize,
    tx: Sender<(String, Work)>,
    rx: Receiver<(String, Work)>,
}

fn idle_threads() -> &'static Idle {
    static IDLE: OnceLock<Idle> = OnceLock::new();
    IDLE.get_or_init(|| {
        let (tx, rx) = unbounded();
        Idle {
            idle: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            tx,
            rx,
        }
    })
}

/// Claims one of `idle`, if any.
fn claim(idle: &AtomicUsize) -> bool {
    idle.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// Runs `work` on an idle thread, or on a new one.
fn run_on_thread(name: String, work: Work) -> io::Result<()> {
    let pool = idle_threads();
    if claim(&pool.idle) {
        // A claimed thread is waiting on the channel, and the channel never closes.
        let _ = pool.tx.send((name, work));
        return Ok(());
    }
    pool.started.fetch_add(1, Ordering::Relaxed);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            work();
            while let Some((name, work)) = next_work(pool) {
                set_thread_name(&name);
                work();
            }
        })
        .map(|_| ())
}

/// Waits for the next piece of work as an idle thread; None: exit.
fn next_work(pool: &Idle) -> Option<(String, Work)> {
    if pool.idle.fetch_add(1, Ordering::AcqRel) >= IDLE_MAX && claim(&pool.idle) {
        return None;
    }
    match pool.rx.recv_timeout(IDLE_KEEP) {
        Ok(next) => Some(next),
        Err(_) if claim(&pool.idle) => None,
        // Claimed by a spawner after all: its work is coming.
        Err(_) => pool.rx.recv().ok(),
    }
}

fn set_thread_name(name: &str) {
    // The kernel keeps 15 bytes; std truncates the same way at spawn.
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, buf.as_ptr());
    }
}

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
    /// Runs `f` on a named thread (a new one, or one whose earlier work is done)
    /// that counts in this group and in every group of `also` until `f` returns.
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
        run_on_thread(
            name,
            Box::new(move || {
                // Held until the work returns; dropping them is the signal.
                let _guards = guards;
                f();
            }),
        )
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

    /// The idle threads are process-wide: tests that count them take turns.
    static IDLE_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn finished_threads_are_reused_and_renamed() {
        let _turn = IDLE_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let g = ThreadGroup::new();
        let started_before = idle_threads().started.load(Ordering::SeqCst);
        for i in 0..200 {
            let (tx, rx) = bounded(1);
            let name = format!("reuse-{i}");
            g.handle()
                .spawn(name.clone(), &[], move || {
                    let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
                    let _ = tx.send(comm.trim().to_owned());
                })
                .unwrap();
            let comm = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(comm, name);
            // Until the thread is idle again (other tests may use idle threads too).
            let deadline = Instant::now() + Duration::from_secs(5);
            while idle_threads().idle.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
        // One new thread per piece of work would be 200.
        let started = idle_threads().started.load(Ordering::SeqCst) - started_before;
        assert!(
            started < 10,
            "{started} threads started for 200 pieces of work"
        );
    }

    #[test]
    fn every_piece_of_work_runs_once_under_contention() {
        let _turn = IDLE_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = ThreadGroup::new();
        let done = Arc::new(AtomicUsize::new(0));
        let spawners: Vec<_> = (0..4)
            .map(|_| {
                let h = g.handle();
                let done = Arc::clone(&done);
                std::thread::spawn(move || {
                    for _ in 0..250 {
                        let done = Arc::clone(&done);
                        h.spawn("burst".into(), &[], move || {
                            done.fetch_add(1, Ordering::SeqCst);
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for s in spawners {
            s.join().unwrap();
        }
        assert!(g
            .wait_until(Instant::now() + Duration::from_secs(10))
            .is_ok());
        assert_eq!(done.load(Ordering::SeqCst), 1000);
    }
}
