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
//!   statuses to the session whose worker died.

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

use crossbeam::channel::{self, Sender};
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

/// A worker process as the server holds it. Dropping it closes the server's
/// ends (the worker reads EOF on its control socket and exits).
pub(crate) struct Worker {
    pub pid: libc::pid_t,
    pub ctl: UnixStream,
    /// Read ends of its stdout and stderr pipes, nonblocking.
    pub out: [OwnedFd; 2],
}

/// Token of a spawn request whose worker goes to the warm slot.
const WARM: u64 = 0;
/// How long a session waits for the zygote to fork a worker.
const SPAWN_WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Warm {
    ready: VecDeque<Worker>,
    requested: usize,
}

/// What sessions and the record reader share.
pub(crate) struct Core {
    config: ForkConfig,
    log: Logger,
    sock: OwnedFd,
    zygote_pid: libc::pid_t,
    /// False once the zygote is gone (died, or shut down).
    alive: AtomicBool,
    /// Set by `shutdown`: no new sessions.
    closing: AtomicBool,
    next_token: AtomicU64,
    pending: Mutex<HashMap<u64, Sender<Result<Worker, String>>>>,
    warm: Mutex<Warm>,
    /// Exit statuses not yet claimed by the session whose worker it was.
    exits: Mutex<HashMap<libc::pid_t, i32>>,
    exit_cv: Condvar,
    /// Pids nobody will ask about (terminated at session close).
    abandoned: Mutex<HashSet<libc::pid_t>>,
    sessions: Mutex<HashMap<u64, Arc<session::Control>>>,
    python_version: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Core {
    fn send(&self, record: Record) -> bool {
        wire::send_record(self.sock.as_raw_fd(), &record, &[]).is_ok()
    }

    fn dead_message(&self) -> String {
        "the fork backend is unavailable: its zygote process has died (see the server log); \
         restart pyproxy-server to use it again"
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

    fn signal(&self, pid: libc::pid_t, signal: i32) {
        self.send(Record::Signal { pid, signal });
    }

    /// SIGTERM now, SIGKILL after the kill grace (done by the zygote).
    fn terminate(&self, pid: libc::pid_t) {
        self.send(Record::Terminate {
            pid,
            grace_ms: self.config.kill_grace.as_millis() as u64,
        });
    }

    /// The wait status of `pid`, once the zygote reaped it; `None` after
    /// `timeout` or if the zygote is gone.
    fn wait_exit(&self, pid: libc::pid_t, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let mut exits = lock(&self.exits);
        loop {
            if let Some(s) = exits.remove(&pid) {
                return Some(s);
            }
            let now = Instant::now();
            if now >= deadline || !self.alive.load(Ordering::SeqCst) {
                lock(&self.abandoned).insert(pid);
                return None;
            }
            exits = self
                .exit_cv
                .wait_timeout(exits, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn forget(&self, pid: libc::pid_t) {
        if lock(&self.exits).remove(&pid).is_none() {
            lock(&self.abandoned).insert(pid);
        }
    }

    /// The `pyproxy-zygote` thread: routes the zygote's records until it hangs up.
    fn read_records(self: Arc<Core>) {
        loop {
            match wire::recv_record(self.sock.as_raw_fd(), false) {
                Ok(Some((Record::Spawned { token, pid }, fds))) => {
                    let worker = make_worker(pid, fds);
                    if token == WARM {
                        let mut warm = lock(&self.warm);
                        warm.requested = warm.requested.saturating_sub(1);
                        match worker {
                            Ok(w) if !self.closing.load(Ordering::SeqCst) => {
                                warm.ready.push_back(w)
                            }
                            Ok(w) => {
                                self.terminate(w.pid);
                                self.forget(w.pid);
                            }
                            Err(e) => warn!(self.log, "warm worker unusable"; "error" => e),
                        }
                    } else if let Some(tx) = lock(&self.pending).remove(&token) {
                        let _ = tx.send(worker);
                    } else if let Ok(w) = worker {
                        // Its requester gave up waiting.
                        self.terminate(w.pid);
                        self.forget(w.pid);
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
                    if !lock(&self.abandoned).remove(&pid) {
                        lock(&self.exits).insert(pid, status);
                        self.exit_cv.notify_all();
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.alive.store(false, Ordering::SeqCst);
        lock(&self.pending).clear();
        lock(&self.warm).ready.clear();
        self.exit_cv.notify_all();
        if !self.closing.load(Ordering::SeqCst) {
            let mut status = 0;
            // SAFETY: waitpid on our own child, the zygote.
            let reaped = unsafe { libc::waitpid(self.zygote_pid, &mut status, 0) } > 0;
            let how = if reaped {
                describe_status(self.zygote_pid, status, "zygote")
            } else {
                "its status is unknown".to_owned()
            };
            error!(self.log, "the fork backend's zygote died; fork sessions fail until the server restarts";
                "zygote" => self.zygote_pid, "how" => how);
        }
    }
}

fn make_worker(pid: libc::pid_t, fds: Vec<OwnedFd>) -> Result<Worker, String> {
    let [ctl, out, err]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|v: Vec<OwnedFd>| format!("worker {pid} came with {} fds, not 3", v.len()))?;
    for fd in [&out, &err] {
        wire::set_nonblocking(fd, true).map_err(|e| e.to_string())?;
    }
    Ok(Worker {
        pid,
        ctl: UnixStream::from(ctl),
        out: [out, err],
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
        let ready = wire::recv_record(zygote.sock.as_raw_fd(), false);
        if !matches!(ready, Ok(Some((Record::Ready { .. }, _)))) {
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
        let core = Arc::new(Core {
            config,
            log,
            sock: zygote.sock,
            zygote_pid: zygote.pid,
            alive: AtomicBool::new(true),
            closing: AtomicBool::new(false),
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
        let reader = std::thread::Builder::new()
            .name("pyproxy-zygote".into())
            .spawn(move || c.read_records())
            .map_err(|e| format!("cannot start the zygote reader thread: {e}"))?;
        core.refill();
        Ok(ForkBackend {
            core,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Ends the zygote (which ends every worker) and reaps it.
    fn stop_zygote(&self) {
        let core = &self.core;
        core.closing.store(true, Ordering::SeqCst);
        lock(&core.warm).ready.clear();
        // SAFETY: shutting down our socket; the zygote reads EOF.
        unsafe { libc::shutdown(core.sock.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = lock(&self.reader).take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + core.config.kill_grace + Duration::from_secs(3);
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child.
            let r = unsafe { libc::waitpid(core.zygote_pid, &mut status, libc::WNOHANG) };
            if r != 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(
                    core.log,
                    "the fork zygote did not stop; killing its process group"
                );
                // SAFETY: the zygote leads its own process group (workers included).
                unsafe {
                    libc::kill(-core.zygote_pid, libc::SIGKILL);
                    libc::waitpid(core.zygote_pid, &mut status, 0);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        info!(core.log, "fork zygote stopped"; "pid" => core.zygote_pid);
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
}
