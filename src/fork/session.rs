//! One fork session: a thread (`pyproxy-fork-<id>`) that owns the session's
//! worker process and runs its atoms one after another.
//!
//! The thread `poll(2)`s four fds: a wake pipe (new atoms, cancel, close), the
//! worker's control socket (a result, or EOF when the worker dies) and, while
//! an atom runs, the worker's stdout and stderr pipes. Because one thread both
//! reads the pipes and the result, attribution is simple: when the result
//! arrives, every byte the atom wrote is already in the pipes (the worker
//! flushed Python's and C's buffers before sending it), so the thread reads
//! both pipes until `EAGAIN`, hands the rest to the sink, and only then calls
//! `finish` with the result.
//!
//! A worker that dies fails its running atom (origin `WorkerDied`, naming the
//! exit code or signal the zygote reported) and is replaced by a fresh one for
//! the next atom. Cancel and timeout send SIGINT (KeyboardInterrupt in the
//! atom), then SIGKILL after the kill grace.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use slog::{debug, info, warn, Logger};

use crate::engine::output::{rest_after, Splitter};
use crate::engine::{AtomRequest, Sink};
use crate::protocol::{AtomResult, Buffer, FailureOrigin, Outcome, RemoteException};
use crate::server::BackendSession;

use super::wire::{self, WorkerOutcome};
use super::{describe_status, lock, Core, Wid, Worker};

pub(crate) use crate::engine::Interruption;

#[derive(Default)]
struct CtlState {
    queue: VecDeque<AtomRequest>,
    /// Queued atoms cancelled before they started; answered in their turn.
    cancelled: HashSet<u64>,
    running: Option<u64>,
    /// An interrupt asked for the running atom, not yet acted on.
    interrupt: Option<Interruption>,
    closed: bool,
}

/// What the session handle, shutdown and the session thread share.
pub(crate) struct Control {
    state: Mutex<CtlState>,
    wake_r: OwnedFd,
    wake_w: OwnedFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Control {
    fn new() -> io::Result<Control> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two fds on success; we own them.
        let (wake_r, wake_w) = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
                return Err(io::Error::last_os_error());
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        Ok(Control {
            state: Mutex::new(CtlState::default()),
            wake_r,
            wake_w,
            thread: Mutex::new(None),
        })
    }

    fn wake(&self) {
        // SAFETY: one byte into our nonblocking pipe; full means already woken.
        unsafe { libc::write(self.wake_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    pub(crate) fn busy(&self) -> bool {
        let st = lock(&self.state);
        !st.closed && (st.running.is_some() || !st.queue.is_empty())
    }

    /// Interrupts the running atom (queued ones stay queued).
    pub(crate) fn interrupt(&self, reason: Interruption) {
        let mut st = lock(&self.state);
        if st.running.is_some() {
            st.interrupt.get_or_insert(reason);
            drop(st);
            self.wake();
        }
    }

    pub(crate) fn close_and_join(&self) {
        lock(&self.state).closed = true;
        self.wake();
        let t = lock(&self.thread).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// The network layer's handle on a fork session.
pub(crate) struct ForkSession {
    id: u64,
    core: Arc<Core>,
    ctl: Arc<Control>,
}

impl BackendSession for ForkSession {
    fn submit(&self, atom: AtomRequest) {
        let mut st = lock(&self.ctl.state);
        if !st.closed {
            st.queue.push_back(atom);
            drop(st);
            self.ctl.wake();
        }
    }

    fn cancel(&self, atom_id: u64) -> bool {
        let mut st = lock(&self.ctl.state);
        if st.running == Some(atom_id) {
            st.interrupt.get_or_insert(Interruption::Cancelled);
        } else if st.queue.iter().any(|a| a.id == atom_id) {
            st.cancelled.insert(atom_id);
        } else {
            return false;
        }
        drop(st);
        self.ctl.wake();
        true
    }

    fn close(&self) {
        self.ctl.close_and_join();
        lock(&self.core.sessions).remove(&self.id);
    }
}

/// Opens a session: its sandbox directory and its thread, which readies a
/// (warm) worker in it while WELCOME travels and the client sends its first
/// atom, rather than before WELCOME. A worker that cannot be had fails the
/// session's first atom (a dead zygote still refuses the session here).
pub(crate) fn open(
    core: &Arc<Core>,
    session_id: u64,
    sink: Sink,
    log: Logger,
) -> Result<ForkSession, String> {
    if core.closing.load(std::sync::atomic::Ordering::SeqCst) {
        return Err("the server is shutting down".into());
    }
    if !core.alive.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(core.dead_message());
    }
    let ctl = Arc::new(Control::new().map_err(|e| e.to_string())?);
    let sandbox = match &core.config.sandbox_dir {
        Some(dir) => Some(make_sandbox(core, dir, session_id)?),
        None => None,
    };
    let runner = Runner {
        core: Arc::clone(core),
        ctl: Arc::clone(&ctl),
        sink,
        log,
        worker: None,
        sandbox,
        split: [
            Splitter::new(core.config.max_line),
            Splitter::new(core.config.max_line),
        ],
        buf: vec![0u8; READ_CHUNK],
        pipes_rest_until: None,
    };
    let sandbox = runner.sandbox.clone();
    let thread = std::thread::Builder::new()
        .name(format!("pyproxy-fork-{session_id}"))
        .spawn(move || runner.run())
        .map_err(|e| {
            if let Some(dir) = &sandbox {
                let _ = std::fs::remove_dir_all(dir);
            }
            format!("cannot start the session thread: {e}")
        })?;
    *lock(&ctl.thread) = Some(thread);
    lock(&core.sessions).insert(session_id, Arc::clone(&ctl));
    Ok(ForkSession {
        id: session_id,
        core: Arc::clone(core),
        ctl,
    })
}

fn make_sandbox(core: &Core, dir: &Path, session_id: u64) -> Result<PathBuf, String> {
    let mut nonce = [0u8; 4];
    let _ = getrandom::getrandom(&mut nonce);
    let path = dir.join(format!(
        "session-{session_id}-{:08x}",
        u32::from_be_bytes(nonce)
    ));
    let fail = |e: io::Error| format!("cannot create the sandbox {}: {e}", path.display());
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(fail)?;
    }
    if let Some(user) = &core.config.user {
        let c = super::zygote::c_path(&path).map_err(fail)?;
        // SAFETY: chown on a path we just created.
        if unsafe { libc::chown(c.as_ptr(), user.uid, user.gid) } != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(fail(e));
        }
    }
    Ok(path)
}

/// A worker that has entered `cwd` and answered. A warm worker that died
/// while it waited is replaced once by a fresh one.
fn ready_worker(core: &Core, cwd: Option<&Path>) -> Result<Worker, String> {
    let mut last = String::new();
    for attempt in 0..2 {
        let mut w = if attempt == 0 {
            core.take()?
        } else {
            core.spawn()?
        };
        match init_worker(&mut w, cwd) {
            Ok(()) => return Ok(w),
            Err(e) => {
                core.terminate(w.wid());
                core.forget(w.wid());
                last = e;
            }
        }
    }
    Err(format!("the worker did not start: {last}"))
}

fn init_worker(w: &mut Worker, cwd: Option<&Path>) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let body = cwd
        .map(|p| p.as_os_str().as_bytes().to_vec())
        .unwrap_or_default();
    let io_err = |e: io::Error| format!("worker pid {}: {e}", w.pid);
    wire::write_message(&mut w.ctl, wire::TAG_INIT, &body).map_err(io_err)?;
    w.ctl
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err)?;
    let reply = wire::read_message(&mut w.ctl).map_err(io_err)?;
    w.ctl.set_read_timeout(None).map_err(io_err)?;
    match reply {
        Some((wire::TAG_READY, text)) if text.is_empty() => Ok(()),
        Some((wire::TAG_READY, text)) => Err(String::from_utf8_lossy(&text).into_owned()),
        Some((tag, _)) => Err(format!("worker pid {} answered with tag {tag}", w.pid)),
        None => Err(format!("worker pid {} hung up", w.pid)),
    }
}

struct Running {
    id: u64,
    started: Instant,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    interrupted: Option<Interruption>,
    kill_at: Option<Instant>,
}

struct Runner {
    core: Arc<Core>,
    ctl: Arc<Control>,
    sink: Sink,
    log: Logger,
    /// `None` after a worker died, until the next atom needs one.
    worker: Option<Worker>,
    sandbox: Option<PathBuf>,
    split: [Splitter; 2],
    /// `read_pipe`'s buffer, kept rather than zeroed per read.
    buf: Vec<u8>,
    /// Until then the output pipes are left out of `poll`, to fill (see
    /// `engine::output::rest_after`); the result and the wake pipe are still
    /// polled.
    pipes_rest_until: Option<Instant>,
}

/// How much is read from a pipe per wake-up while an atom runs.
const READ_CHUNK: usize = 64 * 1024;

impl Runner {
    fn run(mut self) {
        match ready_worker(&self.core, self.sandbox.as_deref()) {
            Ok(w) => {
                info!(self.log, "fork worker attached"; "pid" => w.pid,
                    "sandbox" => self.sandbox.as_ref().map(|p| p.display().to_string()));
                self.worker = Some(w);
            }
            Err(e) => warn!(self.log, "no worker for the new session; its first atom tries again";
                "error" => &e),
        }
        let mut cur: Option<Running> = None;
        loop {
            let mut next = None;
            let mut skipped = Vec::new();
            let mut interrupt = None;
            {
                let mut st = lock(&self.ctl.state);
                if st.closed {
                    break;
                }
                if cur.is_none() {
                    st.running = None;
                    st.interrupt = None;
                    while let Some(a) = st.queue.pop_front() {
                        if st.cancelled.remove(&a.id) {
                            skipped.push(a.id);
                            continue;
                        }
                        st.running = Some(a.id);
                        next = Some(a);
                        break;
                    }
                } else {
                    interrupt = st.interrupt.take();
                }
            }
            for id in skipped {
                self.sink.finish(
                    id,
                    failure(
                        FailureOrigin::Cancelled,
                        "builtins.KeyboardInterrupt",
                        format!("atom {id} was cancelled"),
                        0,
                    ),
                );
            }
            if let (Some(reason), Some(r)) = (interrupt, cur.as_mut()) {
                self.interrupt(r, reason);
            }
            if let Some(atom) = next {
                cur = self.start(atom);
                continue;
            }
            self.wait(&mut cur);
        }
        self.close_down();
    }

    fn start(&mut self, atom: AtomRequest) -> Option<Running> {
        let now = Instant::now();
        let timeout = atom.timeout.or(self.core.config.default_timeout);
        debug!(self.log, "atom start"; "atom" => atom.id);
        if self.worker.is_none() {
            match ready_worker(&self.core, self.sandbox.as_deref()) {
                Ok(w) => {
                    info!(self.log, "fresh fork worker"; "pid" => w.pid);
                    self.worker = Some(w);
                }
                Err(e) => {
                    warn!(self.log, "no worker for the atom"; "atom" => atom.id, "error" => &e);
                    self.sink.finish(
                        atom.id,
                        failure(FailureOrigin::ServerError, "builtins.RuntimeError", e, 0),
                    );
                    return None;
                }
            }
        }
        let r = Running {
            id: atom.id,
            started: now,
            deadline: timeout.map(|t| now + t),
            timeout,
            interrupted: None,
            kill_at: None,
        };
        let w = self.worker.as_mut().expect("set above");
        if wire::write_atom(&mut w.ctl, &atom).is_err() {
            self.worker_died(r);
            return None;
        }
        Some(r)
    }

    fn interrupt(&mut self, r: &mut Running, reason: Interruption) {
        if r.interrupted.is_some() {
            return;
        }
        if let Some(w) = &self.worker {
            info!(self.log, "interrupting atom"; "atom" => r.id, "reason" => format!("{reason:?}"));
            self.core.signal(w.wid(), libc::SIGINT);
            r.interrupted = Some(reason);
            r.kill_at = Some(Instant::now() + self.core.config.kill_grace);
        }
    }

    /// One `poll` round: wake-ups, output, the result or the worker's death, timers.
    fn wait(&mut self, cur: &mut Option<Running>) {
        let mut fds = vec![libc::pollfd {
            fd: self.ctl.wake_r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let now = Instant::now();
        let rest = self.pipes_rest_until.filter(|&t| t > now);
        if let Some(w) = &self.worker {
            fds.push(libc::pollfd {
                fd: w.ctl.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            if cur.is_some() && rest.is_none() {
                for (fd, ended) in w.out.iter().zip(w.out_ended) {
                    fds.push(libc::pollfd {
                        // poll skips a negative fd (and leaves its revents 0).
                        fd: if ended { -1 } else { fd.as_raw_fd() },
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
        }
        let timer = cur.as_ref().and_then(|r| {
            match (
                r.interrupted.is_none().then_some(r.deadline).flatten(),
                r.kill_at,
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        });
        let mut timeout_ms = timer.map_or(-1, |t| {
            t.saturating_duration_since(now).as_millis().min(3_600_000) as i32 + 1
        });
        if let Some(t) = rest {
            let left = t.saturating_duration_since(now).as_millis() as i32 + 1;
            timeout_ms = if timeout_ms < 0 {
                left
            } else {
                timeout_ms.min(left)
            };
        }
        // SAFETY: fds is a live array of pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            return; // EINTR: the caller loops
        }
        if fds[0].revents != 0 {
            let mut buf = [0u8; 64];
            // SAFETY: reading our own nonblocking pipe.
            while unsafe { libc::read(self.ctl.wake_r.as_raw_fd(), buf.as_mut_ptr().cast(), 64) }
                > 0
            {}
        }
        if let Some(r) = cur.as_ref() {
            let id = r.id;
            let mut got = 0;
            for i in 0..2 {
                if fds.get(2 + i).is_some_and(|f| f.revents != 0) {
                    got += self.read_pipe(i, Some(READ_CHUNK), id);
                }
            }
            if let Some(rest) = rest_after(got) {
                self.pipes_rest_until = Some(Instant::now() + rest);
            }
        }
        if fds.get(1).is_some_and(|f| f.revents != 0) {
            match cur.take() {
                Some(r) => self.on_control(r),
                None => self.idle_death(),
            }
        }
        if let Some(r) = cur.as_mut() {
            let now = Instant::now();
            if r.interrupted.is_none() && r.deadline.is_some_and(|d| now >= d) {
                let t = r.timeout.unwrap_or_default();
                self.interrupt(r, Interruption::Timeout(t));
            } else if r.kill_at.is_some_and(|k| now >= k) {
                if let Some(w) = &self.worker {
                    warn!(self.log, "atom did not stop after SIGINT; killing its worker";
                        "atom" => r.id, "pid" => w.pid);
                    self.core.signal(w.wid(), libc::SIGKILL);
                }
                r.kill_at = None;
            }
        }
    }

    /// The control socket is readable while an atom runs: its result, or EOF.
    fn on_control(&mut self, r: Running) {
        let w = self.worker.as_mut().expect("a running atom has a worker");
        match wire::read_message(&mut w.ctl) {
            Ok(Some((wire::TAG_RESULT, body))) => match wire::decode_result(&body) {
                Some(WorkerOutcome::Value {
                    pickled,
                    buffer_lengths,
                }) => match wire::read_buffers(&mut w.ctl, &buffer_lengths) {
                    Ok(buffers) => self.finish(
                        r,
                        WorkerOutcome::Value {
                            pickled,
                            buffer_lengths,
                        },
                        buffers,
                    ),
                    Err(_) => self.worker_died(r),
                },
                Some(outcome) => self.finish(r, outcome, Vec::new()),
                None => {
                    let why = format!("a malformed result for atom {}", r.id);
                    self.worker_misbehaved(r, why);
                }
            },
            Ok(Some((tag, _))) => {
                self.worker_misbehaved(r, format!("an unexpected message (tag {tag})"))
            }
            Ok(None) | Err(_) => self.worker_died(r),
        }
    }

    /// `buffers`: the value's out-of-band buffers, read after its message.
    fn finish(&mut self, r: Running, outcome: WorkerOutcome, buffers: Vec<Buffer>) {
        let duration_us = micros(r.started);
        let outcome = match (outcome, r.interrupted) {
            (WorkerOutcome::Value { pickled, .. }, _) => Outcome::Value { pickled, buffers },
            (WorkerOutcome::Raised { traceback, .. }, Some(reason)) => {
                interrupted(r.id, reason, traceback, None)
            }
            (
                WorkerOutcome::Raised {
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
        };
        self.end_atom(
            &r,
            AtomResult {
                duration_us,
                ends_output: false,
                outcome,
            },
        );
    }

    /// Drains both pipes, then finishes the atom with its result.
    fn end_atom(&mut self, r: &Running, result: AtomResult) {
        for i in 0..2 {
            self.read_pipe(i, None, r.id);
            self.split[i].finish();
        }
        self.deliver(r.id);
        let label = result.outcome.label();
        debug!(self.log, "atom end"; "atom" => r.id, "duration_us" => result.duration_us, "outcome" => label);
        self.sink.finish(r.id, result);
    }

    /// The worker broke the control protocol: end it and fail the atom; the
    /// session's next atom gets a fresh worker.
    fn worker_misbehaved(&mut self, r: Running, what: String) {
        let wid = self
            .worker
            .as_ref()
            .expect("a running atom has a worker")
            .wid();
        let pid = wid.pid;
        self.core.terminate(wid);
        self.core.forget(wid);
        self.worker = None;
        self.end_atom(
            &r,
            failure(
                FailureOrigin::ServerError,
                "builtins.RuntimeError",
                format!("worker pid {pid} sent {what}"),
                micros(r.started),
            ),
        );
    }

    fn worker_died(&mut self, r: Running) {
        let Some(wid) = self.worker.as_ref().map(Worker::wid) else {
            return;
        };
        // Read what it wrote before it died, while its pipes are still ours.
        for i in 0..2 {
            self.read_pipe(i, None, r.id);
        }
        self.worker = None;
        let how = self.how_it_ended(wid);
        warn!(self.log, "fork worker died"; "atom" => r.id, "how" => &how);
        let result = match r.interrupted {
            Some(reason) => AtomResult {
                duration_us: micros(r.started),
                ends_output: false,
                outcome: interrupted(r.id, reason, String::new(), Some(&how)),
            },
            None => failure(
                FailureOrigin::WorkerDied,
                "pyproxy.WorkerDied",
                how,
                micros(r.started),
            ),
        };
        self.end_atom(&r, result);
    }

    /// The control socket became readable with no atom running: the worker died.
    fn idle_death(&mut self) {
        if let Some(w) = self.worker.take() {
            let how = self.how_it_ended(w.wid());
            warn!(self.log, "idle fork worker ended; the next atom gets a fresh one"; "how" => how);
        }
    }

    /// "worker pid 1234 was killed by signal 9 (SIGKILL)" and the like.
    fn how_it_ended(&self, w: Wid) -> String {
        match self.core.wait_exit(w, Duration::from_secs(2)) {
            Some(status) => {
                let how = describe_status(w.pid, status, "worker");
                match self.core.config.limits.cpu_seconds {
                    Some(cpu)
                        if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGXCPU =>
                    {
                        format!("{how}: it used the {cpu} s of CPU time --worker-cpu allows")
                    }
                    _ => how,
                }
            }
            None if self.core.lost_with_zygote(w) => format!(
                "worker pid {} ended with the fork backend's zygote, which died (see the server log)",
                w.pid
            ),
            None => format!("worker pid {} hung up (its exit status is unknown)", w.pid),
        }
    }

    /// Reads pipe `i` and hands whole lines to the sink as `atom`'s output:
    /// up to `limit` bytes, or until the pipe is empty (`EAGAIN`) or at EOF
    /// when `limit` is `None`. Returns how many bytes it read.
    fn read_pipe(&mut self, i: usize, limit: Option<usize>, atom: u64) -> usize {
        let Some(w) = &self.worker else { return 0 };
        let fd = w.out[i].as_raw_fd();
        let mut total = 0;
        loop {
            // SAFETY: reading into our buffer from our nonblocking pipe.
            let n = unsafe { libc::read(fd, self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if n == 0 {
                if let Some(w) = &mut self.worker {
                    w.out_ended[i] = true;
                }
                return total;
            }
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return total;
            }
            self.split[i].feed(&self.buf[..n as usize]);
            self.deliver_fd(atom, i);
            total += n as usize;
            if limit.is_some_and(|l| total >= l) {
                return total;
            }
        }
    }

    fn deliver(&mut self, atom: u64) {
        for i in 0..2 {
            self.deliver_fd(atom, i);
        }
    }

    fn deliver_fd(&mut self, atom: u64, i: usize) {
        for batch in self.split[i].take() {
            self.sink.output(atom, (i + 1) as u8, batch);
        }
    }

    fn close_down(mut self) {
        if let Some(w) = self.worker.take() {
            let wid = w.wid();
            self.core.terminate(wid);
            drop(w);
            if self.sandbox.is_some() {
                // Nothing may still write into the sandbox when it is removed.
                let wait = self.core.config.kill_grace + Duration::from_secs(1);
                if self.core.wait_exit(wid, wait).is_none() && !self.core.lost_with_zygote(wid) {
                    warn!(self.log, "fork worker did not end in time"; "pid" => wid.pid);
                }
            } else {
                self.core.forget(wid);
            }
        }
        if let Some(dir) = self.sandbox.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                warn!(self.log, "cannot remove the sandbox"; "dir" => %dir.display(), "error" => %e);
            }
        }
        info!(self.log, "fork session closed");
    }
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

fn failure(
    origin: FailureOrigin,
    type_name: &str,
    message: String,
    duration_us: u64,
) -> AtomResult {
    AtomResult::failure(origin, type_name, message, duration_us)
}

/// The outcome of an atom the server interrupted, as the engine reports it.
fn interrupted(
    atom: u64,
    reason: Interruption,
    traceback: String,
    killed: Option<&str>,
) -> Outcome {
    let (origin, type_name, mut message) = reason.failure(atom);
    if let Some(how) = killed {
        message = format!("{message}; it did not stop at SIGINT and its {how}");
    }
    Outcome::Exception(RemoteException {
        origin,
        type_name: type_name.to_owned(),
        message,
        traceback,
        pickled: None,
    })
}
