//! The watchdog thread: fires per-atom timeouts and delivers interrupts.
//!
//! Interrupting an atom means taking its interpreter's GIL from another thread
//! (it arrives within the switch interval while Python code runs) and setting an
//! asynchronous KeyboardInterrupt on the executor's thread state. That wait must
//! never happen on a network thread (`cancel` and `close` return at once), so
//! they hand the interrupt to this thread.
//!
//! An atom that catches KeyboardInterrupt and carries on is interrupted again
//! every [`REPEAT`] until it returns. Asynchronous exceptions are checked
//! between bytecodes and sub-interpreters run no signal handlers, so a C call
//! cannot be woken in general: `time.sleep` is replaced in every interpreter by
//! one that waits on the interpreter's wake pipe, which the interrupt writes to
//! (see `Interp::interrupt`), but an atom blocked in any other C call (a socket
//! read, `select`) sees the interrupt only when the call returns.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver};
use slog::info;

use super::interp::Interp;
use super::session::{Interruption, SessionCore};

/// How often an interrupted atom that keeps running is interrupted again.
pub(crate) const REPEAT: Duration = Duration::from_secs(1);

pub(crate) enum WatchMsg {
    /// Exit the thread.
    Stop,
    /// Time `serial` (running in `session`) out at `deadline`.
    Arm {
        session: Weak<SessionCore>,
        serial: u64,
        deadline: Instant,
        timeout: Duration,
    },
    /// `serial` finished: forget its timer.
    Disarm(u64),
    /// Interrupt `serial` in `interp` now (its session already recorded why).
    Interrupt {
        session: Weak<SessionCore>,
        interp: Arc<Interp>,
        serial: u64,
    },
}

enum Timer {
    Timeout {
        session: Weak<SessionCore>,
        timeout: Duration,
    },
    Repeat {
        session: Weak<SessionCore>,
    },
}

pub(crate) fn watchdog_loop(rx: Receiver<WatchMsg>) {
    let _anchor = super::python::Anchor::new();
    let mut order: BTreeSet<(Instant, u64)> = BTreeSet::new();
    let mut timers: HashMap<u64, (Instant, Timer)> = HashMap::new();
    let set = |order: &mut BTreeSet<(Instant, u64)>,
               timers: &mut HashMap<u64, (Instant, Timer)>,
               serial: u64,
               at: Instant,
               t: Timer| {
        if let Some((old, _)) = timers.insert(serial, (at, t)) {
            order.remove(&(old, serial));
        }
        order.insert((at, serial));
    };
    loop {
        let next = order.first().copied();
        let wait = match next {
            Some((at, _)) => channel::at(at),
            None => channel::never(),
        };
        let msg = channel::select! {
            recv(rx) -> m => match m {
                Ok(m) => Some(m),
                Err(_) => return,
            },
            recv(wait) -> _ => None,
        };
        match msg {
            Some(WatchMsg::Arm {
                session,
                serial,
                deadline,
                timeout,
            }) => set(
                &mut order,
                &mut timers,
                serial,
                deadline,
                Timer::Timeout { session, timeout },
            ),
            Some(WatchMsg::Stop) => return,
            Some(WatchMsg::Disarm(serial)) => {
                if let Some((at, _)) = timers.remove(&serial) {
                    order.remove(&(at, serial));
                }
            }
            Some(WatchMsg::Interrupt {
                session,
                interp,
                serial,
            }) => {
                interp.interrupt(serial);
                set(
                    &mut order,
                    &mut timers,
                    serial,
                    Instant::now() + REPEAT,
                    Timer::Repeat { session },
                );
            }
            None => {
                let Some((at, serial)) = next else { continue };
                order.remove(&(at, serial));
                let Some((_, timer)) = timers.remove(&serial) else {
                    continue;
                };
                let (session, reason) = match timer {
                    Timer::Timeout { session, timeout } => {
                        (session, Some(Interruption::Timeout(timeout)))
                    }
                    Timer::Repeat { session, .. } => (session, None),
                };
                let Some(core) = session.upgrade() else {
                    continue;
                };
                let Some((interp, atom)) = core.mark_interrupted(serial, reason) else {
                    continue;
                };
                match reason {
                    Some(Interruption::Timeout(t)) => {
                        info!(core.log(), "atom timed out, interrupting";
                        "atom" => atom, "timeout_ms" => t.as_millis() as u64)
                    }
                    _ => {
                        info!(core.log(), "atom still running, interrupting again"; "atom" => atom)
                    }
                }
                interp.interrupt(serial);
                set(
                    &mut order,
                    &mut timers,
                    serial,
                    Instant::now() + REPEAT,
                    Timer::Repeat {
                        session: Arc::downgrade(&core),
                    },
                );
            }
        }
    }
}
