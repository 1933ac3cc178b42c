//! Sessions and the executor threads that run their atoms.
//!
//! Scheduling: a session with work is *scheduled*: it sits once in the shared
//! run queue (a crossbeam channel) or is held by exactly one executor. An
//! executor takes a session and runs its atoms one after another, each to
//! completion (result delivered), while more wait: as long as the run queue is
//! empty, and for at most [`SLICE`] once another session waits there; then it
//! puts the session back at the end of the run queue. So a session's atoms run in order and one at a time, sessions
//! take turns on the executors, and different sessions run in parallel (each
//! interpreter has its own GIL). Any executor may run any session: each keeps
//! its own thread state per interpreter (see `interp.rs`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, TryRecvError};
use slog::{debug, info, warn, Logger};

use super::error::EngineError;
use super::interp::{Interp, RawOutcome};
use super::output::Pump;
use super::python::Anchor;
use super::runtime::Shared;
use super::watchdog::WatchMsg;
use super::{AtomRequest, Sink};
use crate::protocol::{AtomResult, FailureOrigin, Outcome, RemoteException};

/// How long an executor keeps running one session's atoms while another
/// session waits in the run queue. Staying avoids moving the session's
/// interpreter (GIL, thread state, caches) to the other executor per atom.
const SLICE: Duration = Duration::from_millis(2);

pub(crate) use super::Interruption;

struct Queued {
    req: AtomRequest,
    cancelled: bool,
}

struct Running {
    atom: u64,
    /// Engine-wide unique id of this run (atom ids are only unique per session).
    serial: u64,
    reason: Option<Interruption>,
}

struct SessState {
    queue: VecDeque<Queued>,
    running: Option<Running>,
    /// In the run queue or held by an executor.
    scheduled: bool,
    closed: bool,
    /// The interpreter an executor took for this session while its queue is
    /// not empty; parked in the pool when the queue runs empty, given back for
    /// a reset when the session is closed and no executor holds it.
    interp: Option<Arc<Interp>>,
}

pub(crate) struct SessionCore {
    /// Key in the engine's registry of live sessions.
    key: u64,
    id: u64,
    sink: Sink,
    log: Logger,
    shared: Arc<Shared>,
    st: Mutex<SessState>,
}

/// Work for the executors.
pub(crate) enum Job {
    Run(Arc<SessionCore>),
    /// Poll for the next job a while ([`Shared::nudge`]).
    Poll,
    Stop,
}

impl SessionCore {
    pub(crate) fn new(
        key: u64,
        id: u64,
        sink: Sink,
        log: Logger,
        shared: Arc<Shared>,
    ) -> SessionCore {
        SessionCore {
            key,
            id,
            sink,
            log,
            shared,
            st: Mutex::new(SessState {
                queue: VecDeque::new(),
                running: None,
                scheduled: false,
                closed: false,
                interp: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SessState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn log(&self) -> &Logger {
        &self.log
    }

    /// Records why `serial` is interrupted (`reason` None: a repeat of an earlier
    /// interrupt) and returns its interpreter and atom id if it still runs.
    pub(crate) fn mark_interrupted(
        &self,
        serial: u64,
        reason: Option<Interruption>,
    ) -> Option<(Arc<Interp>, u64)> {
        let mut st = self.lock();
        let interp = st.interp.clone()?;
        let running = st.running.as_mut().filter(|r| r.serial == serial)?;
        match reason {
            Some(r) if running.reason.is_none() => running.reason = Some(r),
            Some(_) => {}
            None if running.reason.is_none() => return None,
            None => {}
        }
        Some((interp, running.atom))
    }

    /// Interrupts whatever atom runs now, recording `reason`. Returns its id.
    pub(crate) fn interrupt_running(self: &Arc<Self>, reason: Interruption) -> Option<u64> {
        let mut st = self.lock();
        let interp = st.interp.clone()?;
        let running = st.running.as_mut()?;
        if running.reason.is_none() {
            running.reason = Some(reason);
        }
        let (atom, serial) = (running.atom, running.serial);
        drop(st);
        let _ = self.shared.watch_tx.send(WatchMsg::Interrupt {
            session: Arc::downgrade(self),
            interp,
            serial,
        });
        Some(atom)
    }

    fn deliver_failure(&self, atom: u64, origin: FailureOrigin, type_name: &str, message: String) {
        self.sink
            .finish(atom, AtomResult::failure(origin, type_name, message, 0));
    }

    fn submit(self: &Arc<Self>, atom: AtomRequest) {
        let mut st = self.lock();
        if st.closed {
            debug!(self.log, "atom submitted to a closed session dropped"; "atom" => atom.id);
            return;
        }
        if self.shared.stopped.load(Ordering::Acquire) {
            drop(st);
            self.deliver_failure(
                atom.id,
                FailureOrigin::Shutdown,
                "builtins.RuntimeError",
                "the server is shutting down".into(),
            );
            return;
        }
        st.queue.push_back(Queued {
            req: atom,
            cancelled: false,
        });
        if !st.scheduled {
            st.scheduled = true;
            self.shared.schedule(Job::Run(self.clone()));
        }
        drop(st);
        // Shutdown may have drained the run queue between our check and send.
        if self.shared.stopped.load(Ordering::Acquire) {
            self.fail_queued();
        }
    }

    /// Answers every queued atom with a Shutdown failure (after the executors
    /// are gone). Delivers under the session lock, so concurrent callers cannot
    /// reorder results.
    pub(crate) fn fail_queued(&self) {
        let mut st = self.lock();
        st.scheduled = false;
        while let Some(q) = st.queue.pop_front() {
            self.deliver_failure(
                q.req.id,
                FailureOrigin::Shutdown,
                "builtins.RuntimeError",
                "the server is shutting down".into(),
            );
        }
    }

    fn cancel(self: &Arc<Self>, atom: u64) -> bool {
        let mut st = self.lock();
        if let Some(q) = st
            .queue
            .iter_mut()
            .find(|q| q.req.id == atom && !q.cancelled)
        {
            // Delivered in its turn, so results stay in submission order.
            q.cancelled = true;
            info!(self.log, "queued atom cancelled"; "atom" => atom);
            return true;
        }
        let runs = st.running.as_ref().is_some_and(|r| r.atom == atom);
        drop(st);
        if runs && self.interrupt_running(Interruption::Cancelled) == Some(atom) {
            info!(self.log, "running atom cancelled, interrupting"; "atom" => atom);
            return true;
        }
        false
    }

    fn close(self: &Arc<Self>) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        st.closed = true;
        let dropped = st.queue.len();
        st.queue.clear();
        let running = st.running.as_ref().map(|r| r.atom);
        if st.interp.is_some() {
            self.shared.promise_recycle();
        }
        let idle_interp = if st.scheduled { None } else { st.interp.take() };
        // Whatever the session has parked, also while it waits in the run queue
        // (an executor taking it now sees `closed` and parks nothing). Under the
        // session lock, so no executor parks for it meanwhile.
        self.shared.unpark_for_reset(self.key);
        drop(st);
        if let Some(atom) = running {
            info!(self.log, "session closed mid-atom, interrupting"; "atom" => atom);
            self.interrupt_running(Interruption::Closed);
        }
        if let Some(interp) = idle_interp {
            self.shared.recycle(interp);
        }
        self.shared.forget_session(self.key);
        // The server logs the end at info ("session ended"); this adds only
        // what was dropped, worth info when anything was.
        if dropped > 0 {
            info!(self.log, "session closed"; "dropped_atoms" => dropped);
        } else {
            debug!(self.log, "session closed"; "dropped_atoms" => dropped);
        }
    }
}

/// A PyProxy session's handle on the engine: its own interpreter, its queue.
pub struct EngineSession {
    core: Arc<SessionCore>,
}

impl EngineSession {
    pub(crate) fn new(core: Arc<SessionCore>) -> EngineSession {
        EngineSession { core }
    }

    /// The session id this handle was opened with.
    pub fn id(&self) -> u64 {
        self.core.id
    }

    /// Queue an atom; never blocks on Python. Atoms of one session run strictly in order.
    pub fn submit(&self, atom: AtomRequest) {
        self.core.submit(atom);
    }

    /// Drop a queued atom or interrupt a running one (KeyboardInterrupt in its
    /// interpreter). The atom is still finished with a result (origin
    /// Cancelled, unless it finished first). Returns false if unknown or finished.
    pub fn cancel(&self, atom_id: u64) -> bool {
        self.core.cancel(atom_id)
    }

    /// End the session: queued atoms dropped without sink calls, a running atom
    /// interrupted, the interpreter reset and returned for reuse. Idempotent;
    /// also done on drop. Sink calls for the interrupted atom may still arrive.
    pub fn close(&self) {
        self.core.close();
    }
}

impl Drop for EngineSession {
    fn drop(&mut self) {
        self.core.close();
    }
}

/// One executor thread: its index (for per-interpreter thread states) and pump.
pub(crate) fn executor_loop(index: usize, shared: Arc<Shared>, rx: Receiver<Job>, pump: Pump) {
    let anchor = Anchor::new();
    let mut spin = shared.config.idle_spin;
    loop {
        let core = match next_job(&shared, &rx, spin) {
            Some(Job::Run(core)) => core,
            Some(Job::Poll) => {
                spin = shared.take_nudge();
                pump.expect_atom();
                continue;
            }
            Some(Job::Stop) | None => break,
        };
        spin = shared.config.idle_spin;
        let slice = Instant::now();
        loop {
            if !run_next(index, &shared, &core, &pump, &anchor) {
                // Its atoms no longer run back to back: nothing may stay held.
                core.sink.flush();
                break;
            }
            // More atoms wait. Keep the session while no other session waits
            // for an executor, and for at most a slice when one does.
            if !shared.runq_tx.is_empty() && slice.elapsed() >= SLICE {
                core.sink.flush();
                shared.schedule(Job::Run(core.clone()));
                break;
            }
        }
    }
    drop(pump);
}

/// The next job. One idle executor at a time polls for up to `spin`
/// (`--idle-spin`, or longer after a session opened) before it sleeps on the run queue: a client that sends its next atom right
/// after a result then finds an executor awake, handed the session directly
/// ([`Shared::schedule`]), which saves a thread wake-up (25–30 µs on a VM)
/// per round trip. It yields between polls, so a thread with work on this
/// core runs at once.
fn next_job(shared: &Shared, rx: &Receiver<Job>, spin: Duration) -> Option<Job> {
    if !spin.is_zero() && shared.start_polling() {
        let start = Instant::now();
        loop {
            if let Some(job) = shared.take_handed(false) {
                return Some(job);
            }
            match rx.try_recv() {
                Ok(job) => {
                    let Some(handed) = shared.take_handed(true) else {
                        return Some(job);
                    };
                    // Run the session handed over first and put `job` back
                    // (a Stop at shutdown must not overtake a scheduled session).
                    let _ = shared.runq_tx.send(job);
                    return Some(handed);
                }
                Err(TryRecvError::Disconnected) => return shared.take_handed(true),
                Err(TryRecvError::Empty) if start.elapsed() >= spin => {
                    return shared.take_handed(true).or_else(|| rx.recv().ok());
                }
                Err(TryRecvError::Empty) => std::thread::yield_now(),
            }
        }
    }
    rx.recv().ok()
}

/// Runs the session's next atom; returns true if the session stays scheduled
/// (held by this executor) because more atoms wait.
fn run_next(
    index: usize,
    shared: &Arc<Shared>,
    core: &Arc<SessionCore>,
    pump: &Pump,
    anchor: &Anchor,
) -> bool {
    let stopping = shared.stopping.load(Ordering::Acquire);
    let mut st = core.lock();
    if st.closed {
        st.scheduled = false;
        let interp = st.interp.take();
        drop(st);
        if let Some(interp) = interp {
            shared.recycle(interp);
        }
        return false;
    }
    if stopping {
        refuse_queued(core, st);
        return false;
    }
    let Some(front_cancelled) = st.queue.front().map(|q| q.cancelled) else {
        park(shared, core, &mut st);
        return false;
    };
    if st.interp.is_none() && !front_cancelled {
        drop(st);
        let acquired = shared.acquire(core.key);
        st = core.lock();
        match acquired {
            Ok(interp) if st.closed => {
                st.scheduled = false;
                drop(st);
                shared.promise_recycle();
                shared.recycle(interp);
                return false;
            }
            Ok(interp) => st.interp = Some(interp),
            Err(EngineError::ShuttingDown) => {
                refuse_queued(core, st);
                return false;
            }
            Err(e) => {
                let Some(q) = st.queue.pop_front() else {
                    st.scheduled = false;
                    return false;
                };
                drop(st);
                warn!(core.log, "no interpreter for atom"; "atom" => q.req.id, "error" => %e);
                core.deliver_failure(
                    q.req.id,
                    FailureOrigin::ServerError,
                    "builtins.RuntimeError",
                    format!("no interpreter could run atom {}: {e}", q.req.id),
                );
                return true;
            }
        }
    }
    let Some(front) = st.queue.front() else {
        park(shared, core, &mut st);
        return false;
    };
    let starts = !front.cancelled && st.interp.is_some();
    if starts && !shared.try_busy_enter() {
        // Shutdown began since `stopping` was read above.
        refuse_queued(core, st);
        return false;
    }
    let q = st
        .queue
        .pop_front()
        .expect("the front was just seen under the same lock");
    let interp = st.interp.clone();
    let serial = shared.next_serial();
    if !q.cancelled {
        st.running = Some(Running {
            atom: q.req.id,
            serial,
            reason: None,
        });
    }
    drop(st);

    match interp {
        Some(interp) if starts => {
            execute(index, shared, core, pump, &interp, q.req, serial);
            shared.busy_leave();
            // Before the interpreter can be parked or recycled (and its thread
            // states deleted by the pool thread).
            anchor.rebind();
        }
        _ => core.deliver_failure(
            q.req.id,
            FailureOrigin::Cancelled,
            "builtins.KeyboardInterrupt",
            format!("atom {} was cancelled before it started", q.req.id),
        ),
    }

    let mut st = core.lock();
    st.running = None;
    if st.closed {
        st.scheduled = false;
        let interp = st.interp.take();
        drop(st);
        if let Some(interp) = interp {
            shared.recycle(interp);
        }
        false
    } else if st.queue.is_empty() {
        park(shared, core, &mut st);
        false
    } else {
        true
    }
}

/// Shutdown has begun: no atom of the session starts; everything queued is
/// answered now, in order.
fn refuse_queued(core: &SessionCore, mut st: MutexGuard<'_, SessState>) {
    let queued: Vec<Queued> = st.queue.drain(..).collect();
    st.scheduled = false;
    drop(st);
    for q in queued {
        core.deliver_failure(
            q.req.id,
            FailureOrigin::Shutdown,
            "builtins.RuntimeError",
            "the server is shutting down".into(),
        );
    }
}

/// The session's queue is empty: it is no longer scheduled and its interpreter
/// (if it has one) is parked until its next atom. Called with the session lock
/// held, so `close` sees either the session's interpreter or the parked one.
fn park(shared: &Shared, core: &SessionCore, st: &mut SessState) {
    st.scheduled = false;
    if let Some(interp) = st.interp.take() {
        shared.park(core.key, interp);
    }
}

fn execute(
    index: usize,
    shared: &Arc<Shared>,
    core: &Arc<SessionCore>,
    pump: &Pump,
    interp: &Arc<Interp>,
    req: AtomRequest,
    serial: u64,
) {
    let log = &core.log;
    let timeout = req.timeout.or(shared.config.default_timeout);
    // Per atom: debug, not info. At info these two records, written to stderr
    // and sent to the client as LOG frames, halved W2 and doubled W1.
    debug!(log, "atom start"; "atom" => req.id, "kind" => ?req.kind, "interp" => interp.serial);
    let start = Instant::now();
    if let Some(t) = timeout {
        let _ = shared.watch_tx.send(WatchMsg::Arm {
            session: Arc::downgrade(core),
            serial,
            deadline: start + t,
            timeout: t,
        });
    }
    pump.attach(
        req.id,
        core.sink.clone(),
        [interp.out_r_fd(), interp.err_r_fd()],
    );
    let tstate = interp.exec_tstate(index);
    let raw = interp.run_atom(
        tstate,
        serial,
        req.kind,
        &req.payload,
        req.globals.as_deref(),
        req.locals.as_deref(),
        &req.buffers,
    );
    let duration_us = start.elapsed().as_micros() as u64;
    pump.finish();
    if timeout.is_some() {
        let _ = shared.watch_tx.send(WatchMsg::Disarm(serial));
    }
    let (reason, more) = {
        let st = core.lock();
        let reason = st.running.as_ref().and_then(|r| r.reason);
        (
            reason,
            !st.closed && st.queue.front().is_some_and(|q| !q.cancelled),
        )
    };
    let outcome = outcome(req.id, raw, reason);
    let label = outcome.label();
    let result = AtomResult {
        duration_us,
        ends_output: false,
        outcome,
    };
    if more {
        core.sink.finish_with_more(req.id, result);
    } else {
        core.sink.finish(req.id, result);
    }
    if label == "error" {
        warn!(log, "atom end"; "atom" => req.id, "duration_us" => duration_us, "outcome" => label);
    } else {
        debug!(log, "atom end"; "atom" => req.id, "duration_us" => duration_us, "outcome" => label);
    }
}

/// Turns what the helper returned into the wire outcome, accounting for an
/// interrupt this engine caused.
fn outcome(atom: u64, raw: RawOutcome, reason: Option<Interruption>) -> Outcome {
    match (raw, reason) {
        (RawOutcome::Value { pickled, buffers }, _) => Outcome::Value { pickled, buffers },
        (RawOutcome::Raised { traceback, .. }, Some(reason)) => {
            let (origin, type_name, message) = reason.failure(atom);
            Outcome::Exception(RemoteException {
                origin,
                type_name: type_name.to_owned(),
                message,
                traceback,
                pickled: None,
            })
        }
        (
            RawOutcome::Raised {
                type_name,
                message,
                traceback,
                pickled,
            },
            None,
        ) => Outcome::Exception(RemoteException {
            origin: FailureOrigin::Raised,
            type_name,
            message,
            traceback,
            pickled,
        }),
        (RawOutcome::Internal(message), _) => Outcome::Exception(RemoteException {
            origin: FailureOrigin::ServerError,
            type_name: "builtins.RuntimeError".into(),
            message,
            traceback: String::new(),
            pickled: None,
        }),
    }
}
