//! The engine: CPython's lifetime, the warm pool of interpreters, the executor,
//! pump, pool and watchdog threads, and an orderly shutdown.
//!
//! Interpreters are created, reset and ended only by the *pool thread*, which
//! owns each interpreter's home thread state. A session borrows an interpreter
//! only while it has atoms ([`Shared::acquire`]) and parks it when its queue
//! runs empty ([`Shared::park`]); a parked interpreter goes back to its session
//! as it is, or is reset before anyone else gets it. An interpreter is reset
//! (see `helper.py`: modules, builtins, sys attributes, cwd, environ restored
//! to the warm snapshot; per-thread state dropped) and reused, never ended per
//! session, because ending one leaks 1.6–4.8 MB for good. Idle interpreters
//! beyond [`Engine::idle_cap`] are ended at most one per [`TRIM_INTERVAL`].
//!
//! Threads: `executors` executor threads (each with a pump thread), one pool
//! thread, one watchdog thread. All stop in [`Engine::shutdown`], in this order:
//! stop taking atoms, wait for running ones (grace), interrupt the rest, stop
//! the executors and the watchdog, end every interpreter (pool thread),
//! finalise CPython (calling thread).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use slog::{debug, error, info, o, warn, Logger};

use super::error::EngineError;
use super::interp::Interp;
use super::output::Pump;
use super::python;
use super::session::{executor_loop, EngineSession, Interruption, Job, SessionCore};
use super::watchdog::{watchdog_loop, WatchMsg};
use super::{EngineConfig, Sink};

/// Minimum time between two trims of surplus idle interpreters.
pub(crate) const TRIM_INTERVAL: Duration = Duration::from_secs(60);
/// How long `open_session` waits for an interpreter when the pool is empty.
const OPEN_WAIT: Duration = Duration::from_secs(30);
/// How long shutdown waits for interrupted atoms after the grace period.
const INTERRUPT_WAIT: Duration = Duration::from_secs(5);

pub(crate) enum PoolMsg {
    /// A closed session's interpreter: reset it and make it ready again.
    Recycle(Arc<Interp>),
    /// A ready interpreter was taken: top the pool up.
    Refill,
    /// End every interpreter and exit.
    Shutdown,
}

/// An interpreter a session used and let go of when its queue ran empty. It
/// keeps what that session's atoms left behind, so only that session may take
/// it back as it is; anyone else gets it only after a reset.
struct Parked {
    interp: Arc<Interp>,
    owner: u64,
    since: Instant,
}

impl PoolState {
    /// The parked interpreter the pool may take from its session: the one
    /// parked longest, not pinned to its session (see `Interp::is_pinned`).
    fn take_oldest_unpinned(&mut self) -> Option<Parked> {
        let oldest = (0..self.parked.len())
            .filter(|&i| !self.parked[i].interp.is_pinned())
            .min_by_key(|&i| self.parked[i].since)?;
        Some(self.parked.swap_remove(oldest))
    }
}

struct PoolState {
    /// Reset (or fresh) interpreters, ready for any session.
    ready: Vec<Arc<Interp>>,
    parked: Vec<Parked>,
    /// Interpreters sent back for reset and not yet ready again: counted as
    /// ready when deciding whether to create one (creating takes ~70 ms and
    /// adds 6–7 MB; a reset takes a few ms).
    recycling: usize,
    /// Why the last creation failed, while no interpreter could be made.
    failed: Option<String>,
}

/// State shared by the engine handle, sessions and engine threads.
pub(crate) struct Shared {
    pub(crate) config: EngineConfig,
    log: Logger,
    pub(crate) runq_tx: Sender<Job>,
    pub(crate) watch_tx: Sender<WatchMsg>,
    pool_tx: Sender<PoolMsg>,
    pool: Mutex<PoolState>,
    pool_cv: Condvar,
    /// Set at the start of shutdown: no session opens, no atom starts.
    pub(crate) stopping: AtomicBool,
    /// Set once the executors are gone: submits are answered at once.
    pub(crate) stopped: AtomicBool,
    /// Atoms executing now.
    busy: Mutex<usize>,
    busy_cv: Condvar,
    sessions: Mutex<HashMap<u64, Weak<SessionCore>>>,
    serial: AtomicU64,
    /// The idle executor that polls for work, if any, and a job handed to it.
    handoff: Mutex<Handoff>,
}

/// At most one idle executor polls for work (`--idle-spin`); while it does, a
/// newly scheduled session is handed to it here instead of going through the
/// run queue, whose `send` would also wake a sleeping executor to race it.
#[derive(Default)]
struct Handoff {
    polling: bool,
    job: Option<Job>,
    /// A `Job::Poll` is on its way to an executor.
    nudged: bool,
}

/// How long an executor polls after a session opens (see [`Shared::nudge`]):
/// the first EVAL follows WELCOME by a round trip and the client's own work,
/// 0.3–0.4 ms in W5 here.
const OPEN_SPIN: Duration = Duration::from_millis(1);

impl Shared {
    /// Gives a session to an executor: to the polling one if there is one,
    /// else through the run queue.
    pub(crate) fn schedule(&self, job: Job) {
        {
            let mut h = lock(&self.handoff);
            if h.polling && h.job.is_none() {
                h.job = Some(job);
                return;
            }
        }
        let _ = self.runq_tx.send(job);
    }

    /// A session opened and its first atom usually follows within a few
    /// hundred µs. Unless an executor polls already, one is woken now to poll
    /// for [`OPEN_SPIN`], so that atom finds it awake: a thread wake-up (~50 µs
    /// on a VM) less on the way to a new session's first result. Off with
    /// `--idle-spin 0`.
    pub(crate) fn nudge(&self) {
        if self.config.idle_spin.is_zero() {
            return;
        }
        {
            let mut h = lock(&self.handoff);
            if h.polling || std::mem::replace(&mut h.nudged, true) {
                return;
            }
        }
        let _ = self.runq_tx.send(Job::Poll);
    }

    /// How long an executor that took a `Job::Poll` polls.
    pub(crate) fn take_nudge(&self) -> Duration {
        lock(&self.handoff).nudged = false;
        OPEN_SPIN
    }

    /// Makes the caller the polling executor; false if another one polls.
    pub(crate) fn start_polling(&self) -> bool {
        let mut h = lock(&self.handoff);
        !std::mem::replace(&mut h.polling, true)
    }

    /// The job handed to the polling executor, if any. Polling ends when one
    /// is taken, or with `stop`: then nothing can be handed over any more.
    pub(crate) fn take_handed(&self, stop: bool) -> Option<Job> {
        let mut h = lock(&self.handoff);
        let job = h.job.take();
        if stop || job.is_some() {
            h.polling = false;
        }
        job
    }

    pub(crate) fn next_serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Called when a session holding an interpreter closes, before the
    /// interpreter is handed back (that may happen a little later, when the
    /// executor holding the session lets go): the pool counts it from now on.
    pub(crate) fn promise_recycle(&self) {
        lock(&self.pool).recycling += 1;
    }

    /// An interpreter for the session `owner`'s next atom: the one it parked,
    /// if no one has taken it since, else a ready one. Waits only while none is
    /// ready (the pool thread resets a parked one or creates one), up to 30 s.
    pub(crate) fn acquire(&self, owner: u64) -> Result<Arc<Interp>, EngineError> {
        let started = Instant::now();
        let mut pool = lock(&self.pool);
        if let Some(at) = pool.parked.iter().position(|p| p.owner == owner) {
            return Ok(pool.parked.swap_remove(at).interp);
        }
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return Err(EngineError::ShuttingDown);
            }
            if let Some(i) = pool.ready.pop() {
                drop(pool);
                let _ = self.pool_tx.send(PoolMsg::Refill);
                let waited = started.elapsed();
                if waited >= Duration::from_millis(1) {
                    info!(self.log, "waited for an interpreter"; "session_key" => owner,
                          "waited_us" => waited.as_micros() as u64);
                }
                return Ok(i);
            }
            if let Some(message) = &pool.failed {
                return Err(EngineError::Interpreter {
                    message: message.clone(),
                });
            }
            let waited = started.elapsed();
            if waited >= OPEN_WAIT {
                return Err(EngineError::PoolTimeout {
                    waited_ms: waited.as_millis() as u64,
                });
            }
            let _ = self.pool_tx.send(PoolMsg::Refill);
            pool = self
                .pool_cv
                .wait_timeout(pool, OPEN_WAIT - waited)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Keeps the interpreter of a session whose queue ran empty for that
    /// session's next atom (see [`Parked`]).
    pub(crate) fn park(&self, owner: u64, interp: Arc<Interp>) {
        lock(&self.pool).parked.push(Parked {
            interp,
            owner,
            since: Instant::now(),
        });
    }

    /// At session close: sends the interpreters the session parked (usually
    /// one; two if the pool pinned one to it while it ran in another) to be reset.
    pub(crate) fn unpark_for_reset(&self, owner: u64) {
        let mine: Vec<Arc<Interp>> = {
            let mut pool = lock(&self.pool);
            let mut mine = Vec::new();
            while let Some(at) = pool.parked.iter().position(|p| p.owner == owner) {
                mine.push(pool.parked.swap_remove(at).interp);
            }
            pool.recycling += mine.len();
            mine
        };
        for interp in mine {
            self.recycle(interp);
        }
    }

    /// Hands a closed session's interpreter back (after [`promise_recycle`]).
    pub(crate) fn recycle(&self, interp: Arc<Interp>) {
        if self.pool_tx.send(PoolMsg::Recycle(interp)).is_err() {
            lock(&self.pool).recycling -= 1;
        }
    }

    pub(crate) fn forget_session(&self, key: u64) {
        lock(&self.sessions).remove(&key);
    }

    /// Counts an atom as executing, unless shutdown has begun: then it must not
    /// start. Checked under the lock that shutdown sets `stopping` under, so an
    /// atom either is counted before shutdown waits for the count, or never starts.
    pub(crate) fn try_busy_enter(&self) -> bool {
        let mut b = lock(&self.busy);
        if self.stopping.load(Ordering::Acquire) {
            return false;
        }
        *b += 1;
        true
    }

    pub(crate) fn busy_leave(&self) {
        let mut b = lock(&self.busy);
        *b -= 1;
        if *b == 0 {
            self.busy_cv.notify_all();
        }
    }

    /// Waits until no atom executes or `deadline`; returns the number still running.
    fn wait_idle(&self, deadline: Instant) -> usize {
        let mut b = lock(&self.busy);
        while *b > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            b = self
                .busy_cv
                .wait_timeout(b, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *b
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Threads {
    executors: Vec<JoinHandle<()>>,
    /// For draining sessions re-queued after the executors stopped.
    runq_rx: Receiver<Job>,
    pool: JoinHandle<()>,
    watchdog: JoinHandle<()>,
    main_tstate: usize,
    init_thread: ThreadId,
}

/// The sub-interpreter execution engine. `Send + Sync`; share it as `Arc<Engine>`.
pub struct Engine {
    shared: Arc<Shared>,
    python_version: String,
    threads: Mutex<Option<Threads>>,
    session_keys: AtomicU64,
}

impl Engine {
    /// Initialises CPython (venv in `config.python_env` honoured, `workdir` made
    /// current, no Python signal handlers), starts the warm pool and the engine
    /// threads. Call once per process, before other threads use Python; the
    /// thread that calls it should be the one that calls [`Engine::shutdown`].
    /// Returns once the first interpreter is warm (so a missing cloudpickle or
    /// preload module is reported here).
    pub fn start(config: EngineConfig, log: slog::Logger) -> Result<Engine, EngineError> {
        let mut config = config;
        config.executors = config.executors.max(1);
        config.max_line = config.max_line.max(1);
        if let Some(dir) = &config.workdir {
            std::env::set_current_dir(dir).map_err(|source| EngineError::Workdir {
                path: dir.clone(),
                source,
            })?;
        }
        let workdir = std::env::current_dir()
            .ok()
            .and_then(|p| p.to_str().map(str::to_owned));
        // The environment every interpreter is reset to (see helper.setup).
        let environ: Vec<(String, String)> = std::env::vars().collect();
        let main_tstate = python::initialize(config.python_env.as_deref())?;
        let python_version = python::version();
        info!(log, "python initialised"; "version" => &python_version,
              "python_env" => config.python_env.as_ref().map(|p| p.display().to_string()));

        let (runq_tx, runq_rx) = channel::unbounded();
        let (watch_tx, watch_rx) = channel::unbounded();
        let (pool_tx, pool_rx) = channel::unbounded();
        let shared = Arc::new(Shared {
            config: config.clone(),
            log: log.clone(),
            runq_tx,
            watch_tx,
            pool_tx,
            pool: Mutex::new(PoolState {
                ready: Vec::new(),
                parked: Vec::new(),
                recycling: 0,
                failed: None,
            }),
            pool_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            busy: Mutex::new(0),
            busy_cv: Condvar::new(),
            sessions: Mutex::new(HashMap::new()),
            serial: AtomicU64::new(0),
            handoff: Mutex::new(Handoff::default()),
        });

        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|source| EngineError::Thread { source })
        };
        let (first_tx, first_rx) = channel::bounded(1);
        let pool = {
            let shared = shared.clone();
            let workdir = workdir.clone();
            spawn(
                "pyproxy-pool".into(),
                Box::new(move || pool_loop(shared, pool_rx, first_tx, workdir, environ)),
            )?
        };
        let first: Result<(), EngineError> =
            first_rx.recv().unwrap_or(Err(EngineError::Interpreter {
                message: "the pool thread died".into(),
            }));
        if let Err(e) = first {
            let _ = pool.join();
            python::finalize(main_tstate, true);
            return Err(e);
        }
        let watchdog = spawn(
            "pyproxy-watchdog".into(),
            Box::new(move || watchdog_loop(watch_rx)),
        )?;
        let mut executors = Vec::new();
        for index in 0..config.executors {
            let pump = Pump::start(format!("pyproxy-pump-{index}"), config.max_line)
                .map_err(|source| EngineError::Thread { source })?;
            let shared = shared.clone();
            let rx: Receiver<Job> = runq_rx.clone();
            executors.push(spawn(
                format!("pyproxy-exec-{index}"),
                Box::new(move || executor_loop(index, shared, rx, pump)),
            )?);
        }
        info!(log, "engine started"; "executors" => config.executors, "warm_pool" => config.warm_pool);
        Ok(Engine {
            shared,
            python_version,
            threads: Mutex::new(Some(Threads {
                executors,
                runq_rx,
                pool,
                watchdog,
                main_tstate,
                init_thread: std::thread::current().id(),
            })),
            session_keys: AtomicU64::new(0),
        })
    }

    /// Idle interpreters kept before surplus ones are ended (slowly).
    pub fn idle_cap(&self) -> usize {
        idle_cap(&self.shared.config)
    }

    /// Opens a session. It holds no interpreter yet: each time its queue goes
    /// from empty to non-empty an executor takes one for it ([`Shared::acquire`]:
    /// the one it used last if no other session has needed it since, else a
    /// ready one from the warm pool) and parks it again when the queue is empty.
    /// So idle sessions cost no interpreter, and a session's interpreter is reset
    /// before any other session runs in it.
    pub fn open_session(
        &self,
        session_id: u64,
        sink: Sink,
        log: slog::Logger,
    ) -> Result<EngineSession, EngineError> {
        let shared = &self.shared;
        if shared.stopping.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        {
            let pool = lock(&shared.pool);
            if let (Some(message), true) = (&pool.failed, pool.ready.is_empty()) {
                return Err(EngineError::Interpreter {
                    message: message.clone(),
                });
            }
        }
        let key = self.session_keys.fetch_add(1, Ordering::Relaxed);
        // Debug: the server logs the same event at info ("client connected").
        debug!(log, "session opened"; "session_key" => key);
        let core = Arc::new(SessionCore::new(key, session_id, sink, log, shared.clone()));
        lock(&shared.sessions).insert(key, Arc::downgrade(&core));
        shared.nudge();
        Ok(EngineSession::new(core))
    }

    /// The linked CPython's version, e.g. `3.13.0`.
    pub fn python_version(&self) -> &str {
        &self.python_version
    }

    /// Always `cpython`.
    pub fn implementation(&self) -> &str {
        "cpython"
    }

    /// Stop taking atoms, let running ones finish within `grace`, interrupt the
    /// rest, end every sub-interpreter, join all engine threads, finalise
    /// CPython. Idempotent. Call it from the thread that called [`Engine::start`]
    /// (another thread works too, with a fresh main-interpreter thread state).
    ///
    /// If an interrupted atom still runs after 5 more seconds (blocked in a C
    /// call), its interpreter cannot be ended, so CPython is left initialised
    /// (finalising would abort or hang); the error is logged.
    pub fn shutdown(&self, grace: Duration) {
        let Some(threads) = lock(&self.threads).take() else {
            return;
        };
        let shared = &self.shared;
        let log = &shared.log;
        info!(log, "engine shutting down"; "grace_ms" => grace.as_millis() as u64);
        {
            let _busy = lock(&shared.busy);
            shared.stopping.store(true, Ordering::Release);
        }
        {
            let _pool = lock(&shared.pool);
            shared.pool_cv.notify_all();
        }
        let mut left = shared.wait_idle(Instant::now() + grace);
        if left > 0 {
            let live: Vec<Arc<SessionCore>> = lock(&shared.sessions)
                .values()
                .filter_map(Weak::upgrade)
                .collect();
            for s in &live {
                if let Some(atom) = s.interrupt_running(Interruption::Shutdown) {
                    info!(s.log(), "interrupting atom for shutdown"; "atom" => atom);
                }
            }
            drop(live);
            left = shared.wait_idle(Instant::now() + INTERRUPT_WAIT);
        }
        if left > 0 {
            error!(log, "atoms still running after interrupts; leaving Python initialised"; "running" => left);
            return;
        }
        for _ in &threads.executors {
            let _ = shared.runq_tx.send(Job::Stop);
        }
        for t in threads.executors {
            let _ = t.join();
        }
        shared.stopped.store(true, Ordering::Release);
        while let Ok(job) = threads.runq_rx.try_recv() {
            if let Job::Run(session) = job {
                session.fail_queued();
            }
        }
        let _ = shared.watch_tx.send(WatchMsg::Stop);
        let _ = threads.watchdog.join();
        let _ = shared.pool_tx.send(PoolMsg::Shutdown);
        let _ = threads.pool.join();
        if self.python_version.starts_with("3.12.") {
            // 3.12's finalisation frees objects that isolated sub-interpreters
            // allocated into process-wide caches (Argument Clinic keyword tuples,
            // gh-119213: "free(): invalid pointer" in _PyTuple_Fini, reproduced
            // here on 3.12.1). Every sub-interpreter has been ended and every
            // engine thread joined; the process exits without Py_FinalizeEx.
            info!(
                log,
                "engine stopped; CPython 3.12 is not finalised (gh-119213)"
            );
            return;
        }
        let on_init_thread = std::thread::current().id() == threads.init_thread;
        let code = python::finalize(threads.main_tstate, on_init_thread);
        if code != 0 {
            warn!(log, "Py_FinalizeEx reported an error"; "code" => code);
        }
        info!(log, "engine stopped");
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

pub(crate) fn idle_cap(config: &EngineConfig) -> usize {
    2 * config.warm_pool.max(1) + config.executors
}

fn pool_loop(
    shared: Arc<Shared>,
    rx: Receiver<PoolMsg>,
    first: Sender<Result<(), EngineError>>,
    workdir: Option<String>,
    environ: Vec<(String, String)>,
) {
    let _anchor = python::Anchor::new();
    let log = shared.log.new(o!("thread" => "pool"));
    let config = &shared.config;
    let mut all: Vec<Arc<Interp>> = Vec::new();
    let mut serial = 0u64;
    let mut create = |all: &mut Vec<Arc<Interp>>| -> Result<Arc<Interp>, EngineError> {
        serial += 1;
        let started = Instant::now();
        let interp = Arc::new(Interp::create(
            serial,
            config.executors,
            workdir.as_deref(),
            &config.preload,
            &environ,
        )?);
        all.push(interp.clone());
        slog::debug!(log, "interpreter created"; "interp" => serial, "ms" => started.elapsed().as_millis() as u64);
        Ok(interp)
    };
    match create(&mut all) {
        Ok(i) => lock(&shared.pool).ready.push(i),
        Err(e) => {
            let _ = first.send(Err(e));
            return;
        }
    }
    let _ = first.send(Ok(()));
    let mut last_trim = Instant::now();
    let mut retry_at: Option<Instant> = None;
    loop {
        let ready = {
            let pool = lock(&shared.pool);
            pool.ready.len() + pool.recycling
        };
        let stopping = shared.stopping.load(Ordering::Acquire);
        let need = !stopping
            && ready < config.warm_pool.max(1)
            && retry_at.is_none_or(|t| Instant::now() >= t);
        let msg = if need {
            match rx.try_recv() {
                Ok(m) => Some(m),
                Err(channel::TryRecvError::Empty) => None,
                Err(channel::TryRecvError::Disconnected) => break,
            }
        } else {
            let tick = retry_at
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(TRIM_INTERVAL)
                .min(TRIM_INTERVAL);
            match rx.recv_timeout(tick) {
                Ok(m) => Some(m),
                Err(channel::RecvTimeoutError::Timeout) => None,
                Err(channel::RecvTimeoutError::Disconnected) => break,
            }
        };
        match msg {
            Some(PoolMsg::Shutdown) => break,
            Some(PoolMsg::Refill) => {}
            Some(PoolMsg::Recycle(interp)) => {
                lock(&shared.pool).recycling -= 1;
                if stopping || interp.is_ended() {
                    continue;
                }
                // Its session is gone, and with it the reason for a pin.
                interp.set_pinned(false);
                reset_into_ready(&shared, &log, &mut all, interp, false);
            }
            None if need => {
                // Resetting an idle session's parked interpreter takes well under
                // a millisecond; creating one takes ~70 ms and 6–7 MB.
                let stolen = lock(&shared.pool).take_oldest_unpinned();
                if let Some(parked) = stolen {
                    let owner = parked.owner;
                    if let Some(interp) =
                        reset_into_ready(&shared, &log, &mut all, parked.interp, true)
                    {
                        warn!(log, "a session left Python threads running in its interpreter; \
                                    it keeps that interpreter to itself until it closes";
                              "interp" => interp.serial, "session_key" => owner);
                        interp.set_pinned(true);
                        shared.park(owner, interp);
                    }
                    continue;
                }
                match create(&mut all) {
                    Ok(i) => {
                        retry_at = None;
                        let mut pool = lock(&shared.pool);
                        pool.failed = None;
                        pool.ready.push(i);
                        shared.pool_cv.notify_one();
                    }
                    Err(e) => {
                        error!(log, "creating an interpreter failed"; "error" => %e);
                        retry_at = Some(Instant::now() + Duration::from_secs(1));
                        let mut pool = lock(&shared.pool);
                        if pool.ready.is_empty() {
                            pool.failed = Some(e.to_string());
                            shared.pool_cv.notify_all();
                        }
                    }
                }
            }
            None => {
                if retry_at.is_some_and(|t| Instant::now() >= t) {
                    retry_at = None;
                }
                if last_trim.elapsed() >= TRIM_INTERVAL {
                    last_trim = Instant::now();
                    let surplus = {
                        let mut pool = lock(&shared.pool);
                        if pool.ready.len() + pool.parked.len() <= idle_cap(config) {
                            None
                        } else if let Some(parked) = pool.take_oldest_unpinned() {
                            Some(parked.interp)
                        } else {
                            (!pool.ready.is_empty()).then(|| pool.ready.remove(0))
                        }
                    };
                    if let Some(interp) = surplus {
                        info!(log, "ending a surplus idle interpreter"; "interp" => interp.serial);
                        all.retain(|i| !Arc::ptr_eq(i, &interp));
                        interp.end();
                    }
                }
            }
        }
    }
    {
        let mut pool = lock(&shared.pool);
        pool.ready.clear();
        pool.parked.clear();
    }
    let count = all.len();
    for interp in all {
        interp.end();
    }
    info!(log, "all interpreters ended"; "count" => count);
}

/// Resets `interp` to its warm snapshot and makes it ready; ends it if the
/// reset fails. Pool thread only. If the reset finds Python threads still
/// running and `keep_if_threads`, the interpreter is handed back instead of
/// being made ready (its threads' output must not reach another session).
fn reset_into_ready(
    shared: &Shared,
    log: &Logger,
    all: &mut Vec<Arc<Interp>>,
    interp: Arc<Interp>,
    keep_if_threads: bool,
) -> Option<Arc<Interp>> {
    let started = Instant::now();
    match interp.reset() {
        Ok(threads) if threads > 0 && keep_if_threads => Some(interp),
        Ok(threads) => {
            if threads > 0 {
                warn!(log, "a session left Python threads running in its interpreter; \
                            their output will reach the interpreter's next session";
                      "interp" => interp.serial, "threads" => threads);
            }
            slog::debug!(log, "interpreter reset"; "interp" => interp.serial,
                         "us" => started.elapsed().as_micros() as u64);
            let mut pool = lock(&shared.pool);
            pool.ready.push(interp);
            shared.pool_cv.notify_one();
            None
        }
        Err(e) => {
            warn!(log, "interpreter reset failed; ending it"; "interp" => interp.serial, "error" => e);
            all.retain(|i| !Arc::ptr_eq(i, &interp));
            interp.end();
            None
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
    check::<EngineSession>();
    let _: Option<PathBuf> = None;
}
