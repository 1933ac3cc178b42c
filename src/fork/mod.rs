//! The fork backend: each session's atoms run in a worker *process* forked
//! from a zygote, for code that needs full process isolation or extension
//! modules that refuse sub-interpreters (numpy and most of the scientific
//! stack).
//!
//! Processes and channels (`docs/architecture.md`, "The fork backend"):
//! - `pyproxy-server` forks the **zygote** ([`zygote`]) before it starts any
//!   thread. They talk over one `SOCK_SEQPACKET` socketpair in fixed records
//!   ([`wire::Record`]): spawn a worker, signal one, and back: a worker's pid
//!   with its fds (`SCM_RIGHTS`), every child's exit status.
//! - A **worker** per session, its fds 1 and 2 pipes the server reads, fd 3 a
//!   control socket carrying atoms in and results out ([`wire`] messages,
//!   `worker.py` on the other end). One server thread per session
//!   ([`session`]) `poll(2)`s the control socket, both pipes and a wake pipe,
//!   so output is attributed to the running atom and drained to the last byte
//!   before the atom's `finish`.
//! - One server thread (`pyproxy-zygote`) reads the zygote's records and
//!   routes them: new workers to whoever asked (or to the warm slot), exit
//!   statuses to the session whose worker died. If the zygote dies, the same
//!   thread starts a replacement (the server binary run again, see
//!   [`zygote::exec_zygote`]): a new generation, whose workers' pids are never
//!   confused with the old one's.

mod session;
pub mod wire;
pub mod zygote;

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use slog::{error, info, warn, Logger};

use crate::engine::Sink;
use crate::server::{Backend, BackendSession};

use wire::Record;
pub use zygote::{fork_zygote, ZygoteProcess};

/// The name clients use for this backend (HELLO/WELCOME `backend`).
pub const NAME: &str = "fork";

/// Resource limits applied in each worker after fork (`setrlimit`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerLimits {
    /// `RLIMIT_AS`, bytes (`--worker-memory`).
    pub memory: Option<u64>,
    /// `RLIMIT_CPU`, seconds (`--worker-cpu`); past it the kernel sends SIGXCPU.
    pub cpu_seconds: Option<u64>,
    /// `RLIMIT_NOFILE` (`--worker-files`).
    pub files: Option<u64>,
}

/// The account workers run as (`--user`), resolved at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub home: Option<PathBuf>,
}

/// Settings of the fork backend (from the command line).
#[derive(Clone, Debug)]
pub struct ForkConfig {
    pub python_env: Option<PathBuf>,
    /// The zygote's, and so every worker's, working directory.
    pub workdir: Option<PathBuf>,
    pub preload: Vec<String>,
    pub max_line: usize,
    pub default_timeout: Option<Duration>,
    pub limits: WorkerLimits,
    /// Between SIGINT (or SIGTERM) and SIGKILL.
    pub kill_grace: Duration,
    /// A fresh directory per session is made under it, the worker's cwd, and
    /// removed when the session ends.
    pub sandbox_dir: Option<PathBuf>,
    pub user: Option<User>,
    /// Workers forked in advance so opening a session does not wait for a fork.
    pub warm_workers: usize,
}

impl Default for ForkConfig {
    fn default() -> Self {
        ForkConfig {
            python_env: None,
            workdir: None,
            preload: Vec::new(),
            max_line: 64 * 1024,
            default_timeout: None,
            limits: WorkerLimits::default(),
            kill_grace: Duration::from_secs(2),
            sandbox_dir: None,
            user: None,
            warm_workers: 1,
        }
    }
}

/// A worker as the zygote that forked it knows it: a pid means something
/// only to that zygote, and a restarted zygote is a new generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Wid {
    pub pid: libc::pid_t,
    pub gen: u64,
}

/// A worker process as the server holds it. Dropping it closes the server's
/// ends (the worker reads EOF on its control socket and exits).
pub(crate) struct Worker {
    pub pid: libc::pid_t,
    /// The generation of the zygote that forked it.
    pub gen: u64,
    pub ctl: UnixStream,
    /// Read ends of its stdout and stderr pipes, nonblocking.
    pub out: [OwnedFd; 2],
    /// Pipes at EOF: the worker closed or replaced its fd 1 or 2 (and no child
    /// holds a copy), so nothing can write them again; poll would report them
    /// readable for ever.
    pub out_ended: [bool; 2],
}

impl Worker {
    pub fn wid(&self) -> Wid {
        Wid {
            pid: self.pid,
            gen: self.gen,
        }
    }
}

/// Token of a spawn request whose worker goes to the warm slot.
const WARM: u64 = 0;
/// How long a session waits for the zygote to fork a worker.
const SPAWN_WAIT: Duration = Duration::from_secs(10);
/// How long a replacement zygote may take to be ready (it imports `--preload`).
const RESTART_READY_WAIT: Duration = Duration::from_secs(120);
/// The wait before replacing a zygote that died, doubled for each one that
/// dies within [`RESTART_STABLE`] of its start, up to [`RESTART_MAX`].
const RESTART_FIRST: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(30);
const RESTART_STABLE: Duration = Duration::from_secs(60);

/// The wait before the next restart, after one that waited `last` and made a
/// zygote that lived `lived` (the first restart after a long life is quick; a
/// zygote that keeps dying is restarted less and less often).
fn restart_delay(last: Option<Duration>, lived: Duration) -> Duration {
    match last {
        Some(last) if lived < RESTART_STABLE => (last * 2).min(RESTART_MAX),
        _ => RESTART_FIRST,
    }
}

/// The zygote of the moment.
struct Link {
    gen: u64,
    sock: Arc<OwnedFd>,
    pid: libc::pid_t,
    born: Instant,
}

#[derive(Default)]
struct Warm {
    ready: VecDeque<Worker>,
    requested: usize,
}

/// What sessions and the record reader share.
pub(crate) struct Core {
    config: ForkConfig,
    log: Logger,
    link: Mutex<Link>,
    /// True while the current zygote serves: false from its death until a
    /// replacement is ready, and after shutdown.
    alive: AtomicBool,
    /// Set by `shutdown`: no new sessions.
    closing: AtomicBool,
    /// Wakes the record reader from a wait before a restart, at shutdown.
    stop_tx: Sender<()>,
    restarts: AtomicU64,
    next_token: AtomicU64,
    pending: Mutex<HashMap<u64, Sender<Result<Worker, String>>>>,
    warm: Mutex<Warm>,
    /// Exit statuses not yet claimed by the session whose worker it was.
    exits: Mutex<HashMap<Wid, i32>>,
    exit_cv: Condvar,
    /// Workers nobody will ask about (terminated at session close).
    abandoned: Mutex<HashSet<Wid>>,
    sessions: Mutex<HashMap<u64, Arc<session::Control>>>,
    python_version: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Core {
    fn send(&self, record: Record) -> bool {
        let sock = Arc::clone(&lock(&self.link).sock);
        wire::send_record(sock.as_raw_fd(), &record, &[]).is_ok()
    }

    /// Sends `record` about worker `w` to the zygote that forked it, if that
    /// zygote still serves: another zygote's child may have the same pid.
    fn send_about(&self, w: Wid, record: Record) {
        let sock = {
            let link = lock(&self.link);
            if link.gen != w.gen {
                return;
            }
            Arc::clone(&link.sock)
        };
        let _ = wire::send_record(sock.as_raw_fd(), &record, &[]);
    }

    /// Whether `w`'s zygote died (so `w` died with it, `PR_SET_PDEATHSIG`).
    pub(crate) fn lost_with_zygote(&self, w: Wid) -> bool {
        w.gen != lock(&self.link).gen || !self.alive.load(Ordering::SeqCst)
    }

    pub(crate) fn dead_message(&self) -> String {
        if self.closing.load(Ordering::SeqCst) {
            return "the fork backend is shutting down".to_owned();
        }
        "the fork backend's zygote process died and is being restarted (see the server log); \
         try again in a moment"
            .to_owned()
    }

    /// Keeps `warm_workers` spawned or on their way.
    fn refill(&self) {
        if !self.alive.load(Ordering::SeqCst) || self.closing.load(Ordering::SeqCst) {
            return;
        }
        let mut warm = lock(&self.warm);
        while warm.ready.len() + warm.requested < self.config.warm_workers {
            if !self.send(Record::Spawn { token: WARM }) {
                break;
            }
            warm.requested += 1;
        }
    }

    /// A fresh worker straight from the zygote.
    fn spawn(&self) -> Result<Worker, String> {
        if !self.alive.load(Ordering::SeqCst) {
            return Err(self.dead_message());
        }
        let token = self.next_token.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = channel::bounded(1);
        lock(&self.pending).insert(token, tx);
        if !self.send(Record::Spawn { token }) {
            lock(&self.pending).remove(&token);
            return Err(self.dead_message());
        }
        match rx.recv_timeout(SPAWN_WAIT) {
            Ok(r) => r,
            Err(_) => {
                lock(&self.pending).remove(&token);
                if self.alive.load(Ordering::SeqCst) {
                    Err(format!(
                        "the fork zygote did not fork a worker within {} s",
                        SPAWN_WAIT.as_secs()
                    ))
                } else {
                    Err(self.dead_message())
                }
            }
        }
    }

    /// A warm worker if one is ready, else a fresh one; the warm slot is refilled.
    fn take(&self) -> Result<Worker, String> {
        let warm = lock(&self.warm).ready.pop_front();
        self.refill();
        match warm {
            Some(w) => Ok(w),
            None => self.spawn(),
        }
    }

    fn signal(&self, w: Wid, signal: i32) {
        self.send_about(w, Record::Signal { pid: w.pid, signal });
    }

    /// SIGTERM now, SIGKILL after the kill grace (done by the zygote).
    fn terminate(&self, w: Wid) {
        self.send_about(
            w,
            Record::Terminate {
                pid: w.pid,
                grace_ms: self.config.kill_grace.as_millis() as u64,
            },
        );
    }

    /// The wait status of `w`, once its zygote reaped it; `None` after
    /// `timeout` or if its zygote is gone.
    fn wait_exit(&self, w: Wid, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let mut exits = lock(&self.exits);
        loop {
            if let Some(s) = exits.remove(&w) {
                return Some(s);
            }
            let now = Instant::now();
            if self.lost_with_zygote(w) {
                return None;
            }
            if now >= deadline {
                lock(&self.abandoned).insert(w);
                return None;
            }
            exits = self
                .exit_cv
                .wait_timeout(exits, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn forget(&self, w: Wid) {
        // A dead zygote reports no more exits: nothing to wait for.
        if lock(&self.exits).remove(&w).is_none() && !self.lost_with_zygote(w) {
            lock(&self.abandoned).insert(w);
        }
    }

    /// The `pyproxy-zygote` thread: routes the zygote's records until it hangs
    /// up. Then, unless the server is shutting down, it starts a replacement
    /// (trying again, less and less often, while that fails) and routes the
    /// new zygote's records. At shutdown it reaps the zygote and returns.
    fn read_records(self: Arc<Core>, stop: Receiver<()>) {
        let mut delay = None;
        loop {
            let (gen, sock, pid, born) = {
                let link = lock(&self.link);
                (link.gen, Arc::clone(&link.sock), link.pid, link.born)
            };
            let unreadable = self.route(gen, &sock);
            self.alive.store(false, Ordering::SeqCst);
            lock(&self.pending).clear();
            *lock(&self.warm) = Warm::default();
            // No exit of this generation will come any more. Those already here
            // stay for their sessions to claim: a worker the OOM killer ended
            // just before the zygote was killed by signal 9, not "with the zygote".
            lock(&self.abandoned).retain(|w| w.gen != gen);
            self.exit_cv.notify_all();
            if self.closing.load(Ordering::SeqCst) {
                self.reap_at_shutdown(pid);
                return;
            }
            // Its socket ended or failed, so it is dead or of no use.
            let how = match unreadable {
                None => kill_and_reap(pid),
                Some(why) => format!(
                    "its record socket failed ({why}), so the server killed it: {}",
                    kill_and_reap(pid)
                ),
            };
            let mut wait = restart_delay(delay, born.elapsed());
            error!(self.log, "the fork backend's zygote died, and its workers with it; starting a new one";
                "zygote" => pid, "how" => how, "restart_in_ms" => wait.as_millis() as u64);
            loop {
                delay = Some(wait);
                let stopped = !matches!(
                    stop.recv_timeout(wait),
                    Err(channel::RecvTimeoutError::Timeout)
                );
                if stopped || self.closing.load(Ordering::SeqCst) {
                    return;
                }
                match self.restart() {
                    Ok(()) => break,
                    Err(e) => {
                        wait = restart_delay(delay, Duration::ZERO);
                        error!(self.log, "cannot start a new fork zygote";
                            "error" => e, "retry_in_ms" => wait.as_millis() as u64);
                    }
                }
            }
        }
    }

    /// Starts the next generation of zygote in place of a dead one and waits
    /// until it is ready; on failure it is gone again (killed and reaped).
    fn restart(&self) -> Result<(), String> {
        let started = Instant::now();
        let z = zygote::exec_zygote().map_err(|e| format!("cannot run the server binary: {e}"))?;
        let sock = Arc::new(z.sock);
        {
            let mut link = lock(&self.link);
            *link = Link {
                gen: link.gen + 1,
                sock: Arc::clone(&sock),
                pid: z.pid,
                born: started,
            };
        }
        // A shutdown that began meanwhile shut down the socket it found,
        // perhaps the dead zygote's: this one must see it too.
        if self.closing.load(Ordering::SeqCst) {
            // SAFETY: shutting down our socket.
            unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if !await_ready(&sock, Some(RESTART_READY_WAIT)) {
            return Err(format!(
                "the new zygote hung up or was not ready within {} s ({}); its message, if \
                 any, is in the log above",
                RESTART_READY_WAIT.as_secs(),
                kill_and_reap(z.pid)
            ));
        }
        self.alive.store(true, Ordering::SeqCst);
        let restarts = self.restarts.fetch_add(1, Ordering::SeqCst) + 1;
        info!(self.log, "fork zygote restarted"; "pid" => z.pid,
            "start_ms" => started.elapsed().as_millis() as u64, "restarts" => restarts);
        self.refill();
        Ok(())
    }

    /// Routes zygote generation `gen`'s records until it hangs up.
    /// Returns at EOF (None) or when the socket fails or carries a malformed
    /// record (why).
    fn route(&self, gen: u64, sock: &OwnedFd) -> Option<String> {
        loop {
            match wire::recv_record(sock.as_raw_fd(), false) {
                Ok(Some((Record::Spawned { token, pid }, fds))) => {
                    let worker = make_worker(pid, gen, fds);
                    if token == WARM {
                        let mut warm = lock(&self.warm);
                        warm.requested = warm.requested.saturating_sub(1);
                        match worker {
                            Ok(w) if !self.closing.load(Ordering::SeqCst) => {
                                warm.ready.push_back(w)
                            }
                            Ok(w) => {
                                self.terminate(w.wid());
                                self.forget(w.wid());
                            }
                            Err(e) => warn!(self.log, "warm worker unusable"; "error" => e),
                        }
                    } else if let Some(tx) = lock(&self.pending).remove(&token) {
                        let _ = tx.send(worker);
                    } else if let Ok(w) = worker {
                        // Its requester gave up waiting.
                        self.terminate(w.wid());
                        self.forget(w.wid());
                    }
                }
                Ok(Some((Record::SpawnFailed { token, errno }, _))) => {
                    let e = std::io::Error::from_raw_os_error(errno);
                    warn!(self.log, "the zygote could not fork a worker"; "error" => %e);
                    if token == WARM {
                        let mut warm = lock(&self.warm);
                        warm.requested = warm.requested.saturating_sub(1);
                    } else if let Some(tx) = lock(&self.pending).remove(&token) {
                        let _ = tx.send(Err(format!("fork failed: {e}")));
                    }
                }
                Ok(Some((Record::Exited { pid, status }, _))) => {
                    let w = Wid { pid, gen };
                    if !lock(&self.abandoned).remove(&w) {
                        lock(&self.exits).insert(w, status);
                        self.exit_cv.notify_all();
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(e) => return Some(e.to_string()),
            }
        }
    }

    /// At shutdown, after the zygote's socket was shut down: waits for the
    /// zygote to end its workers and exit, and kills its process group if it
    /// takes longer than the kill grace and a bit.
    fn reap_at_shutdown(&self, pid: libc::pid_t) {
        let deadline = Instant::now() + self.config.kill_grace + Duration::from_secs(3);
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r != 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(
                    self.log,
                    "the fork zygote did not stop; killing its process group"
                );
                // SAFETY: the zygote leads its own process group (workers included).
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        info!(self.log, "fork zygote stopped"; "pid" => pid);
    }
}

/// Ends zygote `pid` and its workers if they still live, reaps it, and says
/// how it ended. (Unreaped, its pid and process group cannot belong to
/// anyone else yet.)
fn kill_and_reap(pid: libc::pid_t) -> String {
    // SAFETY: signals to our own child and the process group it leads (the
    // second covers a zygote that died before it made its group).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } > 0 {
        describe_status(pid, status, "zygote")
    } else {
        "its status is unknown".to_owned()
    }
}

/// Waits for a new zygote's `Ready` (at most `timeout`); false if it hung
/// up, sent something else or took too long.
fn await_ready(sock: &OwnedFd, timeout: Option<Duration>) -> bool {
    if let Some(t) = timeout {
        let _ = wire::set_recv_timeout(sock, Some(t));
    }
    let ready = matches!(
        wire::recv_record(sock.as_raw_fd(), false),
        Ok(Some((Record::Ready { .. }, _)))
    );
    if timeout.is_some() {
        let _ = wire::set_recv_timeout(sock, None);
    }
    ready
}

fn make_worker(pid: libc::pid_t, gen: u64, fds: Vec<OwnedFd>) -> Result<Worker, String> {
    let [ctl, out, err]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|v: Vec<OwnedFd>| format!("worker {pid} came with {} fds, not 3", v.len()))?;
    for fd in [&out, &err] {
        wire::set_nonblocking(fd, true).map_err(|e| e.to_string())?;
    }
    Ok(Worker {
        pid,
        gen,
        ctl: UnixStream::from(ctl),
        out: [out, err],
        out_ended: [false; 2],
    })
}

/// "worker pid 1234 was killed by signal 11 (SIGSEGV)" and the like.
pub(crate) fn describe_status(pid: libc::pid_t, status: i32, what: &str) -> String {
    if libc::WIFEXITED(status) {
        format!(
            "{what} pid {pid} exited with code {}",
            libc::WEXITSTATUS(status)
        )
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        format!(
            "{what} pid {pid} was killed by signal {sig} ({})",
            signal_name(sig)
        )
    } else {
        format!("{what} pid {pid} ended with wait status {status:#x}")
    }
}

pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => "unnamed signal",
    }
}

/// The fork backend behind the server's [`Backend`] seam.
pub struct ForkBackend {
    core: Arc<Core>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl ForkBackend {
    /// Waits for the zygote forked by [`fork_zygote`] to be ready, then
    /// starts routing its records and pre-forks the warm workers.
    pub fn start(
        zygote: ZygoteProcess,
        config: ForkConfig,
        log: Logger,
    ) -> Result<ForkBackend, String> {
        let started = Instant::now();
        if !await_ready(&zygote.sock, None) {
            let mut status = 0;
            // SAFETY: waitpid on our own child.
            unsafe { libc::waitpid(zygote.pid, &mut status, 0) };
            return Err(format!(
                "the fork backend's zygote failed to start ({}); its message is in the log above",
                describe_status(zygote.pid, status, "zygote")
            ));
        }
        info!(log, "fork zygote ready"; "pid" => zygote.pid,
            "start_ms" => started.elapsed().as_millis() as u64);
        let (stop_tx, stop_rx) = channel::bounded(1);
        let core = Arc::new(Core {
            config,
            log,
            link: Mutex::new(Link {
                gen: 0,
                sock: Arc::new(zygote.sock),
                pid: zygote.pid,
                born: started,
            }),
            alive: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            stop_tx,
            restarts: AtomicU64::new(0),
            next_token: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            warm: Mutex::new(Warm::default()),
            exits: Mutex::new(HashMap::new()),
            exit_cv: Condvar::new(),
            abandoned: Mutex::new(HashSet::new()),
            sessions: Mutex::new(HashMap::new()),
            python_version: crate::engine::python::version(),
        });
        let c = Arc::clone(&core);
        // This thread starts every replacement zygote, whose PR_SET_PDEATHSIG
        // fires when the starting thread ends: it lives until the zygote is reaped.
        let reader = std::thread::Builder::new()
            .name("pyproxy-zygote".into())
            .spawn(move || c.read_records(stop_rx))
            .map_err(|e| format!("cannot start the zygote reader thread: {e}"))?;
        core.refill();
        Ok(ForkBackend {
            core,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Ends the zygote (which ends every worker); the record reader reaps it.
    fn stop_zygote(&self) {
        let core = &self.core;
        core.closing.store(true, Ordering::SeqCst);
        lock(&core.warm).ready.clear();
        {
            let link = lock(&core.link);
            // SAFETY: shutting down our socket; the zygote reads EOF.
            unsafe { libc::shutdown(link.sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
        // Wakes the reader if it waits to restart a dead zygote.
        let _ = core.stop_tx.try_send(());
        if let Some(t) = lock(&self.reader).take() {
            let _ = t.join();
        }
    }
}

impl Backend for ForkBackend {
    fn open_session(
        &self,
        session_id: u64,
        sink: Sink,
        log: Logger,
    ) -> Result<Box<dyn BackendSession>, String> {
        session::open(&self.core, session_id, sink, log)
            .map(|s| Box::new(s) as Box<dyn BackendSession>)
    }

    fn python_version(&self) -> &str {
        &self.core.python_version
    }

    fn implementation(&self) -> &str {
        "cpython"
    }

    fn shutdown(&self, grace: Duration) {
        let core = &self.core;
        core.closing.store(true, Ordering::SeqCst);
        let sessions: Vec<_> = lock(&core.sessions).values().cloned().collect();
        let deadline = Instant::now() + grace;
        while sessions.iter().any(|s| s.busy()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for s in &sessions {
            s.interrupt(session::Interruption::Shutdown);
        }
        let deadline = Instant::now() + core.config.kill_grace + Duration::from_secs(1);
        while sessions.iter().any(|s| s.busy()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for s in &sessions {
            s.close_and_join();
        }
        self.stop_zygote();
    }
}

impl Drop for ForkBackend {
    fn drop(&mut self) {
        if lock(&self.reader).is_some() {
            self.stop_zygote();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_described_for_people() {
        // Wait statuses as the kernel encodes them: exit code in bits 8-15, signal in 0-6.
        assert_eq!(
            describe_status(1234, 11, "worker"),
            "worker pid 1234 was killed by signal 11 (SIGSEGV)"
        );
        assert_eq!(
            describe_status(7, 3 << 8, "worker"),
            "worker pid 7 exited with code 3"
        );
        assert_eq!(signal_name(libc::SIGXCPU), "SIGXCPU");
    }

    #[test]
    fn a_zygote_that_keeps_dying_is_restarted_less_and_less_often() {
        let young = Duration::from_secs(1);
        assert_eq!(restart_delay(None, young), RESTART_FIRST);
        let mut wait = restart_delay(None, young);
        let mut waits = vec![wait];
        for _ in 0..12 {
            wait = restart_delay(Some(wait), young);
            waits.push(wait);
        }
        assert_eq!(waits[1], RESTART_FIRST * 2);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap(), RESTART_MAX);
        // One that served a while is replaced quickly again.
        assert_eq!(
            restart_delay(Some(RESTART_MAX), RESTART_STABLE),
            RESTART_FIRST
        );
    }
}
