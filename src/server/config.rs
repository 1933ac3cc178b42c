//! The command line of `pyproxy-server` and the checked configuration built
//! from it. Every limit the server enforces is set here, with its default and
//! the reason for it in `--help`, so `docs/operations.md` and the binary agree.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::engine::EngineConfig;
use crate::fork::{ForkConfig, User, WorkerLimits};
use crate::protocol::DEFAULT_MAX_FRAME;

use super::error::ServerError;

const AFTER_HELP: &str = "\
Authentication (on by default):
  The token is, in order: the contents of --token-file (trimmed), the PYPROXY_TOKEN
  environment variable, or a fresh random token. A random token is written to
  $PYPROXY_HOME/tokens/<port> (PYPROXY_HOME defaults to ~/.pyproxy; directory 0700,
  file 0600) and removed at a clean shutdown; the client reads it from there by default.
  The token never crosses the wire (HMAC challenge-response) and is never logged.

Signals:
  SIGTERM or SIGINT: stop accepting, send GOODBYE to every session, let running atoms
  finish within --shutdown-grace, then exit 0. A second signal exits at once (status 1).

Environment:
  PYPROXY_TOKEN   the token, unless --token-file is given
  PYPROXY_HOME    where tokens/<port> is written (default ~/.pyproxy)
  VIRTUAL_ENV     default for --python-env
  PYPROXY_DEBUG   set to 1 to trace every session teardown step in the log

stdout carries exactly one line once the server accepts connections:
  pyproxy-server listening on HOST:PORT";

/// `pyproxy-server`: runs Python atoms for remote PyProxy clients.
#[derive(Parser, Debug, Clone)]
#[command(name = "pyproxy-server", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// Address to listen on (HOST:PORT; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9000", value_name = "HOST:PORT")]
    pub listen: String,

    /// Default execution backend, for sessions that ask for none (a client picks one per
    /// session with PyProxySession(..., backend=...)) [default: subinterp if --backends
    /// has it, else fork].
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,

    /// The backends clients may use, comma-separated. Only `fork` isolates a session from
    /// the server (with --user, as another user): a sub-interpreter runs inside the
    /// server's process as the server's user, so `--backends fork` when that matters.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST",
          default_values_t = [BackendKind::Subinterp, BackendKind::Fork])]
    pub backends: Vec<BackendKind>,

    /// Executor threads shared by all sessions [default: number of cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub executors: Option<u32>,

    /// Ready interpreters kept warm (cloudpickle imported) so opening a session never waits.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub warm_pool: u32,

    /// Sessions open at once; a HELLO beyond this is refused with LimitExceeded.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions: u32,

    /// Connections open at once from one peer address, handshakes included.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conns_per_peer: u32,

    /// Largest frame accepted after the handshake, in bytes (checked before allocating).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_FRAME, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_frame: u32,

    /// Atoms of one session queued or running at once; more are refused with LimitExceeded.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pipelined: u32,

    /// Longest output line sent in one piece; longer lines are split at this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(80..))]
    pub max_line: u32,

    /// Output buffered per session for a client that reads slowly; beyond it that
    /// session's atoms wait (back-pressure), others are not affected.
    #[arg(long, value_name = "BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(4096..))]
    pub max_output_buffer: u32,

    /// Per-atom timeout in seconds for atoms that set none [default: no timeout].
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub default_timeout: Option<Duration>,

    /// Working directory of the server, and so of every atom.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,

    /// Virtual environment whose packages atoms can import [default: $VIRTUAL_ENV].
    #[arg(long, value_name = "DIR", env = "VIRTUAL_ENV")]
    pub python_env: Option<PathBuf>,

    /// Microseconds an executor that ran out of atoms keeps polling for the next one
    /// before it sleeps (one executor at a time; 0: sleep at once). It saves a thread
    /// wake-up per round trip for a client that sends its next atom soon after a result,
    /// at the cost of at most this much CPU after each burst of atoms.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub idle_spin: u64,

    /// Modules imported into every interpreter in advance (repeat or comma-separate).
    #[arg(long, value_name = "MODULE", value_delimiter = ',')]
    pub preload: Vec<String>,

    /// Least severe log level written (and pushed to sessions as LOG frames).
    #[arg(long, value_enum, default_value_t = LogLevelArg::Info)]
    pub log_level: LogLevelArg,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Read the token from this file (surrounding whitespace is ignored).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Accept clients without a token. Refused unless --listen is a loopback address.
    #[arg(long)]
    pub no_auth: bool,

    /// Seconds a session waits for its output-stream to attach before it is dropped.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub attach_timeout: Duration,

    /// Seconds a new connection has to send HELLO or ATTACH before it is closed.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_seconds)]
    pub handshake_timeout: Duration,

    /// Seconds the rest of a request frame may take once its first byte has arrived; a
    /// stalled frame ends its session (ERROR TIMEOUT). Idle sessions are not affected.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_positive_seconds)]
    pub frame_timeout: Duration,

    /// Seconds running atoms get to finish after SIGTERM/SIGINT before they are interrupted.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,

    /// Fork backend: address-space limit of each worker process (RLIMIT_AS), e.g. 200M, 2G.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub worker_memory: Option<u64>,

    /// Fork backend: CPU seconds each worker process may use (RLIMIT_CPU; then SIGXCPU,
    /// and SIGKILL a second later).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub worker_cpu: Option<u64>,

    /// Fork backend: open files per worker process (RLIMIT_NOFILE).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(8..))]
    pub worker_files: Option<u64>,

    /// Fork backend: seconds between SIGINT (cancel, timeout) or SIGTERM (session
    /// closed) and SIGKILL of a worker that does not stop.
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = parse_seconds)]
    pub kill_grace: Duration,

    /// Fork backend: make a fresh directory per session under DIR, the worker's
    /// working directory, removed when the session ends.
    #[arg(long, value_name = "DIR")]
    pub sandbox_dir: Option<PathBuf>,

    /// Fork backend: run workers as this user (the server must run as root).
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// Fork backend: workers forked in advance so opening a session never waits for a fork.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warm_workers: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Own-GIL sub-interpreters in this process (CPython >= 3.12).
    Subinterp,
    /// A worker process per session, forked from a zygote (numpy and friends; crash isolation).
    Fork,
}

impl BackendKind {
    /// The name on the wire (HELLO/WELCOME `backend`).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Subinterp => "subinterp",
            BackendKind::Fork => crate::fork::NAME,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevelArg {
    Critical,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl LogLevelArg {
    pub fn to_slog(self) -> slog::Level {
        match self {
            LogLevelArg::Critical => slog::Level::Critical,
            LogLevelArg::Error => slog::Level::Error,
            LogLevelArg::Warning => slog::Level::Warning,
            LogLevelArg::Info => slog::Level::Info,
            LogLevelArg::Debug => slog::Level::Debug,
            LogLevelArg::Trace => slog::Level::Trace,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` is not a non-negative number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// As [`parse_seconds`], but more than zero (at least a millisecond): a
/// socket read timeout of zero would mean none.
fn parse_positive_seconds(s: &str) -> Result<Duration, String> {
    let d = parse_seconds(s)?;
    if d < Duration::from_millis(1) {
        return Err(format!(
            "`{s}` is not a number of seconds of at least 0.001"
        ));
    }
    Ok(d)
}

/// `200M`, `2G`, `1048576`: bytes, with an optional binary K/M/G/T suffix.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 512M, 2G)"))?;
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("`{s}` is not a usable size"))
}

/// Looks `name` up in the user database.
fn lookup_user(name: &str) -> Result<User, ServerError> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| ServerError::Config(format!("--user {name:?}: not a user name")))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: getpwnam_r writes into our buffers; `result` points into `pwd`.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return Err(ServerError::Config(format!(
                "--user {name}: no such user on this system"
            )));
        }
        let home = (!pwd.pw_dir.is_null()).then(|| {
            PathBuf::from(std::ffi::OsStr::from_encoded_bytes_unchecked(
                std::ffi::CStr::from_ptr(pwd.pw_dir).to_bytes(),
            ))
        });
        Ok(User {
            name: name.to_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home,
        })
    }
}

/// Every limit the network layer enforces. Invariant: all counts are at least 1.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_conns_per_peer: usize,
    pub max_frame: u32,
    pub max_pipelined: usize,
    pub max_line: u32,
    pub max_output_buffer: usize,
    pub default_timeout: Option<Duration>,
    pub attach_timeout: Duration,
    pub handshake_timeout: Duration,
    pub frame_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 256,
            max_conns_per_peer: 1024,
            max_frame: DEFAULT_MAX_FRAME,
            max_pipelined: 10_000,
            max_line: 64 * 1024,
            max_output_buffer: 4 * 1024 * 1024,
            default_timeout: None,
            attach_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Where the token comes from, decided before anything is bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `--no-auth` on a loopback address.
    Disabled,
    File(PathBuf),
    Env,
    /// Generate one and write it to `$PYPROXY_HOME/tokens/<port>`.
    Random,
}

/// The checked configuration the server runs with.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub limits: Limits,
    pub token_source: TokenSource,
    pub engine: EngineConfig,
    /// The backends that run (`--backends`), the default (`--backend`) first.
    pub backends: Vec<BackendKind>,
    pub fork: ForkConfig,
    pub log_level: slog::Level,
    pub log_format: LogFormat,
}

impl Cli {
    /// Checks the command line and resolves the listen address.
    /// `env_token_set`: whether PYPROXY_TOKEN is set (passed in so tests need no environment).
    pub fn into_config(self, env_token_set: bool) -> Result<ServerConfig, ServerError> {
        let user = match &self.user {
            None => None,
            Some(name) => {
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } != 0 {
                    return Err(ServerError::Config(format!(
                        "--user {name} needs the server to run as root (it switches each \
                         worker to that user after fork)"
                    )));
                }
                Some(lookup_user(name)?)
            }
        };
        let backends = self.checked_backends()?;
        if user.is_some() && !backends.contains(&BackendKind::Fork) {
            return Err(ServerError::Config(
                "--user sets the fork backend's workers' user, but --backends leaves fork out"
                    .to_owned(),
            ));
        }
        if let Some(dir) = &self.sandbox_dir {
            if !dir.is_dir() {
                return Err(ServerError::Config(format!(
                    "--sandbox-dir {}: not a directory",
                    dir.display()
                )));
            }
        }
        let addrs: Vec<SocketAddr> = self
            .listen
            .to_socket_addrs()
            .map_err(|e| ServerError::Bind {
                address: self.listen.clone(),
                source: e,
            })?
            .collect();
        let Some(&listen) = addrs.first() else {
            return Err(ServerError::Config(format!(
                "--listen {}: the name resolves to no address",
                self.listen
            )));
        };
        let token_source = if self.no_auth {
            if !addrs.iter().all(|a| a.ip().is_loopback()) {
                return Err(ServerError::Config(format!(
                    "--no-auth is only allowed on a loopback address, not {}: \
                     anyone who can reach the port could run code as this user",
                    self.listen
                )));
            }
            TokenSource::Disabled
        } else if let Some(path) = self.token_file {
            TokenSource::File(path)
        } else if env_token_set {
            TokenSource::Env
        } else {
            TokenSource::Random
        };
        let executors = match self.executors {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };
        let limits = Limits {
            max_sessions: self.max_sessions as usize,
            max_conns_per_peer: self.max_conns_per_peer as usize,
            max_frame: self.max_frame,
            max_pipelined: self.max_pipelined as usize,
            max_line: self.max_line,
            max_output_buffer: self.max_output_buffer as usize,
            default_timeout: self.default_timeout.filter(|d| !d.is_zero()),
            attach_timeout: self.attach_timeout,
            handshake_timeout: self.handshake_timeout,
            frame_timeout: self.frame_timeout,
            shutdown_grace: self.shutdown_grace,
        };
        let engine = EngineConfig {
            executors,
            warm_pool: self.warm_pool as usize,
            python_env: self.python_env.filter(|p| !p.as_os_str().is_empty()),
            workdir: self.workdir,
            preload: self
                .preload
                .into_iter()
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect(),
            max_line: self.max_line as usize,
            default_timeout: limits.default_timeout,
            idle_spin: Duration::from_micros(self.idle_spin),
        };
        let fork = ForkConfig {
            python_env: engine.python_env.clone(),
            workdir: engine.workdir.clone(),
            preload: engine.preload.clone(),
            max_line: engine.max_line,
            default_timeout: engine.default_timeout,
            limits: WorkerLimits {
                memory: self.worker_memory,
                cpu_seconds: self.worker_cpu,
                files: self.worker_files,
            },
            kill_grace: self.kill_grace,
            sandbox_dir: self
                .sandbox_dir
                .map(|d| std::fs::canonicalize(&d).unwrap_or(d)),
            user,
            warm_workers: self.warm_workers as usize,
        };
        Ok(ServerConfig {
            listen,
            limits,
            token_source,
            engine,
            backends,
            fork,
            log_level: self.log_level.to_slog(),
            log_format: self.log_format,
        })
    }
}

impl Cli {
    /// `--backends` without repeats, the default (`--backend`, which must be one of them) first.
    fn checked_backends(&self) -> Result<Vec<BackendKind>, ServerError> {
        let mut list: Vec<BackendKind> = Vec::new();
        for b in &self.backends {
            if !list.contains(b) {
                list.push(*b);
            }
        }
        let default = match self.backend {
            Some(b) if !list.contains(&b) => {
                return Err(ServerError::Config(format!(
                    "--backend {} is not among --backends {}",
                    b.name(),
                    list.iter().map(|b| b.name()).collect::<Vec<_>>().join(",")
                )))
            }
            Some(b) => b,
            None if list.contains(&BackendKind::Subinterp) => BackendKind::Subinterp,
            None => list[0],
        };
        list.retain(|b| *b != default);
        list.insert(0, default);
        Ok(list)
    }
}

impl ServerConfig {
    /// Whether clients may use `backend`.
    pub fn runs(&self, backend: BackendKind) -> bool {
        self.backends.contains(&backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<ServerConfig, String> {
        let mut argv = vec!["pyproxy-server"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.into_config(false).map_err(|e| e.to_string())
    }

    #[test]
    fn help_is_well_formed_and_documents_the_token_path() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("$PYPROXY_HOME/tokens/<port>"));
        assert!(help.contains("127.0.0.1:9000"));
    }

    #[test]
    fn defaults_are_loopback_with_a_random_token() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.token_source, TokenSource::Random);
        assert_eq!(c.limits.attach_timeout, Duration::from_secs(10));
        assert!(c.engine.executors >= 1);
    }

    #[test]
    fn no_auth_is_refused_on_a_public_address() {
        let err = parse(&["--no-auth", "--listen", "0.0.0.0:0"]).unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        let ok = parse(&["--no-auth", "--listen", "127.0.0.1:0"]).unwrap();
        assert_eq!(ok.token_source, TokenSource::Disabled);
        assert!(parse(&["--no-auth", "--listen", "[::1]:0"]).is_ok());
    }

    #[test]
    fn fork_flags_parse_into_the_fork_config() {
        let c = parse(&[
            "--backend",
            "fork",
            "--worker-memory",
            "200M",
            "--worker-cpu",
            "5",
            "--worker-files",
            "64",
            "--kill-grace",
            "0.5",
        ])
        .unwrap();
        assert_eq!(c.backends, [BackendKind::Fork, BackendKind::Subinterp]);
        assert_eq!(c.fork.limits.memory, Some(200 << 20));
        assert_eq!(c.fork.limits.cpu_seconds, Some(5));
        assert_eq!(c.fork.limits.files, Some(64));
        assert_eq!(c.fork.kill_grace, Duration::from_millis(500));
        assert_eq!(c.fork.warm_workers, 1);
        assert!(parse(&["--worker-memory", "lots"]).is_err());
        assert!(parse(&["--sandbox-dir", "/nonexistent/pyproxy"]).is_err());
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn backends_run_as_listed_with_the_default_first() {
        use BackendKind::{Fork, Subinterp};
        assert_eq!(parse(&[]).unwrap().backends, [Subinterp, Fork]);
        let only_fork = parse(&["--backends", "fork"]).unwrap();
        assert_eq!(only_fork.backends, [Fork]);
        assert!(only_fork.runs(Fork) && !only_fork.runs(Subinterp));
        assert_eq!(
            parse(&["--backends", "fork,subinterp,fork"])
                .unwrap()
                .backends,
            [Subinterp, Fork]
        );
        let err = parse(&["--backends", "fork", "--backend", "subinterp"]).unwrap_err();
        assert!(err.contains("not among --backends fork"), "{err}");
        assert!(parse(&["--backends", "threads"]).is_err());
        assert!(parse(&["--backends", ""]).is_err());
    }

    #[test]
    fn an_unknown_user_is_refused() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let err = parse(&["--user", "no-such-user-pyproxy"]).unwrap_err();
        assert!(
            err.contains(if root { "no such user" } else { "root" }),
            "{err}"
        );
    }

    #[test]
    fn token_sources_in_order() {
        let c = parse(&["--token-file", "/tmp/t"]).unwrap();
        assert_eq!(c.token_source, TokenSource::File("/tmp/t".into()));
        let cli = Cli::try_parse_from(["pyproxy-server"]).unwrap();
        assert_eq!(
            cli.into_config(true).unwrap().token_source,
            TokenSource::Env
        );
    }

    #[test]
    fn seconds_and_lists_parse() {
        let c = parse(&[
            "--attach-timeout",
            "0.25",
            "--default-timeout",
            "3",
            "--preload",
            "json,re",
            "--preload",
            "os",
        ])
        .unwrap();
        assert_eq!(c.limits.attach_timeout, Duration::from_millis(250));
        assert_eq!(c.engine.default_timeout, Some(Duration::from_secs(3)));
        assert_eq!(c.engine.preload, ["json", "re", "os"]);
        assert!(parse(&["--attach-timeout", "-1"]).is_err());
        assert!(parse(&["--frame-timeout", "0"]).is_err());
        assert_eq!(
            parse(&["--frame-timeout", "0.5"])
                .unwrap()
                .limits
                .frame_timeout,
            Duration::from_millis(500)
        );
        assert!(parse(&["--max-frame", "10"]).is_err());
        assert_eq!(
            parse(&[]).unwrap().engine.idle_spin,
            Duration::from_micros(100)
        );
        assert!(parse(&["--idle-spin", "0"])
            .unwrap()
            .engine
            .idle_spin
            .is_zero());
        assert!(parse(&["--idle-spin", "100001"]).is_err());
    }
}
