//! The zygote: a process forked from `pyproxy-server` at start-up, before the
//! server has any thread, that initialises its own CPython once (venv honoured,
//! cloudpickle and the `--preload` modules imported) and then forks a worker
//! process per request, so a worker starts in about a millisecond with
//! everything already imported.
//!
//! Forking is only safe from a single-threaded process, which is why the
//! zygote exists at all: the server is multi-threaded, the zygote never starts
//! a thread. Its loop `poll(2)`s two fds — the `SOCK_SEQPACKET` socket to the
//! server (records of [`super::wire`]) and a self-pipe its SIGCHLD handler
//! writes to — reaps every child and reports each exit. Signals to workers go
//! through it (`Record::Signal`), because only the process that reaps a pid
//! knows it has not been reused.
//!
//! Lifetimes: the zygote dies with the server (`PR_SET_PDEATHSIG`), a worker
//! dies with the zygote (the same), so no process outlives a crashed server.
//! A zygote that dies is replaced by this same binary run again
//! ([`exec_zygote`], [`run_if_exec_zygote`]): only `exec` makes a new process
//! safely from the multi-threaded server.
//! When the server closes its socket (shutdown) the zygote SIGTERMs every
//! worker, SIGKILLs what is left after the kill grace, reaps them all and
//! exits 0.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pyo3::ffi;

use crate::engine::python::{self, PyRef};

use super::wire::{self, Record};
use super::ForkConfig;

const HELPER_SOURCE: &str = include_str!("../engine/helper.py");
const WORKER_SOURCE: &str = include_str!("worker.py");
/// The worker's control socket is moved to this fd (worker.py's `serve(3)`).
const CTL_FD: RawFd = 3;

/// The server's handle on the zygote it forked.
pub struct ZygoteProcess {
    pub pid: libc::pid_t,
    /// The server's end of the record socket.
    pub sock: OwnedFd,
}

/// Forks the zygote. Call before any thread exists (the first thing `main`
/// does after reading the command line); the child never returns.
pub fn fork_zygote(config: &ForkConfig) -> io::Result<ZygoteProcess> {
    LAUNCH.get_or_init(Launch::now);
    let (server_end, zygote_end) = socketpair(libc::SOCK_SEQPACKET)?;
    // SAFETY: the caller guarantees this process has one thread.
    let server_pid = unsafe { libc::getpid() };
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        drop(server_end);
        let code = zygote_main(zygote_end, config, server_pid);
        // SAFETY: leave without running Rust or Python destructors of the
        // server's state we inherited.
        unsafe { libc::_exit(code) }
    }
    drop(zygote_end);
    Ok(ZygoteProcess {
        pid,
        sock: server_end,
    })
}

/// Set in the environment of a zygote [`exec_zygote`] started: the fd of its
/// end of the record socket, and the pid of the server that started it.
const EXEC_FD_ENV: &str = "PYPROXY_ZYGOTE_FD";
const EXEC_PARENT_ENV: &str = "PYPROXY_ZYGOTE_PARENT";

/// Where and with what environment the server started. A replacement zygote
/// parses the server's command line again, so it must see the same relative
/// paths resolve as they did then, although the engine has since moved into
/// `--workdir` and atoms may have changed the directory and the environment.
struct Launch {
    dir: PathBuf,
    env: Vec<(OsString, OsString)>,
}

impl Launch {
    fn now() -> Launch {
        Launch {
            dir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            env: std::env::vars_os().collect(),
        }
    }
}

static LAUNCH: OnceLock<Launch> = OnceLock::new();

/// Starts a new zygote from the running server, to replace one that died.
/// Forking a multi-threaded process is only safe if the child calls `exec` at
/// once, so this runs this same binary again (`/proc/self/exe`, the file the
/// server started from even if it was replaced since) with the server's own
/// arguments; [`run_if_exec_zygote`], early in its `main`, makes it the zygote.
/// The zygote's `PR_SET_PDEATHSIG` fires when the *thread* that started it
/// ends, so the calling thread must outlive it.
pub fn exec_zygote() -> io::Result<ZygoteProcess> {
    use std::os::unix::process::CommandExt;
    let (server_end, zygote_end) = socketpair(libc::SOCK_SEQPACKET)?;
    let fd = zygote_end.as_raw_fd();
    let launch = LAUNCH.get_or_init(Launch::now);
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    // Named as the server was (ps, and clap's messages), not /proc/self/exe.
    if let Some(name) = args.next() {
        cmd.arg0(name);
    }
    cmd.args(args)
        .current_dir(&launch.dir)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env(EXEC_FD_ENV, CTL_FD.to_string())
        .env(EXEC_PARENT_ENV, std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: between fork and exec the closure only calls dup2 and fcntl,
    // which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // The socket is close-on-exec: dup2 makes an inheritable copy at
            // CTL_FD, unless it is already there, when the flag is cleared.
            let r = if fd == CTL_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, CTL_FD)
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(zygote_end);
    Ok(ZygoteProcess {
        pid: child.id() as libc::pid_t,
        sock: server_end,
    })
}

/// In a process [`exec_zygote`] started, runs the zygote and exits; anywhere
/// else returns at once. Call first thing in `main`, while the process has
/// one thread.
pub fn run_if_exec_zygote(config: &ForkConfig) {
    let Some(fd) = std::env::var_os(EXEC_FD_ENV) else {
        return;
    };
    let parent = std::env::var(EXEC_PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<libc::pid_t>().ok());
    // Not for the workers to see. (One thread: changing the environment is safe.)
    std::env::remove_var(EXEC_FD_ENV);
    std::env::remove_var(EXEC_PARENT_ENV);
    let fd = fd.to_str().and_then(|f| f.parse::<RawFd>().ok());
    // SAFETY: getppid has no preconditions.
    let (Some(fd), Some(parent)) = (fd, parent.filter(|&p| p == unsafe { libc::getppid() })) else {
        say(&format!(
            "{EXEC_FD_ENV} is set, but this process was not started by pyproxy-server as its \
             zygote; unset it to run the server"
        ));
        std::process::exit(2);
    };
    // SAFETY: the fd `exec_zygote` gave this process; nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: setting close-on-exec on our own fd.
    unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    // What the server held without close-on-exec (an atom's os.dup2, a C
    // extension's open) is not the zygote's, and would live as long as it.
    if let Err(e) = close_fds_above(CTL_FD) {
        say(&format!("closing the fds inherited from the server: {e}"));
        std::process::exit(1);
    }
    let code = zygote_main(sock, config, parent);
    // SAFETY: leave at once, as the forked zygote does.
    unsafe { libc::_exit(code) }
}

/// Closes every fd above `last`, so a worker holds none of the zygote's (its
/// record socket, other workers' ends). `close_range` needs Linux 5.9 and may
/// be refused by a container's seccomp profile; then each open fd listed in
/// `/proc/self/fd` is closed. Runs where the process has one thread (a worker
/// just forked from the zygote, a re-run zygote at start), so allocating is safe.
fn close_fds_above(last: RawFd) -> io::Result<()> {
    // SAFETY: closing fds this process owns and no Rust object refers to.
    if unsafe { libc::close_range(last as u32 + 1, u32::MAX, 0) } == 0 {
        return Ok(());
    }
    close_listed_fds_above(last)
}

fn close_listed_fds_above(last: RawFd) -> io::Result<()> {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > last)
        .collect();
    for fd in open {
        // SAFETY: as above; the directory's own fd, already closed, gives EBADF.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn socketpair(kind: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut sv = [0 as RawFd; 2];
    // SAFETY: socketpair fills two fds on success; we own them.
    unsafe {
        if libc::socketpair(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])))
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two fds on success; we own them.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// Write end of the SIGCHLD self-pipe, for the signal handler.
static SIGCHLD_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigchld(_: libc::c_int) {
    let fd = SIGCHLD_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe already says "wake".
        unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
}

fn say(text: &str) {
    // The zygote's stderr is the server's: its log.
    eprintln!("pyproxy-server: fork zygote: {text}");
}

/// The zygote's whole life. Returns its exit code.
fn zygote_main(sock: OwnedFd, config: &ForkConfig, server_pid: libc::pid_t) -> i32 {
    // SAFETY: plain process set-up calls in a single-threaded child.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != server_pid {
            return 1;
        }
        // Its own process group: a Ctrl-C in the server's terminal is the
        // server's to handle, not something that kills workers mid-atom.
        libc::setpgid(0, 0);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            // stdout carries the server's one "listening" line; nothing else.
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
    forget_token();
    if let Some(dir) = &config.workdir {
        if let Err(e) = std::env::set_current_dir(dir) {
            say(&format!("cannot enter --workdir {}: {e}", dir.display()));
            return 1;
        }
    }
    let (chld_r, chld_w) = match pipe() {
        Ok(p) => p,
        Err(e) => {
            say(&format!("pipe: {e}"));
            return 1;
        }
    };
    let _ = wire::set_nonblocking(&chld_r, true);
    let _ = wire::set_nonblocking(&chld_w, true);
    SIGCHLD_PIPE.store(chld_w.as_raw_fd(), Ordering::Relaxed);
    // SAFETY: installing a handler that only calls write(2).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigchld as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
    }
    let serve = match init_python(config) {
        Ok(f) => f,
        Err(e) => {
            say(&format!("cannot start Python: {e}"));
            return 1;
        }
    };
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    if wire::send_record(sock.as_raw_fd(), &Record::Ready { pid: me }, &[]).is_err() {
        return 1;
    }
    let mut z = Zygote {
        sock,
        chld_r,
        serve,
        config,
        live: HashMap::new(),
        me,
        warm_due: Vec::new(),
    };
    z.run()
}

/// Removes the server's token from the environment workers inherit: one under
/// `--user` has less privilege than the server, and with the token it could
/// open a session in the server's own process. The value is also overwritten
/// where it lies, because `/proc/self/environ` shows the environment block the
/// process started with, which `unsetenv` does not change.
fn forget_token() {
    // SAFETY: the zygote has one thread, so nothing reads the environment
    // meanwhile; `getenv` points into that block, which is ours to write.
    unsafe {
        let value = libc::getenv(c"PYPROXY_TOKEN".as_ptr());
        if !value.is_null() {
            std::ptr::write_bytes(value, 0, libc::strlen(value));
        }
    }
    std::env::remove_var("PYPROXY_TOKEN");
}

/// Initialises CPython with the GIL held for good (the zygote is one thread),
/// loads the helper and the worker module, runs `prepare`. Returns `serve`.
fn init_python(config: &ForkConfig) -> Result<PyRef, String> {
    python::initialize(config.python_env.as_deref())
        .map(|tstate| {
            // SAFETY: the thread state initialize() saved on this very thread.
            unsafe { ffi::PyEval_RestoreThread(tstate as *mut ffi::PyThreadState) };
        })
        .map_err(|e| e.to_string())?;
    // SAFETY: the GIL is held from here on.
    unsafe {
        python::exec_module("_pyproxy_engine", "<pyproxy-engine>", HELPER_SOURCE, true)?;
        let worker = python::exec_module(
            "_pyproxy_fork_worker",
            "<pyproxy-fork-worker>",
            WORKER_SOURCE,
            true,
        )?;
        let prepare = attr(&worker, "prepare")?;
        let list = PyRef::new(ffi::PyList_New(0)).ok_or_else(|| python::take_error())?;
        for m in &config.preload {
            let c = CString::new(m.as_str()).map_err(|_| "module name has NUL".to_owned())?;
            let s = PyRef::new(ffi::PyUnicode_FromString(c.as_ptr()))
                .ok_or_else(|| python::take_error())?;
            ffi::PyList_Append(list.as_ptr(), s.as_ptr());
        }
        python::call(prepare.as_ptr(), vec![list])
            .ok_or_else(|| format!("preparing workers failed: {}", python::take_error()))?;
        // Out-of-band buffers are read natively, straight into their `bytes`.
        let read = python::read_bytes_function().ok_or_else(|| python::take_error())?;
        ffi::PyObject_SetAttrString(worker.as_ptr(), c"_read_bytes".as_ptr(), read.as_ptr());
        attr(&worker, "serve")
    }
}

unsafe fn attr(module: &PyRef, name: &str) -> Result<PyRef, String> {
    let c = CString::new(name).expect("no NUL");
    // SAFETY: GIL held (caller).
    unsafe {
        PyRef::new(ffi::PyObject_GetAttrString(module.as_ptr(), c.as_ptr()))
            .ok_or_else(|| python::take_error())
    }
}

struct Zygote<'a> {
    sock: OwnedFd,
    chld_r: OwnedFd,
    /// `_pyproxy_fork_worker.serve`, called in every worker.
    serve: PyRef,
    config: &'a ForkConfig,
    /// Live children and, once terminated, when to SIGKILL them.
    live: HashMap<libc::pid_t, Option<Instant>>,
    me: libc::pid_t,
    /// When each requested warm worker is to be forked (`WARM_SPAWN_DELAY`).
    warm_due: Vec<Instant>,
}

/// A warm worker is asked for when a session takes the last one, as that
/// session opens; it is forked this much later. Forking at once put the fork
/// and the new worker's warm-up on the two cores while the session that took
/// the worker was being answered and ran its first atom (W5 fork, scratch
/// loop: open 1.35–1.51 → 0.87–0.93 ms, first atom 0.68–0.80 → 0.50–0.55).
/// Workers a session waits for are forked at once.
const WARM_SPAWN_DELAY: Duration = Duration::from_millis(2);

impl Zygote<'_> {
    fn run(&mut self) -> i32 {
        loop {
            let now = Instant::now();
            let next_kill = self.live.values().flatten().min().copied();
            let next_timer = match (next_kill, self.warm_due.iter().min()) {
                (Some(a), Some(&b)) => Some(a.min(b)),
                (a, b) => a.or(b.copied()),
            };
            let timeout = next_timer.map_or(-1, |t| {
                t.saturating_duration_since(now).as_millis().min(60_000) as i32 + 1
            });
            let mut fds = [
                libc::pollfd {
                    fd: self.sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.chld_r.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a live array of two pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                say(&format!("poll: {}", io::Error::last_os_error()));
                return self.finish(1);
            }
            if fds[1].revents != 0 {
                let mut buf = [0u8; 64];
                // SAFETY: reading our own nonblocking pipe.
                while unsafe { libc::read(self.chld_r.as_raw_fd(), buf.as_mut_ptr().cast(), 64) }
                    > 0
                {}
            }
            // Reap on every wake-up: cheap, and no SIGCHLD can be missed.
            if !self.reap() {
                return self.finish(1);
            }
            let now = Instant::now();
            let due: Vec<_> = self
                .live
                .iter()
                .filter(|(_, t)| t.is_some_and(|t| t <= now))
                .map(|(p, _)| *p)
                .collect();
            for pid in due {
                kill_worker(pid, libc::SIGKILL);
                self.live.insert(pid, None);
            }
            let due_warm = self.warm_due.len();
            self.warm_due.retain(|&t| t > now);
            for _ in self.warm_due.len()..due_warm {
                if !self.spawn_for(super::WARM) {
                    return self.finish(1);
                }
            }
            if fds[0].revents != 0 {
                loop {
                    match wire::recv_record(self.sock.as_raw_fd(), true) {
                        Ok(Some((record, _))) => {
                            if !self.handle(record) {
                                return self.finish(1);
                            }
                        }
                        Ok(None) => return self.finish(0),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            say(&format!("reading the server's socket: {e}"));
                            return self.finish(1);
                        }
                    }
                }
            }
        }
    }

    /// Reaps every exited child and reports it. False if the server is gone.
    fn reap(&mut self) -> bool {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own children.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return true;
            }
            self.live.remove(&pid);
            end_leftovers(pid);
            if wire::send_record(self.sock.as_raw_fd(), &Record::Exited { pid, status }, &[])
                .is_err()
            {
                return false;
            }
        }
    }

    fn handle(&mut self, record: Record) -> bool {
        match record {
            Record::Spawn { token } if token == super::WARM => {
                self.warm_due.push(Instant::now() + WARM_SPAWN_DELAY);
                true
            }
            Record::Spawn { token } => self.spawn_for(token),
            Record::Signal { pid, signal } => {
                if self.live.contains_key(&pid) {
                    if signal == libc::SIGKILL {
                        kill_worker(pid, signal);
                    } else {
                        // SIGINT interrupts the atom's Python, not what it started.
                        // SAFETY: a live, unreaped child of ours.
                        unsafe { libc::kill(pid, signal) };
                    }
                }
                true
            }
            Record::Terminate { pid, grace_ms } => {
                if self.live.contains_key(&pid) {
                    kill_worker(pid, libc::SIGTERM);
                    self.live
                        .insert(pid, Some(Instant::now() + Duration::from_millis(grace_ms)));
                }
                true
            }
            _ => true,
        }
    }

    /// Forks a worker for `token` and sends the server its record. False if
    /// the server is gone.
    fn spawn_for(&mut self, token: u64) -> bool {
        let (reply, fds) = match self.spawn() {
            Ok((pid, fds)) => (Record::Spawned { token, pid }, Some(fds)),
            Err(e) => (
                Record::SpawnFailed {
                    token,
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                },
                None,
            ),
        };
        let raw: Vec<RawFd> = fds.iter().flatten().map(AsRawFd::as_raw_fd).collect();
        wire::send_record(self.sock.as_raw_fd(), &reply, &raw).is_ok()
    }

    /// Forks one worker. Returns its pid and the server's ends of its control
    /// socket, stdout pipe and stderr pipe.
    fn spawn(&mut self) -> io::Result<(libc::pid_t, [OwnedFd; 3])> {
        let (ctl_server, ctl_worker) = socketpair(libc::SOCK_STREAM)?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        // SAFETY: the GIL is held (the zygote never releases it); this is the
        // sequence CPython's os.fork uses (Modules/posixmodule.c).
        let pid = unsafe {
            ffi::PyOS_BeforeFork();
            let pid = libc::fork();
            if pid == 0 {
                ffi::PyOS_AfterFork_Child();
                let code = self.worker(&ctl_worker, &out_w, &err_w);
                libc::_exit(code);
            }
            ffi::PyOS_AfterFork_Parent();
            if pid > 0 {
                // Also in the child: whichever runs first, the group exists before
                // either signals it.
                libc::setpgid(pid, pid);
            }
            pid
        };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        self.live.insert(pid, None);
        Ok((pid, [ctl_server, out_r, err_r]))
    }

    /// In the new worker: fds, limits, user, then Python's `serve(3)`.
    unsafe fn worker(&self, ctl: &OwnedFd, out: &OwnedFd, err: &OwnedFd) -> i32 {
        // SAFETY: single-threaded child; plain syscalls.
        unsafe {
            // A group of its own: what the atom starts (os.fork, multiprocessing,
            // subprocess) ends with the worker, see `kill_worker`.
            libc::setpgid(0, 0);
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            if libc::dup2(out.as_raw_fd(), 1) < 0
                || libc::dup2(err.as_raw_fd(), 2) < 0
                || libc::dup2(ctl.as_raw_fd(), CTL_FD) < 0
            {
                return 126;
            }
            // The control socket is not for the atom's child processes.
            libc::fcntl(CTL_FD, libc::F_SETFD, libc::FD_CLOEXEC);
            if let Err(e) = close_fds_above(CTL_FD) {
                let text = format!("pyproxy worker set-up failed: closing inherited fds: {e}\n");
                libc::write(2, text.as_ptr().cast(), text.len());
                return 126;
            }
            if let Err(e) = self.limits_and_user() {
                let text = format!("pyproxy worker set-up failed: {e}\n");
                libc::write(2, text.as_ptr().cast(), text.len());
                return 126;
            }
            // After the user change, which clears it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != self.me {
                return 1;
            }
            let env = self.user_env().unwrap_or_else(|| python::none());
            let fd = PyRef::new(ffi::PyLong_FromLong(CTL_FD as libc::c_long));
            let ok = fd.and_then(|fd| python::call(self.serve.as_ptr(), vec![fd, env]));
            if ok.is_none() {
                let text = format!("pyproxy worker failed: {}\n", python::take_error());
                libc::write(2, text.as_ptr().cast(), text.len());
                return 1;
            }
            0
        }
    }

    fn limits_and_user(&self) -> io::Result<()> {
        let limits = &self.config.limits;
        for (resource, value) in [
            (libc::RLIMIT_AS, limits.memory),
            (libc::RLIMIT_CPU, limits.cpu_seconds),
            (libc::RLIMIT_NOFILE, limits.files),
        ] {
            if let Some(v) = value {
                // For CPU time a hard limit above the soft one makes the kernel send
                // SIGXCPU (which names the cause) a second before its SIGKILL.
                let hard = if resource == libc::RLIMIT_CPU {
                    v.saturating_add(1)
                } else {
                    v
                };
                let lim = libc::rlimit {
                    rlim_cur: v,
                    rlim_max: hard,
                };
                // SAFETY: setrlimit with a valid struct.
                if unsafe { libc::setrlimit(resource, &lim) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        if let Some(user) = &self.config.user {
            let name = CString::new(user.name.as_bytes())
                .map_err(|_| io::Error::other("user name has NUL"))?;
            // SAFETY: plain credential syscalls, order: groups, gid, uid.
            unsafe {
                if libc::initgroups(name.as_ptr(), user.gid) != 0
                    || libc::setgid(user.gid) != 0
                    || libc::setuid(user.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::getuid() != user.uid || libc::geteuid() != user.uid {
                    return Err(io::Error::other("the user change did not take"));
                }
            }
        }
        Ok(())
    }

    /// The environment entries a worker of `--user` sets (`serve`'s `env`).
    unsafe fn user_env(&self) -> Option<PyRef> {
        let user = self.config.user.as_ref()?;
        // SAFETY: GIL held (the zygote's, inherited by the worker).
        unsafe {
            let dict = PyRef::new(ffi::PyDict_New())?;
            let put = |k: &CStr, v: &str| {
                if let Ok(v) = CString::new(v) {
                    if let Some(s) = PyRef::new(ffi::PyUnicode_FromString(v.as_ptr())) {
                        ffi::PyDict_SetItemString(dict.as_ptr(), k.as_ptr(), s.as_ptr());
                    }
                }
            };
            put(c"USER", &user.name);
            put(c"LOGNAME", &user.name);
            if let Some(home) = &user.home {
                put(c"HOME", &home.to_string_lossy());
            }
            Some(dict)
        }
    }

    /// The server is gone or shutting down: end every worker, reap, return.
    fn finish(&mut self, code: i32) -> i32 {
        for pid in self.live.keys() {
            kill_worker(*pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + self.config.kill_grace;
        while !self.live.is_empty() {
            let mut status = 0;
            // SAFETY: waitpid on our own children.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                self.live.remove(&pid);
                end_leftovers(pid);
                continue;
            }
            if pid < 0 {
                break;
            }
            if Instant::now() >= deadline {
                for pid in self.live.keys() {
                    kill_worker(*pid, libc::SIGKILL);
                }
                while !self.live.is_empty() {
                    // SAFETY: as above; blocking until each is gone.
                    let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
                    if pid <= 0 {
                        break;
                    }
                    self.live.remove(&pid);
                    end_leftovers(pid);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        code
    }
}

/// Sends `signal` to worker `pid` (a live child of the zygote) and to its
/// process group: the processes its atoms started, which may hold its control
/// socket and pipes open and would otherwise outlive it.
fn kill_worker(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: the group a live child of ours leads (it is unreaped, so the id is
    // not reused); if it is not a group (setpgid failed), the child alone.
    unsafe {
        if libc::kill(-pid, signal) != 0 {
            libc::kill(pid, signal);
        }
    }
}

/// After worker `pid` is reaped: kills what is left of its process group (a
/// group outlives its leader, and its id is not reused while it has members).
fn end_leftovers(pid: libc::pid_t) {
    // SAFETY: signalling a process group; ESRCH when none is left.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
}

/// Keeps `OsStr` paths usable where C strings are needed.
pub(crate) fn c_path(path: &std::path::Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("{} contains a NUL byte", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_closes_every_fd_above_the_last_kept() {
        let (a, b) = socketpair(libc::SOCK_STREAM).unwrap();
        let (lo, hi) = (
            a.as_raw_fd().min(b.as_raw_fd()),
            a.as_raw_fd().max(b.as_raw_fd()),
        );
        // In a child: closing fds in the test process would pull them from under other tests.
        // SAFETY: the child only makes system calls and exits without unwinding.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let closed = close_listed_fds_above(lo).is_ok()
                // SAFETY: probing fds without using them.
                && unsafe { libc::fcntl(hi, libc::F_GETFD) } < 0
                && unsafe { libc::fcntl(lo, libc::F_GETFD) } >= 0;
            // SAFETY: leaving the forked child at once.
            unsafe { libc::_exit(if closed { 0 } else { 1 }) }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status}"
        );
        drop((a, b));
    }
}
