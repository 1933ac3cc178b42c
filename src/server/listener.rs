//! The server's top level: the listening socket, the accept thread, the main
//! loop (signals, a stop handle and the attach-deadline sweep) and the
//! shutdown sequence.
//!
//! The main loop `select!`s over the signal channel, a control channel and a
//! `tick`. Shutdown stops accepting by setting a flag and connecting to our
//! own address to wake `accept()` (as tiny_http's `Drop for Server` does),
//! says GOODBYE to every session, lets the engine finish running atoms within
//! the grace period, ends every session, and waits for every thread.

use std::io::{self, BufReader, BufWriter};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{bounded, tick, Receiver, Sender};
use crossbeam::select;
use slog::{debug, info, o, warn, Logger};

use crate::protocol::{self, ErrorCode, ErrorMsg, FrameReader, FrameWriter, Message};

use super::config::{Limits, ServerConfig, TokenSource};
use super::error::ServerError;
use super::handshake::{read_first, Challenger, FirstFrame, HandshakeError, PRE_AUTH_MAX_FRAME};
use super::logging::LogRoutes;
use super::out_watch::OutWatch;
use super::registry::{ConnSlot, Registry};
use super::session::{self, EndReason};
use super::threads::{GroupHandle, ThreadGroup};
use super::token::{pyproxy_home, token_path, Token, TokenFile};
use super::Backend;

/// How often the main loop drops sessions whose output-stream is late.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// How long shutdown waits for sessions to drain before cutting every socket.
const DRAIN_WAIT: Duration = Duration::from_secs(3);
/// How long shutdown waits for threads after cutting every socket.
const FINAL_WAIT: Duration = Duration::from_secs(10);

/// What every connection thread shares.
pub struct Shared {
    pub registry: Arc<Registry>,
    pub backend: Arc<dyn Backend>,
    /// `None` when authentication is off (`--no-auth`).
    pub token: Option<Token>,
    pub limits: Limits,
    pub log: Logger,
    pub routes: Arc<LogRoutes>,
    /// Watches every attached output-stream for the client closing it.
    pub out_watch: Arc<OutWatch>,
    /// Taken at shutdown so the server's thread group can end.
    threads: Mutex<Option<GroupHandle>>,
    stopping: AtomicBool,
    /// PYPROXY_DEBUG=1: trace teardown steps.
    pub debug: bool,
}

impl Shared {
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Spawns a thread counted in the server's group (and in `also`).
    pub fn spawn<F>(&self, name: String, also: Option<&GroupHandle>, f: F) -> io::Result<()>
    where
        F: FnOnce() + Send + 'static,
    {
        let handle = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| io::Error::other("the server is shutting down"))?;
        let also: Vec<&GroupHandle> = also.into_iter().collect();
        handle.spawn(name, &also, f)
    }

    /// The limits announced in WELCOME.
    pub fn wire_limits(&self) -> protocol::Limits {
        protocol::Limits {
            max_frame: self.limits.max_frame,
            max_pipelined: self.limits.max_pipelined.min(u32::MAX as usize) as u32,
            max_line: self.limits.max_line,
            default_timeout_ms: self.limits.default_timeout.map(|d| d.as_millis() as u64),
        }
    }
}

/// Asks a running [`Server::run`] to shut down as a signal would.
#[derive(Clone)]
pub struct StopHandle(Sender<()>);

impl StopHandle {
    pub fn stop(&self) {
        let _ = self.0.try_send(());
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    local_addr: SocketAddr,
    token_file: Option<TokenFile>,
    group: ThreadGroup,
    grace: Duration,
    control_tx: Sender<()>,
    control_rx: Receiver<()>,
}

impl Server {
    /// Binds the listening socket and, for a generated token, writes the token file.
    pub fn bind(
        config: &ServerConfig,
        token: Option<Token>,
        backend: Arc<dyn Backend>,
        log: Logger,
        routes: Arc<LogRoutes>,
    ) -> Result<Server, ServerError> {
        let listener = TcpListener::bind(config.listen).map_err(|e| ServerError::Bind {
            address: config.listen.to_string(),
            source: e,
        })?;
        let local_addr = listener.local_addr()?;
        let token_file = match (&config.token_source, &token) {
            (TokenSource::Random, Some(t)) => Some(TokenFile::write(
                token_path(&pyproxy_home(), local_addr.port()),
                t,
            )?),
            _ => None,
        };
        let group = ThreadGroup::new();
        let (control_tx, control_rx) = bounded(1);
        let shared = Arc::new(Shared {
            registry: Registry::new(config.limits.max_sessions, config.limits.max_conns_per_peer),
            backend,
            token,
            limits: config.limits.clone(),
            log,
            routes,
            out_watch: Arc::new(OutWatch::new()?),
            threads: Mutex::new(Some(group.handle())),
            stopping: AtomicBool::new(false),
            debug: std::env::var_os("PYPROXY_DEBUG").is_some_and(|v| !v.is_empty() && v != "0"),
        });
        Ok(Server {
            shared,
            listener,
            local_addr,
            token_file,
            group,
            grace: config.limits.shutdown_grace,
            control_tx,
            control_rx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn token_file(&self) -> Option<&Path> {
        self.token_file.as_ref().map(TokenFile::path)
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.control_tx.clone())
    }

    /// Serves until a signal arrives on `signals` or the stop handle is used,
    /// then shuts down (see the module doc). Returns once every thread ended.
    pub fn run(self, signals: Receiver<i32>) -> Result<(), ServerError> {
        let log = self.shared.log.clone();
        let listener = self.listener.try_clone()?;
        let sh = Arc::clone(&self.shared);
        self.shared.spawn("pyproxy-accept".into(), None, move || {
            accept_loop(&sh, listener)
        })?;
        let watch = Arc::clone(&self.shared.out_watch);
        self.shared
            .spawn("pyproxy-outwatch".into(), None, move || watch.run())?;
        info!(log, "listening";
            "address" => %self.local_addr,
            "auth" => self.shared.token.is_some(),
            "token_file" => self.token_file().map(|p| p.display().to_string()),
            "python" => self.shared.backend.python_version());
        let sweep = tick(SWEEP_INTERVAL);
        loop {
            select! {
                recv(signals) -> sig => {
                    match sig {
                        Ok(s) => info!(log, "signal received, shutting down"; "signal" => signal_name(s)),
                        Err(_) => warn!(log, "signal thread ended; shutting down"),
                    }
                    break;
                }
                recv(self.control_rx) -> _ => {
                    info!(log, "stop requested, shutting down");
                    break;
                }
                recv(sweep) -> _ => self.sweep_attach_deadlines(),
            }
        }
        self.shutdown();
        Ok(())
    }

    fn sweep_attach_deadlines(&self) {
        let now = Instant::now();
        for s in self.shared.registry.sessions() {
            if now >= s.attach_deadline && s.is_awaiting_attach() && !s.is_ended() {
                warn!(s.log, "dropping session: its output-stream did not attach in time";
                    "attach_timeout_s" => self.shared.limits.attach_timeout.as_secs_f64(),
                    "peer" => %s.peer);
                s.fail(
                    ErrorCode::Timeout,
                    format!(
                        "the output-stream did not attach within {:.1} s (--attach-timeout)",
                        self.shared.limits.attach_timeout.as_secs_f64()
                    ),
                    EndReason::AttachTimeout,
                );
            }
        }
    }

    fn shutdown(mut self) {
        let log = self.shared.log.clone();
        let step = |text: &str| {
            if self.shared.debug {
                info!(log, "shutdown"; "step" => text);
            }
        };
        step("1 stop accepting");
        self.shared.stopping.store(true, Ordering::SeqCst);
        wake_accept(self.local_addr);
        step("2 refuse new atoms in every session");
        let sessions = self.shared.registry.sessions();
        for s in &sessions {
            info!(s.log, "server shutting down"; "grace_s" => self.grace.as_secs_f64());
            s.drain();
        }
        step("3 engine shutdown: running atoms get the grace period");
        self.shared.backend.shutdown(self.grace);
        step("4 GOODBYE to every session and end it");
        for s in self.shared.registry.sessions() {
            s.end(EndReason::ServerShutdown);
        }
        drop(sessions);
        // Every session is ending: a closed output-stream changes nothing now.
        self.shared.out_watch.stop();
        // From here no new thread can start, so the group can end.
        self.shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        step("5 wait for sessions to drain");
        if self.group.wait_until(Instant::now() + DRAIN_WAIT).is_err() {
            step("6 close every remaining connection");
            self.shared.registry.shutdown_all_conns();
            if let Err(live) = self.group.wait_until(Instant::now() + FINAL_WAIT) {
                warn!(log, "threads still running at exit"; "live" => live);
            }
        }
        step("7 remove the token file");
        if let Some(f) = self.token_file.take() {
            let path = f.path().to_path_buf();
            if let Err(e) = f.remove() {
                warn!(log, "cannot remove the token file"; "path" => %path.display(), "error" => %e);
            }
        }
        info!(log, "server stopped");
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        signal_hook::consts::SIGTERM => "SIGTERM",
        signal_hook::consts::SIGINT => "SIGINT",
        _ => "other",
    }
}

/// Connects to our own address so a thread blocked in `accept()` wakes up.
fn wake_accept(addr: SocketAddr) {
    let ip = match addr.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let _ = TcpStream::connect_timeout(&SocketAddr::new(ip, addr.port()), Duration::from_secs(1));
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                if shared.is_stopping() {
                    break;
                }
                // Out of descriptors and the like: back off instead of spinning.
                warn!(shared.log, "accept failed"; "error" => %e);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.is_stopping() {
            break;
        }
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let Some(slot) = shared.registry.open_conn(peer.ip(), clone) else {
            warn!(shared.log, "connection refused: too many connections from this peer";
                "peer" => %peer, "max_conns_per_peer" => shared.limits.max_conns_per_peer);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let mut w = FrameWriter::new(&stream);
            let _ = w.write_frame(
                &Message::Error(ErrorMsg {
                    code: ErrorCode::LimitExceeded,
                    message: "too many connections from your address (--max-conns-per-peer)".into(),
                })
                .to_frame(0),
            );
            continue;
        };
        let challenger = match Challenger::new(shared.token.clone()) {
            Ok(c) => c.with_backends(&shared.backend.names()),
            Err(e) => {
                warn!(shared.log, "cannot draw a nonce"; "peer" => %peer, "error" => %e);
                continue;
            }
        };
        // The CHALLENGE leaves before the connection's thread exists, so the
        // client computes its HELLO while that thread starts (in W5 it left
        // ~0.1 ms earlier than from the new thread).
        if let Err(e) = send_now(&stream, &challenger.challenge()) {
            debug!(shared.log, "could not send CHALLENGE"; "peer" => %peer, "error" => %e);
            continue;
        }
        let sh = Arc::clone(shared);
        if let Err(e) = shared.spawn(format!("pyproxy-conn-{peer}"), None, move || {
            handle_connection(&sh, stream, peer, slot, &challenger)
        }) {
            warn!(shared.log, "cannot start a connection thread"; "peer" => %peer, "error" => %e);
        }
    }
    debug!(shared.log, "accept thread stopped");
}

/// Writes one frame to a fresh connection without blocking the accept thread:
/// a peer that cannot take a few dozen bytes at once is dropped.
fn send_now(stream: &TcpStream, frame: &protocol::Frame) -> io::Result<()> {
    let mut bytes = Vec::new();
    frame.append_to(&mut bytes);
    // SAFETY: a send from our buffer on a socket we own.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    match usize::try_from(n) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(n) => Err(io::Error::other(format!(
            "the socket took {n} of {} bytes",
            bytes.len()
        ))),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

/// A new connection whose CHALLENGE was sent: HELLO (main-stream) or ATTACH
/// (output-stream).
fn handle_connection(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnSlot,
    challenger: &Challenger,
) {
    let log = shared.log.new(o!("peer" => peer.to_string()));
    let _ = stream.set_nodelay(true);
    let deadline = Some(shared.limits.handshake_timeout).filter(|d| !d.is_zero());
    if stream
        .set_read_timeout(deadline)
        .and_then(|()| stream.set_write_timeout(deadline))
        .is_err()
    {
        return;
    }
    let (Ok(r), Ok(w)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let mut reader = FrameReader::new(BufReader::new(r), PRE_AUTH_MAX_FRAME);
    let mut writer = FrameWriter::new(BufWriter::new(w));
    match read_first(challenger, &mut reader, &mut writer) {
        Ok(FirstFrame::Hello(hello)) => {
            session::run_main(shared, stream, reader, writer, hello, challenger, slot)
        }
        Ok(FirstFrame::Attach(attach)) => {
            session::run_attach(shared, stream, reader, writer, attach, slot)
        }
        Err(HandshakeError::Refused(r)) => {
            warn!(log, "connection refused"; "code" => ?r.code, "reason" => &r.message);
        }
        Err(HandshakeError::Io(e)) if e.is_timeout() => {
            info!(log, "handshake deadline passed; closing the connection";
                "handshake_timeout_s" => shared.limits.handshake_timeout.as_secs_f64());
            let frame = Message::Error(ErrorMsg {
                code: ErrorCode::Timeout,
                message: "no HELLO or ATTACH within the handshake deadline".into(),
            })
            .to_frame(0);
            let _ = writer.write_frame(&frame).and_then(|()| writer.flush());
        }
        Err(HandshakeError::Io(e)) if e.is_disconnect() => {
            debug!(log, "peer left during the handshake");
        }
        Err(HandshakeError::Io(e)) => {
            info!(log, "handshake failed"; "error" => %e);
        }
    }
}

/// The signal-hook thread: SIGTERM/SIGINT go to a bounded channel the main loop selects on.
/// A second signal while the first is handled exits the process at once (status 1).
pub struct SignalThread {
    handle: signal_hook::iterator::Handle,
    join: Option<JoinHandle<()>>,
}

impl SignalThread {
    /// Installs the handlers and starts the thread. Call after the engine started.
    pub fn install() -> Result<(SignalThread, Receiver<i32>), ServerError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let armed = Arc::new(AtomicBool::new(false));
        for sig in [SIGTERM, SIGINT] {
            // Order matters: the conditional exit runs before the flag is set,
            // so only a second signal finds it armed.
            signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&armed))
                .map_err(ServerError::Signals)?;
            signal_hook::flag::register(sig, Arc::clone(&armed)).map_err(ServerError::Signals)?;
        }
        let mut signals =
            signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ServerError::Signals)?;
        let handle = signals.handle();
        let (tx, rx) = bounded(4);
        let join = std::thread::Builder::new()
            .name("pyproxy-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let _ = tx.try_send(sig);
                }
            })
            .map_err(ServerError::Signals)?;
        Ok((
            SignalThread {
                handle,
                join: Some(join),
            },
            rx,
        ))
    }

    /// Ends the thread and joins it.
    pub fn stop(mut self) {
        self.handle.close();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}
