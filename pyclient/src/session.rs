//! One PyProxy session seen from the client: the handshake on both streams,
//! the table that the reader thread fills, and the calls a Python thread makes
//! (submit, cancel, wait, read output, close).
//!
//! Nothing here touches Python. Requests go out through the [`Outbox`]
//! (written by the calling thread, or corked behind an unanswered atom and
//! sent by the reader thread); responses are routed by the reader thread
//! ([`crate::reader`]) into [`State`] as raw bytes, and callers block on the
//! `changed` condvar. `lib.rs` wraps these calls and releases the GIL around
//! every one that can block.
//!
//! Lock order: the outbox's queue before `state`. The reader thread never
//! holds both.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyproxy::protocol::{
    auth, AtomKind, AtomResult, Attach, Cancel, ErrorCode, ErrorMsg, Frame, FrameReader,
    FrameWriter, Hello, Limits, Message, DEFAULT_MAX_FRAME, HEADER_SIZE, NONCE_LEN,
    PROTOCOL_VERSION,
};

use crate::error::{ClientError, Result};
use crate::notify::{Notifier, Pipe};
use crate::outbox::{self, Outbox};
use crate::reader;

/// The client's name and version, sent in `HELLO` for the server's log.
pub const CLIENT_NAME: &str = concat!("pyproxy-client ", env!("CARGO_PKG_VERSION"));

/// Log records kept per session; older ones are dropped first.
pub const MAX_LOGS: usize = 10_000;

/// What `connect` needs to know.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub host: String,
    pub port: u16,
    pub token: Option<String>,
    /// Where the token came from, or where the client looked when there is none,
    /// so an auth failure can say it.
    pub token_source: String,
    /// Requested backend, empty for the server's default.
    pub backend: String,
    /// Deadline for TCP connect plus both handshakes.
    pub connect_timeout: Duration,
    pub implementation: String,
    pub python_version: String,
}

/// What the server told us in `WELCOME`.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub session_id: u64,
    pub server_version: String,
    pub implementation: String,
    pub python_version: String,
    pub backend: String,
    pub limits: Limits,
    pub peer: SocketAddr,
}

/// How an atom ended, as received: bytes only, decoded by the waiting caller.
#[derive(Debug)]
pub enum Completion {
    Result(AtomResult),
    /// The server answered the `EVAL` with `ERROR`.
    Refused(ErrorMsg),
    /// The session died before a `RESULT` came; the text is the cause.
    Closed(String),
}

/// Whole lines one atom wrote to one fd, as one `OUTPUT` frame carried them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub atom: u64,
    pub fd: u8,
    pub data: Vec<u8>,
}

/// A `LOG` record, undecoded until someone asks for it.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub level: u8,
    pub timestamp_us: u64,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

/// Per-atom bookkeeping while the atom's future is alive.
#[derive(Default)]
pub(crate) struct Slot {
    /// Set exactly once, by the reader thread or by teardown.
    pub done: Option<Arc<Completion>>,
    /// Notified once when `done` is set; empty afterwards.
    pub watchers: Vec<(Arc<Notifier>, u64)>,
}

/// An atom's unread output: sequence numbers into `State::output`, oldest first.
#[derive(Default)]
pub(crate) struct AtomOutput {
    pub seqs: VecDeque<u64>,
    /// `END_OF_OUTPUT` arrived: no more chunks will be added.
    pub ended: bool,
    /// The atom's future is gone: drop this entry once it is ended and read.
    pub released: bool,
}

/// Why the session is dead.
#[derive(Clone, Debug)]
pub(crate) struct Death {
    /// The full `SessionClosed` message.
    pub message: String,
    /// True when this client called `close()`: iterators over the whole
    /// session then end normally instead of raising.
    pub by_client: bool,
}

/// Everything the reader thread writes and callers read.
#[derive(Default)]
pub(crate) struct State {
    pub next_atom: u64,
    /// Atoms whose future is alive (released ones are removed).
    pub atoms: HashMap<u64, Slot>,
    /// Atoms sent that have no completion yet, in send order; the first one is running.
    pub pending: BTreeSet<u64>,
    /// Unread output of the whole session, keyed by arrival order. Every line is
    /// delivered once: to the atom's iterator or to the session's, whichever reads it.
    pub output: BTreeMap<u64, Chunk>,
    pub next_seq: u64,
    pub atom_output: HashMap<u64, AtomOutput>,
    /// Someone has iterated over the whole session's output. Until then, the
    /// output of an atom whose future is gone has no reader and is dropped, so
    /// a long-lived session that only uses `output(future)` holds no old output.
    pub session_reader: bool,
    pub logs: VecDeque<LogRecord>,
    /// Set once, when the session dies; never cleared.
    pub dead: Option<Death>,
}

impl State {
    /// Records an atom's completion and wakes its watchers. Later completions are ignored.
    pub fn complete(&mut self, atom: u64, completion: Completion) {
        self.pending.remove(&atom);
        if let Some(slot) = self.atoms.get_mut(&atom) {
            if slot.done.is_none() {
                slot.done = Some(Arc::new(completion));
                for (notifier, token) in slot.watchers.drain(..) {
                    notifier.notify(token);
                }
            }
        }
    }

    pub fn push_output(&mut self, atom: u64, fd: u8, data: Vec<u8>) {
        let entry = self
            .atom_output
            .entry(atom)
            // Output for an atom this client never sent: nobody will release it.
            .or_insert_with(|| AtomOutput {
                released: true,
                ..AtomOutput::default()
            });
        if entry.released && !self.session_reader {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        entry.seqs.push_back(seq);
        self.output.insert(seq, Chunk { atom, fd, data });
    }

    pub fn end_output(&mut self, atom: u64) {
        let entry = self.atom_output.entry(atom).or_insert_with(|| AtomOutput {
            released: true,
            ..AtomOutput::default()
        });
        entry.ended = true;
        self.forget_output_if_finished(atom);
    }

    pub fn push_log(&mut self, record: LogRecord) {
        if self.logs.len() == MAX_LOGS {
            self.logs.pop_front();
        }
        self.logs.push_back(record);
    }

    fn forget_output_if_finished(&mut self, atom: u64) {
        if let Some(o) = self.atom_output.get(&atom) {
            if o.released && o.ended && o.seqs.is_empty() {
                self.atom_output.remove(&atom);
            }
        }
    }

    /// Takes up to `max_bytes` (at least one chunk) of `atom`'s unread output.
    fn take_atom_output(&mut self, atom: u64, max_bytes: usize) -> Vec<Chunk> {
        let mut taken = Vec::new();
        let mut bytes = 0;
        let Some(o) = self.atom_output.get_mut(&atom) else {
            return taken;
        };
        while bytes < max_bytes {
            let Some(seq) = o.seqs.pop_front() else { break };
            if let Some(chunk) = self.output.remove(&seq) {
                bytes += chunk.data.len();
                taken.push(chunk);
            }
        }
        taken
    }

    /// Takes up to `max_bytes` (at least one chunk) of the session's unread output.
    fn take_session_output(&mut self, max_bytes: usize) -> Vec<Chunk> {
        let mut taken = Vec::new();
        let mut bytes = 0;
        while bytes < max_bytes {
            let Some((seq, chunk)) = self.output.pop_first() else {
                break;
            };
            let atom = chunk.atom;
            if let Some(o) = self.atom_output.get_mut(&atom) {
                // Sequence numbers grow, so this chunk is the front of its atom's queue.
                if o.seqs.front() == Some(&seq) {
                    o.seqs.pop_front();
                } else {
                    o.seqs.retain(|s| *s != seq);
                }
            }
            self.forget_output_if_finished(atom);
            bytes += chunk.data.len();
            taken.push(chunk);
        }
        taken
    }
}

/// State shared by the reader thread and every caller.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    /// Notified whenever anything in `state` changes.
    pub changed: Condvar,
    /// "session 7 at 127.0.0.1:9000", the prefix of messages about this session.
    pub label: String,
    /// `PYPROXY_DEBUG` is set: trace teardown steps on stderr.
    pub debug: bool,
    /// Set by `close()` before it sends `CLOSE`: the server hanging up after
    /// that is the answer to our close, not a failure.
    pub close_requested: AtomicBool,
    /// Bumped after every change announced on `changed`.
    pub changes: AtomicU64,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in the reader thread is caught and turned into a dead session;
        // the data behind a poisoned lock is still consistent enough to fail waiters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every waiter: call after changing `state`, with the lock released.
    pub fn announce(&self) {
        self.changes.fetch_add(1, Ordering::Release);
        self.changed.notify_all();
    }

    pub fn trace(&self, step: &str) {
        if self.debug {
            eprintln!("pyproxy: {}: {step}", self.label);
        }
    }
}

/// Why a submit failed: the session (an error for the caller as it is) or
/// the socket (the session dies of it).
enum SubmitError {
    Client(ClientError),
    Io(io::Error),
}

impl From<io::Error> for SubmitError {
    fn from(e: io::Error) -> SubmitError {
        SubmitError::Io(e)
    }
}

/// An EVAL's fields, each as the pieces it is the concatenation of (written
/// as they are: no copy for a large request).
pub struct EvalParts<'a> {
    pub kind: AtomKind,
    pub payload: &'a [&'a [u8]],
    pub globals: Option<&'a [&'a [u8]]>,
    pub locals: Option<&'a [&'a [u8]]>,
    pub timeout_ms: Option<u64>,
    pub buffers: &'a [&'a [u8]],
}

impl EvalParts<'_> {
    fn write(&self, w: &mut impl Write, atom: u64) -> io::Result<()> {
        pyproxy::protocol::write_eval(
            w,
            atom,
            self.kind,
            self.timeout_ms,
            self.globals,
            self.locals,
            self.payload,
            self.buffers,
        )
        .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// A connected session. Dropping it closes it.
pub struct Session {
    pub info: SessionInfo,
    pub(crate) shared: Arc<Shared>,
    /// The main-stream's write side, shared with the reader thread.
    outbox: Arc<Outbox>,
    /// Written once by `close` to wake the reader thread.
    wake: Arc<Pipe>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn deadline_left(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Reads one frame with the handshake deadline applied.
fn read_handshake_frame(
    stream: &TcpStream,
    deadline: Instant,
    address: &str,
    timeout: Duration,
    stream_name: &str,
) -> Result<Message> {
    let timed_out = || ClientError::ConnectFailed {
        address: address.to_string(),
        reason: format!(
            "the handshake on {stream_name} did not complete within connect_timeout={:.1}s",
            timeout.as_secs_f64()
        ),
    };
    let left = deadline_left(deadline).ok_or_else(timed_out)?;
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| ClientError::ConnectFailed {
            address: address.to_string(),
            reason: e.to_string(),
        })?;
    let frame = FrameReader::new(stream, DEFAULT_MAX_FRAME)
        .read_frame()
        .map_err(|e| match e {
            e if e.is_timeout() => timed_out(),
            e if e.is_disconnect() || matches!(e, pyproxy::protocol::Error::Truncated { .. }) => {
                ClientError::ConnectFailed {
                    address: address.to_string(),
                    reason: format!("the server closed {stream_name} during the handshake ({e})"),
                }
            }
            e => ClientError::Protocol(format!(
                "the server at {address} sent an invalid frame on {stream_name} during the \
                 handshake: {e}; is it a PyProxy server of a compatible version?"
            )),
        })?;
    Message::decode(&frame).map_err(|e| {
        ClientError::Protocol(format!(
            "the server at {address} sent an undecodable {} on {stream_name}: {e}",
            frame.kind
        ))
    })
}

fn write_handshake(stream: &TcpStream, frame: &Frame, address: &str) -> Result<()> {
    FrameWriter::new(stream)
        .write_frame(frame)
        .map_err(|e| ClientError::ConnectFailed {
            address: address.to_string(),
            reason: format!("could not send {}: {e}", frame.kind),
        })
}

fn connect_tcp(opts: &ConnectOptions, deadline: Instant, address: &str) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = (opts.host.as_str(), opts.port)
        .to_socket_addrs()
        .map_err(|e| ClientError::ConnectFailed {
            address: address.to_string(),
            reason: format!("cannot resolve host {:?}: {e}", opts.host),
        })?
        .collect();
    let mut last = None;
    // "localhost" may resolve to ::1 first while the server listens on 127.0.0.1.
    for addr in &addrs {
        let Some(left) = deadline_left(deadline) else {
            break;
        };
        match TcpStream::connect_timeout(addr, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    Err(ClientError::ConnectFailed {
        address: address.to_string(),
        reason: last.unwrap_or_else(|| {
            if addrs.is_empty() {
                format!("host {:?} resolved to no address", opts.host)
            } else {
                format!(
                    "no connection within connect_timeout={:.1}s",
                    opts.connect_timeout.as_secs_f64()
                )
            }
        }),
    })
}

/// What an `ERROR` in the handshake was sent in place of, and so what it refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// main-stream's `CHALLENGE`: the server refused the connection at once
    /// (e.g. `--max-conns-per-peer`).
    MainStream,
    /// output-stream's `CHALLENGE`, likewise.
    OutputStream,
    /// `WELCOME`: the server refused the session `HELLO` asked for.
    Hello,
}

impl Refusal {
    fn what(self) -> &'static str {
        match self {
            Refusal::MainStream => "the connection",
            Refusal::OutputStream => "the output-stream connection",
            Refusal::Hello => "the session",
        }
    }
}

/// The error for an `ERROR` the server sent during the handshake: the one
/// place its code picks the exception class, wherever in the handshake it came.
fn refused(
    code: ErrorCode,
    message: String,
    refusal: Refusal,
    opts: &ConnectOptions,
    address: &str,
) -> ClientError {
    let what = refusal.what();
    match code {
        ErrorCode::AuthFailed if refusal == Refusal::Hello => ClientError::Auth(format!(
            "the server at {address} refused the token from {} ({message}); use the token \
             the server wrote to its token file (see docs/operations.md), via token= or \
             PYPROXY_TOKEN",
            opts.token_source
        )),
        // Before HELLO no token has been sent: no advice about it.
        ErrorCode::AuthFailed => ClientError::Auth(format!(
            "the server at {address} refused {what} (AUTH_FAILED): {message}"
        )),
        ErrorCode::VersionMismatch if refusal == Refusal::Hello => {
            ClientError::VersionMismatch(format!(
                "the server at {address} refused this client's version ({message}); install \
                 matching pyproxy client and server versions"
            ))
        }
        ErrorCode::VersionMismatch => ClientError::VersionMismatch(format!(
            "the server at {address} refused {what} (VERSION_MISMATCH): {message}; install \
             matching pyproxy client and server versions"
        )),
        code => ClientError::Refused {
            address: address.to_string(),
            what,
            code,
            message,
        },
    }
}

impl Session {
    /// Opens main-stream and output-stream, completes both handshakes and starts
    /// the reader thread. Blocks; the caller releases the GIL around it.
    pub fn connect(opts: &ConnectOptions) -> Result<Session> {
        let start = Instant::now();
        let deadline = start + opts.connect_timeout;
        let address = if opts.host.contains(':') {
            format!("[{}]:{}", opts.host, opts.port)
        } else {
            format!("{}:{}", opts.host, opts.port)
        };

        // main-stream: CHALLENGE, HELLO, WELCOME.
        let main = connect_tcp(opts, deadline, &address)?;
        let peer = main.peer_addr().map_err(|e| ClientError::ConnectFailed {
            address: address.clone(),
            reason: e.to_string(),
        })?;
        // The output-stream is connected now, so its accept and CHALLENGE overlap
        // the main-stream's handshake instead of following it (W5).
        let out = TcpStream::connect_timeout(
            &peer,
            deadline_left(deadline).unwrap_or(Duration::from_millis(1)),
        )
        .map_err(|e| ClientError::ConnectFailed {
            address: address.clone(),
            reason: format!("could not open output-stream to {peer}: {e}"),
        })?;
        // Started while the server accepts and sends CHALLENGE, which takes
        // longer than starting a thread: off the way to the first result.
        let thread = reader::Prestarted::spawn().map_err(|e| ClientError::ConnectFailed {
            address: address.clone(),
            reason: format!("could not start the session's thread: {e}"),
        })?;
        let challenge = match read_handshake_frame(
            &main,
            deadline,
            &address,
            opts.connect_timeout,
            "main-stream",
        )? {
            Message::Challenge(c) => c,
            // Refused before the handshake (e.g. --max-conns-per-peer).
            Message::Error(e) => {
                return Err(refused(
                    e.code,
                    e.message,
                    Refusal::MainStream,
                    opts,
                    &address,
                ))
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "the server at {address} opened with {} instead of CHALLENGE; is it a \
                     PyProxy server?",
                    other.kind()
                )))
            }
        };
        if challenge.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch(format!(
                "the server at {address} speaks PyProxy protocol version {}, this client \
                 speaks version {PROTOCOL_VERSION}; install matching pyproxy client and server \
                 versions",
                challenge.protocol_version
            )));
        }
        let client_nonce = auth::random_nonce().map_err(|e| ClientError::ConnectFailed {
            address: address.clone(),
            reason: format!("no random bytes for the handshake nonce: {e}"),
        })?;
        let proof = if challenge.auth_required {
            let Some(token) = &opts.token else {
                return Err(ClientError::Auth(format!(
                    "the server at {address} requires a token and none was found ({}); pass \
                     token=..., set PYPROXY_TOKEN, or make the server's token file readable",
                    opts.token_source
                )));
            };
            auth::client_proof(token.as_bytes(), &challenge.server_nonce, &client_nonce)
        } else {
            [0u8; NONCE_LEN]
        };
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_nonce,
            proof,
            implementation: opts.implementation.clone(),
            python_version: opts.python_version.clone(),
            backend: opts.backend.clone(),
            client: CLIENT_NAME.to_string(),
        });
        write_handshake(&main, &hello.to_frame(0), &address)?;
        let welcome = match read_handshake_frame(
            &main,
            deadline,
            &address,
            opts.connect_timeout,
            "main-stream",
        )? {
            Message::Welcome(w) => w,
            Message::Error(e) => {
                return Err(refused(e.code, e.message, Refusal::Hello, opts, &address))
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "the server at {address} answered HELLO with {} instead of WELCOME",
                    other.kind()
                )))
            }
        };
        if challenge.auth_required {
            let token = opts.token.as_deref().unwrap_or_default();
            if !auth::verify_server_proof(
                token.as_bytes(),
                &challenge.server_nonce,
                &client_nonce,
                &welcome.server_proof,
            ) {
                return Err(ClientError::Auth(format!(
                    "the server at {address} could not prove it knows the token (its WELCOME \
                     proof does not verify); it is not the server the token belongs to, so \
                     this client refuses it"
                )));
            }
        }

        // output-stream: CHALLENGE (ignored), ATTACH.
        match read_handshake_frame(
            &out,
            deadline,
            &address,
            opts.connect_timeout,
            "output-stream",
        )? {
            Message::Challenge(_) => {}
            // main-stream was let in, output-stream was not (e.g. it is the
            // connection over --max-conns-per-peer).
            Message::Error(e) => {
                return Err(refused(
                    e.code,
                    e.message,
                    Refusal::OutputStream,
                    opts,
                    &address,
                ))
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "the server at {address} opened output-stream with {} instead of CHALLENGE",
                    other.kind()
                )))
            }
        }
        let attach = Message::Attach(Attach {
            session_id: welcome.session_id,
            secret: welcome.attach_secret,
        });
        write_handshake(&out, &attach.to_frame(0), &address)?;
        // ATTACHED is the session thread's to check (`reader::run`).

        let io_err = |e: io::Error| ClientError::ConnectFailed {
            address: address.clone(),
            reason: e.to_string(),
        };
        for s in [&main, &out] {
            s.set_read_timeout(None).map_err(io_err)?;
            s.set_nodelay(true).map_err(io_err)?;
        }
        let info = SessionInfo {
            session_id: welcome.session_id,
            server_version: welcome.server_version,
            implementation: welcome.implementation,
            python_version: welcome.python_version,
            backend: welcome.backend,
            limits: welcome.limits,
            peer,
        };
        Session::start(info, main, out, thread).map_err(io_err)
    }

    /// Starts the reader thread over two connected streams; output-stream's
    /// ATTACHED is still to come.
    pub(crate) fn start(
        info: SessionInfo,
        main: TcpStream,
        out: TcpStream,
        thread: reader::Prestarted,
    ) -> io::Result<Session> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_atom: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
            label: format!("session {} at {}", info.session_id, info.peer),
            debug: std::env::var_os("PYPROXY_DEBUG").is_some_and(|v| !v.is_empty()),
            close_requested: AtomicBool::new(false),
            changes: AtomicU64::new(0),
        });
        let wake = Arc::new(Pipe::new()?);
        let outbox = Arc::new(Outbox::new(main.try_clone()?));
        // Frames from the server may be as large as the ones it accepts.
        let max_frame = info.limits.max_frame.max(DEFAULT_MAX_FRAME);
        let start = reader::Start {
            session_id: info.session_id,
            shared: shared.clone(),
            main,
            out,
            wake: wake.clone(),
            outbox: outbox.clone(),
            max_frame,
        };
        let thread = thread.start(start)?;
        Ok(Session {
            info,
            shared,
            outbox,
            wake,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn closed_error(&self, state: &State) -> ClientError {
        ClientError::SessionClosed {
            cause: state
                .dead
                .as_ref()
                .map(|d| d.message.clone())
                .unwrap_or_else(|| format!("{} is closed", self.shared.label)),
        }
    }

    /// Sends an atom and returns its id. The slot exists before the bytes leave,
    /// so a `RESULT` can never arrive for an atom the table does not know.
    pub fn submit(
        &self,
        kind: AtomKind,
        payload: &[u8],
        globals: Option<&[u8]>,
        locals: Option<&[u8]>,
        timeout_ms: Option<u64>,
    ) -> Result<u64> {
        let (g, l) = (globals.map(|g| [g]), locals.map(|l| [l]));
        self.submit_parts(&EvalParts {
            kind,
            payload: &[payload],
            globals: g.as_ref().map(|g| &g[..]),
            locals: l.as_ref().map(|l| &l[..]),
            timeout_ms,
            buffers: &[],
        })
    }

    /// [`Session::submit`] with each field given as the pieces it is the
    /// concatenation of; the pieces are written to the socket as they are.
    pub fn submit_parts(&self, eval: &EvalParts<'_>) -> Result<u64> {
        if let Some((atom, due)) = self.queue(eval)? {
            if due {
                self.send_queued()?;
            }
            return Ok(atom);
        }
        // Vectored, straight from the caller's buffers: no copy into a frame.
        let sent = self.outbox.submit_large(
            || self.take_id(),
            |w, &atom| eval.write(w, atom).and_then(|()| w.flush()),
        );
        self.sent(sent)
    }

    /// The queueing half of [`Session::submit_parts`], for a request small
    /// enough to wait in the outbox (copied into it): never writes, so a
    /// caller may hold the GIL through it. The atom's id, and whether the
    /// caller must now [`Session::send_queued`]; None (nothing done) for a
    /// request too large to wait.
    pub fn queue(&self, eval: &EvalParts<'_>) -> Result<Option<(u64, bool)>> {
        if self.request_size(eval)? > outbox::SMALL_REQUEST {
            return Ok(None);
        }
        let queued = self.outbox.queue(outbox::Send::Atom, |buf| {
            let atom = self.take_id()?;
            eval.write(buf, atom)?;
            Ok(atom)
        });
        self.sent(queued).map(Some)
    }

    /// Writes what [`Session::queue`] left due (blocks on the socket).
    pub fn send_queued(&self) -> Result<()> {
        self.sent(self.outbox.flush().map_err(SubmitError::Io))
    }

    fn request_size(&self, eval: &EvalParts<'_>) -> Result<usize> {
        let len = |parts: &[&[u8]]| parts.iter().map(|p| p.len()).sum::<usize>();
        let size = len(eval.payload)
            + eval.globals.map_or(0, len)
            + eval.locals.map_or(0, len)
            + len(eval.buffers)
            + 4 * eval.buffers.len()
            + 64;
        let max = self.info.limits.max_frame;
        if size + HEADER_SIZE > max as usize {
            return Err(ClientError::TooLarge { size, max });
        }
        Ok(size)
    }

    /// A new atom's id and slot. Taken under the outbox's lock, so ids
    /// increase on the wire.
    fn take_id(&self) -> std::result::Result<u64, SubmitError> {
        let mut st = self.shared.lock();
        if st.dead.is_some() || self.shared.close_requested.load(Ordering::SeqCst) {
            return Err(SubmitError::Client(self.closed_error(&st)));
        }
        let atom = st.next_atom;
        st.next_atom += 1;
        st.atoms.insert(atom, Slot::default());
        st.atom_output.insert(atom, AtomOutput::default());
        st.pending.insert(atom);
        Ok(atom)
    }

    /// A failed write kills the session; the caller gets the session's error.
    fn sent<T>(&self, sent: std::result::Result<T, SubmitError>) -> Result<T> {
        match sent {
            Ok(v) => Ok(v),
            Err(SubmitError::Client(e)) => Err(e),
            Err(SubmitError::Io(e)) => {
                self.fail_write(&e.to_string());
                let st = self.shared.lock();
                Err(self.closed_error(&st))
            }
        }
    }

    /// The atom's outcome if it has one now (no waiting, no sending).
    pub fn completed(&self, atom: u64) -> Option<Arc<Completion>> {
        let st = self.shared.lock();
        st.atoms.get(&atom).and_then(|slot| slot.done.clone())
    }

    /// A write failed: the session is dead. Shut the socket so the reader
    /// thread notices at once and tears everything down with this cause.
    fn fail_write(&self, reason: &str) {
        {
            let mut st = self.shared.lock();
            if st.dead.is_none() {
                st.dead = Some(Death {
                    message: format!(
                        "{} is closed: sending to the server failed ({reason}); open a new \
                         PyProxySession",
                        self.shared.label
                    ),
                    by_client: false,
                });
            }
        }
        let _ = self.outbox.stream().shutdown(Shutdown::Both);
    }

    /// Sends `CANCEL` for an atom that has not finished. True if it was sent.
    pub fn cancel(&self, atom: u64) -> Result<bool> {
        let frame = Message::Cancel(Cancel { target: atom }).to_frame(atom);
        let sent = self.outbox.submit(outbox::Send::Now, |buf| {
            {
                let st = self.shared.lock();
                if st.dead.is_some() || !st.pending.contains(&atom) {
                    return Ok(false);
                }
            }
            FrameWriter::new(buf)
                .write_frame(&frame)
                .map_err(|e| io::Error::other(e.to_string()))?;
            Ok::<bool, io::Error>(true)
        });
        match sent {
            Ok(sent) => Ok(sent),
            Err(e) => {
                self.fail_write(&e.to_string());
                Ok(false)
            }
        }
    }

    /// The atom's completion, waiting up to `timeout` (`None`: without limit).
    /// `Ok(None)`: the time ran out first.
    /// Waits (GIL already released by the caller) until the reader changes the
    /// state or `deadline` passes; None once it has passed.
    fn wait_changed<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> Option<MutexGuard<'a, State>> {
        let changed = &self.shared.changed;
        Some(match deadline {
            None => changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                changed
                    .wait_timeout(st, deadline_left(d)?)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        })
    }

    /// Sends corked requests before a caller blocks on their results.
    pub(crate) fn flush(&self) {
        if let Err(e) = self.outbox.flush() {
            self.fail_write(&e.to_string());
        }
    }

    pub fn wait(&self, atom: u64, timeout: Option<Duration>) -> Result<Option<Arc<Completion>>> {
        self.flush();
        let now = Instant::now();
        let deadline = timeout.map(|t| now + t);
        let poll_until = deadline.map_or(now + wait_spin(), |d| d.min(now + wait_spin()));
        let mut polled = false;
        let mut st = self.shared.lock();
        loop {
            match st.atoms.get(&atom) {
                None => {
                    return Err(ClientError::Protocol(format!(
                        "atom {atom} is not known to {} (was its future released?)",
                        self.shared.label
                    )))
                }
                Some(slot) => {
                    if let Some(done) = &slot.done {
                        return Ok(Some(done.clone()));
                    }
                }
            }
            if !polled {
                // Once per call, then the state is checked again under the lock
                // before sleeping, so a change made meanwhile is never missed.
                polled = true;
                let seen = self.shared.changes.load(Ordering::Acquire);
                drop(st);
                poll_for_change(&POLLING, &self.shared.changes, seen, poll_until);
                st = self.shared.lock();
                continue;
            }
            st = match self.wait_changed(st, deadline) {
                Some(st) => st,
                None => return Ok(None),
            };
        }
    }

    pub fn is_done(&self, atom: u64) -> bool {
        let st = self.shared.lock();
        st.atoms.get(&atom).is_none_or(|s| s.done.is_some())
    }

    /// True while the atom is the oldest unfinished one: the server runs a
    /// session's atoms one at a time, in order, so it is running (or about to).
    pub fn is_running(&self, atom: u64) -> bool {
        let st = self.shared.lock();
        st.pending.first() == Some(&atom)
    }

    /// Notifies `notifier` with `token` when the atom completes (at once if it has).
    pub fn watch(&self, atom: u64, notifier: &Arc<Notifier>, token: u64) {
        let mut st = self.shared.lock();
        match st.atoms.get_mut(&atom) {
            Some(slot) if slot.done.is_none() => slot.watchers.push((notifier.clone(), token)),
            _ => notifier.notify(token),
        }
    }

    pub fn unwatch(&self, atom: u64, notifier: &Arc<Notifier>) {
        let mut st = self.shared.lock();
        if let Some(slot) = st.atoms.get_mut(&atom) {
            slot.watchers.retain(|(n, _)| !Arc::ptr_eq(n, notifier));
        }
    }

    /// The atom's future is gone: forget its result; forget its unread output
    /// too unless the session's output is being iterated (then once read).
    pub fn release(&self, atom: u64) {
        let mut st = self.shared.lock();
        st.atoms.remove(&atom);
        let keep = st.session_reader;
        if let Some(o) = st.atom_output.get_mut(&atom) {
            o.released = true;
            let dropped: Vec<u64> = if keep {
                Vec::new()
            } else {
                o.seqs.drain(..).collect()
            };
            for seq in dropped {
                st.output.remove(&seq);
            }
        }
        st.forget_output_if_finished(atom);
    }

    /// Takes unread output: of one atom, or of the whole session.
    ///
    /// Waits up to `timeout` for some. Returns the chunks and whether the stream
    /// has ended (the atom's `END_OF_OUTPUT` and outcome came and all was read; or, for the
    /// session, it was closed by this client and all was read). A stream cut by
    /// the session's death raises `SessionClosed` once everything delivered was read.
    pub fn read_output(
        &self,
        atom: Option<u64>,
        timeout: Option<Duration>,
        max_bytes: usize,
    ) -> Result<(Vec<Chunk>, bool)> {
        self.flush();
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.shared.lock();
        if atom.is_none() {
            st.session_reader = true;
        }
        loop {
            let chunks = match atom {
                Some(a) => st.take_atom_output(a, max_bytes),
                None => st.take_session_output(max_bytes),
            };
            let drained = match atom {
                Some(a) => st.atom_output.get(&a).is_none_or(|o| o.seqs.is_empty()),
                None => st.output.is_empty(),
            };
            let ended = drained
                && match atom {
                    // END_OF_OUTPUT and RESULT travel on different streams: the
                    // atom's output is over when both have come. (A released
                    // atom's entry vanishes once it is ended and read.)
                    Some(a) => {
                        st.atom_output.get(&a).is_none_or(|o| o.ended)
                            && st.atoms.get(&a).is_none_or(|s| s.done.is_some())
                    }
                    None => st.dead.as_ref().is_some_and(|d| d.by_client),
                };
            if !chunks.is_empty() || ended {
                return Ok((chunks, ended));
            }
            if st.dead.is_some() {
                return Err(self.closed_error(&st));
            }
            st = match self.wait_changed(st, deadline) {
                Some(st) => st,
                None => return Ok((Vec::new(), false)),
            };
        }
    }

    pub fn logs(&self) -> Vec<LogRecord> {
        self.shared.lock().logs.iter().cloned().collect()
    }

    /// The `SessionClosed` message if the session is dead.
    pub fn close_cause(&self) -> Option<String> {
        self.shared.lock().dead.as_ref().map(|d| d.message.clone())
    }

    pub fn is_closed(&self) -> bool {
        self.shared.close_requested.load(Ordering::SeqCst) || self.shared.lock().dead.is_some()
    }

    /// True while the reader thread has not exited.
    pub fn reader_alive(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    /// Ends the session: sends `CLOSE` if the stream is free, wakes the reader
    /// thread so it fails whatever is pending, and joins it. Idempotent.
    pub fn close(&self) {
        if !self.shared.close_requested.swap(true, Ordering::SeqCst) {
            // A writer stuck on a full socket must not keep close() waiting:
            // CLOSE is then left to it, and otherwise written within 1 s; the
            // server ends the session when the streams close anyway.
            if self.shared.lock().dead.is_none() {
                self.outbox.set_write_timeout(Duration::from_secs(1));
                let close = Message::Close.to_frame(0);
                let _ = self.outbox.submit(outbox::Send::Now, |buf| {
                    FrameWriter::new(buf)
                        .write_frame(&close)
                        .map_err(|e| io::Error::other(e.to_string()))
                });
            }
            self.shared
                .trace("close() called: waking the reader thread");
            self.wake.signal();
        }
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
            self.shared.trace("reader thread joined");
        }
    }

    /// Raw fd of the main-stream (tests use it to cut the connection).
    #[cfg(test)]
    pub(crate) fn main_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.outbox.stream().as_raw_fd()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

// A session is shared by every Python thread that uses it.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Session>();
};

/// Before a waiter sleeps on the condition variable it polls the change
/// counter for up to this long (`PYPROXY_WAIT_SPIN_US`, default 150 µs, 0 to
/// disable): a result that arrives meanwhile then costs no thread wake-up
/// (25–30 µs on a VM), which is a quarter of a small atom's round trip.
fn wait_spin() -> Duration {
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        let micros = std::env::var("PYPROXY_WAIT_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_WAIT_SPIN_US);
        Duration::from_micros(micros.min(100_000))
    })
}

const DEFAULT_WAIT_SPIN_US: u64 = 150;

/// One thread of the process polls at a time, so many threads waiting at once
/// (a pool of sessions) cost at most one core.
static POLLING: AtomicBool = AtomicBool::new(false);

/// Returns once `changes` differs from `seen` or `until` passes; yields
/// between polls so the threads that produce the result are never kept off a core.
/// Does nothing while another thread holds `polling`.
fn poll_for_change(polling: &AtomicBool, changes: &AtomicU64, seen: u64, until: Instant) {
    if Instant::now() >= until || polling.swap(true, Ordering::AcqRel) {
        return;
    }
    while changes.load(Ordering::Acquire) == seen && Instant::now() < until {
        std::thread::yield_now();
    }
    polling.store(false, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_ends_when_the_counter_changes() {
        let polling = AtomicBool::new(false);
        let changes = Arc::new(AtomicU64::new(3));
        let bump = {
            let changes = changes.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                changes.fetch_add(1, Ordering::Release);
            })
        };
        let start = Instant::now();
        poll_for_change(&polling, &changes, 3, start + Duration::from_secs(30));
        assert_eq!(changes.load(Ordering::Acquire), 4);
        assert!(start.elapsed() < Duration::from_secs(20));
        assert!(
            !polling.load(Ordering::Acquire),
            "the poller lets go of the flag"
        );
        bump.join().unwrap();
    }

    #[test]
    fn polling_without_a_change_ends_at_its_limit() {
        let polling = AtomicBool::new(false);
        let changes = AtomicU64::new(0);
        let until = Instant::now() + Duration::from_millis(30);
        poll_for_change(&polling, &changes, 0, until);
        assert!(Instant::now() >= until);
        assert!(!polling.load(Ordering::Acquire));
    }

    #[test]
    fn only_one_thread_polls_at_a_time() {
        let polling = AtomicBool::new(true);
        let changes = AtomicU64::new(0);
        let start = Instant::now();
        poll_for_change(&polling, &changes, 0, start + Duration::from_secs(30));
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "returned without polling"
        );
        assert!(
            polling.load(Ordering::Acquire),
            "the other poller's flag is left alone"
        );
    }
}
