//! One PyProxy session on the server: its two streams, its threads, the sink
//! the engine delivers through, and its teardown.
//!
//! The main-stream's connection thread owns the session: it reads requests
//! until the session ends, then tears everything down in a fixed order. Every
//! other party that can end a session — the output-stream watcher, the
//! attach-deadline sweep, server shutdown, a writer that hits a dead socket —
//! calls [`Session::end`], which records the first reason and shuts the
//! main-stream's read side, so the owner wakes up and does the teardown. One
//! owner, one teardown path.
//!
//! Threads of a session (all counted in its [`ThreadGroup`]):
//! - owner: reads main-stream frames; ends at the first end reason.
//! - main writer: `main_rx` → main-stream; started when a frame first has to
//!   queue (most sessions never need it).
//! - output writer: output and log queues → output-stream, GOODBYE last; the
//!   output-stream's connection thread, from ATTACH on.
//!
//! The output-stream's close is noticed by the server's one [`OutWatch`](super::out_watch::OutWatch)
//! thread (an `epoll` set over every attached output-stream), which ends the
//! session.
//!
//! The writer threads carry only what cannot be written at once: a sink call
//! (on an engine thread) sends a small frame straight to the socket when the
//! stream's writer is idle and nothing is queued ahead of it ([`Line`]), so a
//! short atom's END_OF_OUTPUT and RESULT wake no writer thread.
//!
//! Writers stop when the session's `ended` channel disconnects (its only
//! sender is dropped by `end`): they drain what is queued, then return.
//!
//! RESULTs leave in the order the EVALs arrived (docs/protocol.md): the engine
//! answers a session's atoms in order, and an atom the server answers itself
//! (version mismatch, shutdown, cancelled before it started) waits in
//! [`Answers`] until every atom before it has been answered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use crossbeam::channel::{bounded, unbounded, Receiver, Sender};
use crossbeam::select;
use slog::{debug, info, o, warn, Logger};

use crate::engine::{AtomRequest, SessionSink};
use crate::protocol::{
    self, auth, AtomKind, AtomResult, ErrorCode, ErrorMsg, FailureOrigin, Frame, FrameReader,
    FrameWriter, Hello, Message, Output, NONCE_LEN,
};

use super::handshake::Challenger;
use super::listener::Shared;
use super::logging::LOG_QUEUE;
use super::out_watch::Stirred;
use super::registry::{AttachRefused, ConnSlot};
use super::threads::{GroupHandle, Never, ThreadGroup};
use super::BackendSession;

/// Output is queued in pieces of at most this many bytes (whole lines, unless
/// a line is longer), so the queue's capacity bounds its memory.
pub const OUTPUT_PIECE: usize = 64 * 1024;
/// RESULT frames queued for the main writer before the engine waits.
const MAIN_QUEUE: usize = 16;
/// How long teardown lets writers drain what is queued before cutting the sockets.
const LINGER: Duration = Duration::from_secs(2);
/// How long teardown waits for the session's threads after cutting the sockets.
const THREAD_WAIT: Duration = Duration::from_secs(10);

type Reader = FrameReader<BufReader<TcpStream>>;

/// What starting the main writer takes. Most sessions never start it: their
/// answers leave directly ([`Line`]), and a thread per session fewer is what
/// W7's thousand sessions and every session's start (a thread hand-off) save.
struct MainWriterStart {
    writer: Writer,
    rx: Receiver<Frame>,
    group: GroupHandle,
    shared: Weak<Shared>,
}

/// What the output-stream's connection thread writes once attached.
struct OutputWriter {
    writer: Writer,
    out_rx: Receiver<Frame>,
    log_rx: Receiver<Frame>,
    goodbye_rx: Receiver<Frame>,
}
type Writer = FrameWriter<BufWriter<TcpStream>>;

/// Why a session ended. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent CLOSE.
    ClientClosed,
    MainStreamClosed,
    OutputStreamClosed,
    /// A stream failed (not a clean close).
    StreamError(String),
    /// The client broke the protocol; the text was sent in an ERROR.
    ProtocolError(String),
    /// The output-stream did not attach within `--attach-timeout`.
    AttachTimeout,
    ServerShutdown,
    /// The engine could not serve the session.
    EngineFailed(String),
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::ClientClosed => write!(f, "client sent CLOSE"),
            EndReason::MainStreamClosed => write!(f, "main-stream closed by the client"),
            EndReason::OutputStreamClosed => write!(f, "output-stream closed by the client"),
            EndReason::StreamError(e) => write!(f, "stream failed: {e}"),
            EndReason::ProtocolError(e) => write!(f, "protocol error: {e}"),
            EndReason::AttachTimeout => write!(f, "output-stream did not attach in time"),
            EndReason::ServerShutdown => write!(f, "server shutting down"),
            EndReason::EngineFailed(e) => write!(f, "engine failed: {e}"),
        }
    }
}

impl EndReason {
    /// The server ended the session (so it says GOODBYE); the client did not.
    fn said_by_server(&self) -> bool {
        matches!(
            self,
            EndReason::ProtocolError(_)
                | EndReason::AttachTimeout
                | EndReason::ServerShutdown
                | EndReason::EngineFailed(_)
        )
    }
}

/// Where a session is in its life. Transitions only forward, under `state`.
enum State {
    /// Before ATTACH: the output-side receivers wait here for the writer, and
    /// atoms are held (not yet submitted) so none of their output can be lost.
    AwaitingAttach {
        out_rx: Receiver<Frame>,
        log_rx: Receiver<Frame>,
        goodbye_rx: Receiver<Frame>,
        held: Vec<AtomRequest>,
        group: GroupHandle,
    },
    /// The output writer runs; `output` is a clone kept to shut the socket.
    Attached {
        output: TcpStream,
    },
    Ended,
}

/// Shared state of one session. Invariant: once `ended_tx` is `None` the
/// session never starts anything again.
pub struct Session {
    pub id: u64,
    secret: [u8; NONCE_LEN],
    pub peer: SocketAddr,
    opened: Instant,
    pub attach_deadline: Instant,
    pub log: Logger,
    /// A clone of the main-stream, to wake the owner by shutting its read side.
    main_stream: TcpStream,
    state: Mutex<State>,
    ended_tx: Mutex<Option<Sender<Never>>>,
    ended_rx: Receiver<Never>,
    reason: Mutex<Option<EndReason>>,
    engine: Mutex<Option<Box<dyn BackendSession>>>,
    /// Atoms accepted and not yet answered, and the answers waiting for their turn.
    answers: Mutex<Answers>,
    out_tx: Sender<Frame>,
    goodbye_tx: Sender<Frame>,
    main_tx: Sender<Frame>,
    out_line: Line,
    main_line: Line,
    /// The main writer's start, until a frame first has to queue for it.
    main_writer: Mutex<Option<MainWriterStart>>,
    /// This session, for the thread [`Session::start_main_writer`] starts.
    me: Weak<Session>,
    /// The server is shutting down: new atoms are refused.
    draining: AtomicBool,
    max_frame: u32,
    max_pipelined: usize,
    /// `major.minor` of the client's Python and the engine's (pickled code needs both equal).
    client_python: String,
    engine_python: String,
    debug: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `3.13.1` → `3.13`.
pub fn major_minor(version: &str) -> &str {
    match version.match_indices('.').nth(1) {
        Some((i, _)) => &version[..i],
        None => version,
    }
}

/// Splits `lines` into pieces of at most `max` bytes at line ends (a single
/// longer line becomes its own piece).
pub fn split_pieces(lines: Vec<u8>, max: usize) -> Vec<Vec<u8>> {
    if lines.len() <= max {
        return vec![lines];
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < lines.len() {
        let end = (start + max).min(lines.len());
        let cut = if end == lines.len() {
            end
        } else {
            match lines[start..end].iter().rposition(|&b| b == b'\n') {
                Some(p) => start + p + 1,
                None => lines[end..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(lines.len(), |p| end + p + 1),
            }
        };
        out.push(lines[start..cut].to_vec());
        start = cut;
    }
    out
}

fn exception(origin: FailureOrigin, type_name: &str, message: String) -> AtomResult {
    AtomResult::failure(origin, type_name, message, 0)
}

/// Accepted atoms in arrival order, so RESULTs leave in that order.
/// Invariant: the front of `order` never has an entry in `ready` after a call returns.
#[derive(Default)]
struct Answers {
    order: VecDeque<u64>,
    live: HashSet<u64>,
    /// Main-stream frames decided before their turn.
    ready: HashMap<u64, Frame>,
}

/// A stream's writing side, shared by its writer thread and the engine's
/// direct path: a frame produced while the writer is idle and nothing is
/// queued goes straight to the socket from the calling (executor) thread, with
/// a non-blocking `send`, instead of waking the writer thread for it.
struct Line {
    /// Held by whoever writes to the socket; the writer thread's buffer is
    /// always flushed before it lets go. Inside: frames held back to leave
    /// with later ones, which whoever takes the gate to write sends first.
    gate: Mutex<Held>,
    /// Frames put on the queue and not yet written (counted before the push):
    /// while any are, new frames queue behind them, so order is kept.
    queued: AtomicUsize,
    /// The socket, once frames may be written to it (the output-stream after ATTACHED).
    stream: OnceLock<TcpStream>,
}

/// RESULTs of atoms that another atom of the session follows at once on the
/// same executor, held back so that a pipelined run of atoms answers in a few
/// writes instead of one per atom (each write woke the client's session thread
/// and cost the executor the whole loopback TCP path). Bounded by
/// [`HOLD_FRAMES`] and [`HOLD_BYTES`]; the engine flushes them when the run
/// ends, and the executor's pump when the next atom runs past its tick (~1 ms).
#[derive(Default)]
struct Held {
    frames: Vec<Frame>,
    bytes: usize,
    /// The bytes of one send, kept between sends so that answering an atom
    /// allocates nothing (at most [`KEEP_SEND_BUFFER`] of it is kept).
    buf: Vec<u8>,
}

impl Held {
    fn take(&mut self) -> Vec<Frame> {
        self.bytes = 0;
        std::mem::take(&mut self.frames)
    }
}

const KEEP_SEND_BUFFER: usize = 16 * 1024;

const HOLD_FRAMES: usize = 32;
const HOLD_BYTES: usize = 64 * 1024;

impl Line {
    fn new() -> Line {
        Line {
            gate: Mutex::new(Held::default()),
            queued: AtomicUsize::new(0),
            stream: OnceLock::new(),
        }
    }
}

/// Frames up to this size may take the direct path; larger ones (big results)
/// go through the writer thread, which copies nothing.
const DIRECT_MAX: usize = 64 * 1024;

impl Session {
    pub fn secret(&self) -> &[u8; NONCE_LEN] {
        &self.secret
    }

    pub fn is_ended(&self) -> bool {
        lock(&self.ended_tx).is_none()
    }

    pub fn is_awaiting_attach(&self) -> bool {
        matches!(*lock(&self.state), State::AwaitingAttach { .. })
    }

    pub fn reason(&self) -> Option<EndReason> {
        lock(&self.reason).clone()
    }

    /// Ends the session for good (idempotent; the first reason is kept):
    /// writers drain and stop, the owner wakes up and tears down.
    pub fn end(&self, reason: EndReason) {
        {
            let mut r = lock(&self.reason);
            if r.is_none() {
                if reason.said_by_server() {
                    let goodbye = Message::Goodbye {
                        reason: reason.to_string(),
                    };
                    let _ = self.goodbye_tx.try_send(goodbye.to_frame(0));
                }
                *r = Some(reason);
            }
        }
        drop(lock(&self.ended_tx).take());
        let _ = self.main_stream.shutdown(Shutdown::Read);
    }

    /// Tells the client why on the main-stream (ERROR, request id 0), then ends the session.
    pub fn fail(&self, code: ErrorCode, message: String, reason: EndReason) {
        self.main_line.queued.fetch_add(1, Ordering::SeqCst);
        self.start_main_writer();
        if self
            .main_tx
            .try_send(Message::Error(ErrorMsg { code, message }).to_frame(0))
            .is_err()
        {
            self.main_line.queued.fetch_sub(1, Ordering::SeqCst);
        }
        self.end(reason);
    }

    /// Refuses new atoms from now on (they get a RESULT of origin SHUTDOWN).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Atoms accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        lock(&self.answers).live.len()
    }

    /// Sends the main-stream answer for `atom` once every earlier atom is
    /// answered. Sends under the lock, so two answerers cannot reorder. With
    /// `hold`, the answers may wait for later ones (see [`Held`]).
    fn complete(&self, atom: u64, frame: Frame, hold: bool) {
        let mut a = lock(&self.answers);
        if !a.live.contains(&atom) {
            // Not an accepted atom (e.g. answered already): pass it on unordered.
            drop(a);
            return self.push_main(frame);
        }
        a.ready.insert(atom, frame);
        while let Some(&head) = a.order.front() {
            let Some(f) = a.ready.remove(&head) else {
                break;
            };
            a.order.pop_front();
            a.live.remove(&head);
            self.push_on(&self.main_line, &self.main_tx, f, "main-stream", hold);
        }
    }

    /// Sends the main-stream frames held back, if any (see [`Held`]). Never
    /// waits for the socket; never waits for the gate either: whoever holds it
    /// sends the held frames before anything else.
    fn flush_held(&self) {
        let line = &self.main_line;
        // In the order `complete` takes them: the frames this may queue must
        // not be overtaken by a RESULT queued meanwhile.
        let _answers = lock(&self.answers);
        let Ok(held) = line.gate.try_lock() else {
            return;
        };
        if held.frames.is_empty() {
            return;
        }
        self.send_held(line, held, &self.main_tx, "main-stream");
    }

    /// Sends on a session queue, giving up when the session ends.
    fn push(&self, tx: &Sender<Frame>, frame: Frame) {
        if self.is_ended() {
            return;
        }
        select! {
            send(tx, frame) -> _ => {},
            recv(self.ended_rx) -> _ => {},
        }
    }

    fn push_output(&self, frame: Frame) {
        self.push_on(&self.out_line, &self.out_tx, frame, "output-stream", false);
    }

    fn push_main(&self, frame: Frame) {
        self.push_on(&self.main_line, &self.main_tx, frame, "main-stream", false);
    }

    /// Writes `frame` to the socket at once if the stream's writer is idle and
    /// nothing is queued (with `hold`, possibly later: see [`Held`]); otherwise
    /// queues it for the writer thread.
    fn push_on(&self, line: &Line, tx: &Sender<Frame>, frame: Frame, stream: &str, hold: bool) {
        if let Err(frame) = self.send_direct(line, frame, tx, stream, hold) {
            line.queued.fetch_add(1, Ordering::SeqCst);
            self.writer_for(line);
            self.push(tx, frame);
        }
    }

    /// Makes sure the writer of `line` runs before a frame queues for it.
    fn writer_for(&self, line: &Line) {
        if std::ptr::eq(line, &self.main_line) {
            self.start_main_writer();
        }
    }

    /// Starts the main writer, once; a failed start ends the session.
    fn start_main_writer(&self) {
        let Some(start) = lock(&self.main_writer).take() else {
            return;
        };
        let (Some(me), Some(shared)) = (self.me.upgrade(), start.shared.upgrade()) else {
            return;
        };
        let MainWriterStart {
            writer, rx, group, ..
        } = start;
        if let Err(e) = shared.spawn(
            format!("pyproxy-main-{}", self.id),
            Some(&group),
            move || me.main_writer(writer, rx),
        ) {
            self.end(EndReason::StreamError(format!(
                "cannot start main writer: {e}"
            )));
        }
    }

    /// The direct path: Ok if `frame` was written, held, queued behind held
    /// frames, or the stream failed (then the session is ended); Err gives it
    /// back for the queue.
    fn send_direct(
        &self,
        line: &Line,
        frame: Frame,
        tx: &Sender<Frame>,
        stream: &str,
        hold: bool,
    ) -> Result<(), Frame> {
        if frame.payload_len() > DIRECT_MAX || line.stream.get().is_none() {
            return Err(frame);
        }
        let Ok(mut held) = line.gate.try_lock() else {
            return Err(frame);
        };
        if line.queued.load(Ordering::SeqCst) != 0 || self.is_ended() {
            return Err(frame);
        }
        let size = frame.payload_len() + protocol::frame::HEADER_SIZE;
        if hold && held.frames.len() < HOLD_FRAMES && held.bytes + size <= HOLD_BYTES {
            held.bytes += size;
            held.frames.push(frame);
            return Ok(());
        }
        held.frames.push(frame);
        self.send_held(line, held, tx, stream);
        Ok(())
    }

    /// Sends the frames in the gate with one non-blocking `send`, holding the
    /// gate. What the socket does not take at all (client not reading:
    /// `EAGAIN`) goes to the queue, which is what bounds memory and slows only
    /// this session; a frame it takes in part is completed here, blocking, so
    /// frames never interleave.
    fn send_held(
        &self,
        line: &Line,
        mut gate: MutexGuard<'_, Held>,
        tx: &Sender<Frame>,
        stream: &str,
    ) {
        let Some(sock) = line.stream.get() else {
            return;
        };
        let held = &mut *gate;
        held.bytes = 0;
        held.buf.clear();
        for f in &held.frames {
            f.append_to(&mut held.buf);
        }
        // SAFETY: a send from our buffer on a socket this session keeps open.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                held.buf.as_ptr().cast(),
                held.buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        // EAGAIN or a failed socket: nothing was sent. The queue takes all; on a
        // failed socket the writer thread finds out and ends the session.
        let n = n.max(0) as usize;
        let (mut sent, mut end) = (0, 0);
        for f in &held.frames {
            let next = end + f.payload_len() + protocol::frame::HEADER_SIZE;
            if next > n {
                if n > end {
                    // The frame the socket took in part is finished here.
                    if let Err(e) = (&mut &*sock).write_all(&held.buf[n..next]) {
                        self.writer_failed(stream, protocol::Error::Io(e));
                    }
                    sent += 1;
                }
                break;
            }
            end = next;
            sent += 1;
        }
        if held.buf.capacity() > KEEP_SEND_BUFFER {
            held.buf = Vec::new();
        }
        if sent == held.frames.len() {
            held.frames.clear();
            return;
        }
        let rest: Vec<Frame> = held.frames.drain(sent..).collect();
        held.frames.clear();
        // Counted before the gate is let go, so no direct write overtakes them.
        line.queued.fetch_add(rest.len(), Ordering::SeqCst);
        drop(gate);
        self.writer_for(line);
        for f in rest {
            self.push(tx, f);
        }
    }

    /// Answers an accepted atom without running it: its RESULT in its turn,
    /// which also ends its (empty) output.
    fn answer_now(&self, atom: u64, mut result: AtomResult) {
        result.ends_output = true;
        self.complete(atom, Message::Result(result).to_frame(atom), false);
    }

    /// Refuses an atom that was not accepted: an ERROR with its id, at once
    /// (ERRORs are not part of the RESULT order), and END_OF_OUTPUT.
    fn error_for(&self, atom: u64, code: ErrorCode, message: String) {
        self.push_main(Message::Error(ErrorMsg { code, message }).to_frame(atom));
        self.push_output(Message::EndOfOutput.to_frame(atom));
    }

    fn trace(&self, step: &str) {
        if self.debug {
            info!(self.log, "teardown"; "step" => step);
        }
    }

    /// Binds the output-stream (already checked against the secret). Under the
    /// state lock: sends ATTACHED, submits the held atoms, has the stream
    /// watched for a close. Returns the session's group and, unless the
    /// session ended meanwhile, what the calling thread then writes as the
    /// session's output writer.
    fn attach(
        self: &Arc<Self>,
        shared: &Shared,
        output: &TcpStream,
        mut writer: Writer,
    ) -> Result<(GroupHandle, Option<OutputWriter>), AttachRefused> {
        let mut state = lock(&self.state);
        if self.is_ended() {
            return Err(AttachRefused::UnknownSession);
        }
        match &*state {
            State::AwaitingAttach { .. } => {}
            State::Attached { .. } => return Err(AttachRefused::AlreadyAttached),
            State::Ended => return Err(AttachRefused::UnknownSession),
        }
        let clone = output
            .try_clone()
            .map_err(|_| AttachRefused::UnknownSession)?;
        let State::AwaitingAttach {
            out_rx,
            log_rx,
            goodbye_rx,
            held,
            group,
        } = std::mem::replace(&mut *state, State::Attached { output: clone })
        else {
            unreachable!("checked above")
        };
        // The held atoms start before ATTACHED is written and the stream is
        // watched (W5: ~50 µs sooner). Their output still follows ATTACHED:
        // it queues for the output writer, which starts after this returns.
        if let Some(engine) = lock(&self.engine).as_ref() {
            for atom in held {
                engine.submit(atom);
            }
        }
        let attached = Message::Attached {
            session_id: self.id,
        }
        .to_frame(0);
        if let Err(e) = writer.write_frame(&attached).and_then(|()| writer.flush()) {
            drop(state);
            self.end(EndReason::StreamError(format!("writing ATTACHED: {e}")));
            return Ok((group, None));
        }
        let watched = output.try_clone().and_then(|direct| {
            let fd = direct.as_raw_fd();
            let _ = self.out_line.stream.set(direct);
            shared.out_watch.watch(self, fd)
        });
        if let Err(e) = watched {
            drop(state);
            self.end(EndReason::StreamError(format!(
                "cannot watch the output-stream: {e}"
            )));
            return Ok((group, None));
        }
        let output_writer = OutputWriter {
            writer,
            out_rx,
            log_rx,
            goodbye_rx,
        };
        Ok((group, Some(output_writer)))
    }

    /// The client sent on its output-stream after ATTACH (`bytes` begin what it sent).
    fn client_sent_on_output(&self, bytes: &[u8]) {
        let what = match bytes.get(4).map(|&k| protocol::Kind::try_from(k)) {
            Some(Ok(kind)) => format!("{kind}"),
            _ => "bytes".to_owned(),
        };
        let message =
            format!("{what} on the output-stream: it carries no client frames after ATTACH");
        warn!(self.log, "closing session after a protocol error"; "error" => &message);
        let err = Message::Error(ErrorMsg {
            code: ErrorCode::UnexpectedMessage,
            message: message.clone(),
        })
        .to_frame(0);
        let _ = self.goodbye_tx.try_send(err);
        self.end(EndReason::ProtocolError(message));
    }

    /// The output-stream's file descriptor, once attached (open until the session is dropped).
    pub fn output_fd(&self) -> Option<std::os::fd::RawFd> {
        self.out_line.stream.get().map(AsRawFd::as_raw_fd)
    }

    /// The output-stream became readable (see [`OutWatch`](super::out_watch::OutWatch)): the client closed
    /// it, or sent on it, which it must not do after ATTACH. Either ends the session.
    pub fn output_stream_stirred(&self) -> Stirred {
        let Some(stream) = self.out_line.stream.get() else {
            return Stirred::Nothing;
        };
        let mut buf = [0u8; protocol::frame::HEADER_SIZE];
        // SAFETY: a non-blocking read into our buffer from a socket this session keeps open.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(0) => self.end(EndReason::OutputStreamClosed),
            Ok(n) => self.client_sent_on_output(&buf[..n]),
            Err(_) => {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {
                        return Stirred::Nothing
                    }
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => {
                        self.end(EndReason::OutputStreamClosed)
                    }
                    _ if self.is_ended() => {}
                    _ => self.end(EndReason::StreamError(format!(
                        "reading output-stream: {e}"
                    ))),
                }
            }
        }
        Stirred::Ended
    }

    /// Writes the output-stream's queues until the session ends, then what is left.
    fn output_writer(&self, queues: OutputWriter) {
        let OutputWriter {
            writer: mut w,
            out_rx,
            log_rx,
            goodbye_rx,
        } = queues;
        let line = &self.out_line;
        let result = (|| -> protocol::Result<()> {
            loop {
                let next = select! {
                    recv(out_rx) -> f => f.ok().map(|f| (f, 1)),
                    recv(log_rx) -> f => f.ok().map(|f| (f, 0)),
                    recv(self.ended_rx) -> _ => None,
                };
                let Some((first, counted)) = next else {
                    break;
                };
                // Everything queued by now goes out in this batch, one flush.
                let _gate = lock(&line.gate);
                let mut written = counted;
                let batch = (|| -> protocol::Result<()> {
                    w.write_frame(&first)?;
                    loop {
                        if let Ok(f) = out_rx.try_recv() {
                            written += 1;
                            w.write_frame(&f)?;
                        } else if let Ok(f) = log_rx.try_recv() {
                            w.write_frame(&f)?;
                        } else {
                            break;
                        }
                    }
                    w.flush()
                })();
                line.queued.fetch_sub(written, Ordering::SeqCst);
                batch?;
            }
            // Ended: send what was queued before the end, GOODBYE last, then stop.
            let _gate = lock(&line.gate);
            for q in [&out_rx, &log_rx, &goodbye_rx] {
                for f in q.try_iter().take(q.capacity().unwrap_or(LOG_QUEUE).max(1)) {
                    w.write_frame(&f)?;
                }
            }
            w.flush()
        })();
        if let Err(e) = result {
            self.writer_failed("output-stream", e);
        }
    }

    /// Writes `main_rx` to the main-stream until the session ends, then what is left.
    fn main_writer(self: Arc<Self>, mut w: Writer, main_rx: Receiver<Frame>) {
        let line = &self.main_line;
        let result = (|| -> protocol::Result<()> {
            loop {
                let next = select! {
                    recv(main_rx) -> f => f.ok(),
                    recv(self.ended_rx) -> _ => None,
                };
                let Some(first) = next else {
                    break;
                };
                let mut gate = lock(&line.gate);
                let mut written = 1;
                let batch = (|| -> protocol::Result<()> {
                    // Held frames are older than anything queued.
                    for f in gate.take() {
                        w.write_frame(&f)?;
                    }
                    w.write_frame(&first)?;
                    while let Ok(f) = main_rx.try_recv() {
                        written += 1;
                        w.write_frame(&f)?;
                    }
                    w.flush()
                })();
                line.queued.fetch_sub(written, Ordering::SeqCst);
                batch?;
            }
            let mut gate = lock(&line.gate);
            for f in gate.take() {
                w.write_frame(&f)?;
            }
            for f in main_rx.try_iter().take(MAIN_QUEUE) {
                w.write_frame(&f)?;
            }
            w.flush()
        })();
        if let Err(e) = result {
            self.writer_failed("main-stream", e);
        }
    }

    fn writer_failed(&self, stream: &str, e: protocol::Error) {
        if e.is_disconnect() {
            self.end(if stream == "main-stream" {
                EndReason::MainStreamClosed
            } else {
                EndReason::OutputStreamClosed
            });
        } else {
            self.end(EndReason::StreamError(format!("writing {stream}: {e}")));
        }
    }

    /// Handles one EVAL from the owner's read loop.
    fn on_eval(&self, atom: u64, eval: protocol::Eval) {
        {
            let mut a = lock(&self.answers);
            if a.live.contains(&atom) {
                drop(a);
                return self.push_main(
                    Message::Error(ErrorMsg {
                        code: ErrorCode::UnexpectedMessage,
                        message: format!("atom id {atom} is already in flight on this session"),
                    })
                    .to_frame(atom),
                );
            }
            if a.live.len() >= self.max_pipelined {
                drop(a);
                warn!(self.log, "atom refused: too many in flight"; "atom" => atom, "max_pipelined" => self.max_pipelined);
                return self.error_for(
                    atom,
                    ErrorCode::LimitExceeded,
                    format!(
                        "more than {} atoms in flight on this session (--max-pipelined)",
                        self.max_pipelined
                    ),
                );
            }
            a.live.insert(atom);
            a.order.push_back(atom);
        }
        if self.draining.load(Ordering::SeqCst) {
            return self.answer_now(
                atom,
                exception(
                    FailureOrigin::Shutdown,
                    "ServerShuttingDown",
                    "the server is shutting down and accepts no new atoms".into(),
                ),
            );
        }
        if eval.kind != AtomKind::Source && self.client_python != self.engine_python {
            let what = if eval.kind == AtomKind::Code {
                "a code object"
            } else {
                "a pickled function"
            };
            let client = if self.client_python.is_empty() {
                "(unknown)"
            } else {
                &self.client_python
            };
            return self.answer_now(
                atom,
                exception(
                    FailureOrigin::VersionMismatch,
                    "VersionMismatch",
                    format!(
                        "this atom is {what}, which needs the same Python minor version on both \
                         ends: the client runs Python {client}, the server Python {}; \
                         send source text instead, or match the versions",
                        self.engine_python
                    ),
                ),
            );
        }
        let request = AtomRequest {
            id: atom,
            kind: eval.kind,
            payload: eval.payload,
            globals: eval.globals,
            locals: eval.locals,
            buffers: eval.buffers,
            timeout: eval.timeout_ms.map(Duration::from_millis),
        };
        let mut state = lock(&self.state);
        match &mut *state {
            State::AwaitingAttach { held, .. } => held.push(request),
            State::Attached { .. } => {
                if let Some(engine) = lock(&self.engine).as_ref() {
                    engine.submit(request);
                }
            }
            State::Ended => {}
        }
    }

    fn on_cancel(&self, target: u64) {
        let mut state = lock(&self.state);
        if let State::AwaitingAttach { held, .. } = &mut *state {
            if let Some(i) = held.iter().position(|a| a.id == target) {
                held.remove(i);
                drop(state);
                info!(self.log, "atom cancelled before it started"; "atom" => target);
                return self.answer_now(
                    target,
                    exception(
                        FailureOrigin::Cancelled,
                        "AtomCancelled",
                        format!("atom {target} was cancelled before it started"),
                    ),
                );
            }
            return;
        }
        drop(state);
        let found = lock(&self.engine)
            .as_ref()
            .is_some_and(|e| e.cancel(target));
        debug!(self.log, "cancel"; "atom" => target, "found" => found);
    }

    /// Marks the session ended for everyone: unregisters it and returns the
    /// output-stream (if attached). Held atoms and unread queues are dropped.
    fn seal(&self) -> Option<TcpStream> {
        match std::mem::replace(&mut *lock(&self.state), State::Ended) {
            State::Attached { output } => Some(output),
            _ => None,
        }
    }
}

/// The engine's view of a session: turns sink calls into queued frames.
struct Sink {
    session: Arc<Session>,
    /// The last atom that wrote output (0: none yet; atom ids start at 1). Output
    /// comes only from the running atom and before its `finish`, so an atom
    /// finished while it is not this one wrote nothing, even when a cancelled
    /// queued atom finishes while another one runs.
    wrote_output: AtomicU64,
}

impl SessionSink for Sink {
    fn output(&self, atom: u64, fd: u8, mut lines: Vec<u8>) {
        // The engine may end a call with a piece that has no newline (an atom's final
        // partial line, or a piece of an over-long line); on the wire every line ends
        // in one (docs/protocol.md, OUTPUT), so the receiver just splits on it.
        if lines.last() != Some(&b'\n') {
            lines.push(b'\n');
        }
        self.wrote_output.store(atom, Ordering::Release);
        for data in split_pieces(lines, OUTPUT_PIECE) {
            self.session
                .push_output(Message::Output(Output { fd, data }).to_frame(atom));
        }
    }

    /// RESULT first (a round trip waits only for it), then END_OF_OUTPUT, or
    /// none when the atom wrote nothing and the RESULT says so.
    fn finish(&self, atom: u64, result: AtomResult) {
        self.answer(atom, result, false);
    }

    /// An atom that wrote nothing may have its RESULT held (see [`Held`]); one
    /// that wrote output is answered at once, as its output's end waits for it.
    fn finish_with_more(&self, atom: u64, result: AtomResult) {
        self.answer(atom, result, true);
    }

    fn flush(&self) {
        self.session.flush_held();
    }
}

impl Sink {
    fn answer(&self, atom: u64, mut result: AtomResult, more: bool) {
        let wrote = self.wrote_output.load(Ordering::Acquire) == atom;
        result.ends_output = !wrote;
        let mut frame = Message::Result(result).into_frame(atom);
        let limit = self.session.max_frame as usize;
        if frame.payload_len() + protocol::frame::HEADER_BODY_SIZE > limit {
            warn!(self.session.log, "result too large for a frame"; "atom" => atom, "bytes" => frame.payload_len());
            let too_large = exception(
                FailureOrigin::ServerError,
                "ResultTooLarge",
                format!(
                    "the atom's result is {} bytes, more than the frame limit of {} bytes (--max-frame)",
                    frame.payload_len(),
                    limit
                ),
            );
            frame = Message::Result(AtomResult {
                ends_output: !wrote,
                ..too_large
            })
            .to_frame(atom);
        }
        self.session.complete(atom, frame, more && !wrote);
        if wrote {
            self.session
                .push_output(Message::EndOfOutput.to_frame(atom));
        }
    }
}

/// Runs a main-stream after a checked HELLO: registers the session, answers
/// WELCOME, reads requests until the session ends, tears down.
pub fn run_main(
    shared: &Arc<Shared>,
    stream: TcpStream,
    mut reader: Reader,
    mut writer: Writer,
    hello: Hello,
    challenger: &Challenger,
    slot: ConnSlot,
) {
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let refuse = |writer: &mut Writer, code: ErrorCode, message: String| {
        let frame = Message::Error(ErrorMsg { code, message }).to_frame(0);
        let _ = writer.write_frame(&frame).and_then(|()| writer.flush());
    };
    if shared.is_stopping() {
        refuse(
            &mut writer,
            ErrorCode::Internal,
            "the server is shutting down".into(),
        );
        return;
    }
    let id = shared.registry.allocate_id();
    let secret = match auth::random_nonce() {
        Ok(s) => s,
        Err(e) => {
            warn!(shared.log, "cannot draw an attach secret"; "error" => %e);
            refuse(
                &mut writer,
                ErrorCode::Internal,
                "the server could not draw a secret".into(),
            );
            return;
        }
    };
    let Ok(main_clone) = stream.try_clone() else {
        refuse(
            &mut writer,
            ErrorCode::Internal,
            "the server is out of file descriptors".into(),
        );
        return;
    };
    let log = shared.log.new(o!("session" => id));
    let limits = &shared.limits;
    let out_cap = (limits.max_output_buffer / OUTPUT_PIECE).max(2);
    let (out_tx, out_rx) = bounded(out_cap);
    let (log_tx, log_rx) = unbounded();
    let (goodbye_tx, goodbye_rx) = bounded(2);
    let (main_tx, main_rx) = bounded(MAIN_QUEUE);
    let (ended_tx, ended_rx) = bounded(0);
    let mut group = ThreadGroup::new();
    let now = Instant::now();
    let session = Arc::new_cyclic(|me| Session {
        id,
        secret,
        peer,
        opened: now,
        attach_deadline: now + limits.attach_timeout,
        log: log.clone(),
        main_stream: main_clone,
        state: Mutex::new(State::AwaitingAttach {
            out_rx,
            log_rx,
            goodbye_rx,
            held: Vec::new(),
            group: group.handle(),
        }),
        ended_tx: Mutex::new(Some(ended_tx)),
        ended_rx,
        reason: Mutex::new(None),
        engine: Mutex::new(None),
        answers: Mutex::new(Answers::default()),
        out_tx,
        goodbye_tx,
        main_tx,
        out_line: Line::new(),
        main_line: Line::new(),
        main_writer: Mutex::new(None),
        me: me.clone(),
        draining: AtomicBool::new(false),
        max_frame: limits.max_frame,
        max_pipelined: limits.max_pipelined,
        client_python: major_minor(&hello.python_version).to_owned(),
        engine_python: major_minor(shared.backend.python_version()).to_owned(),
        debug: shared.debug,
    });
    shared.routes.add(id, log_tx);
    if let Err(max) = shared.registry.insert(Arc::clone(&session)) {
        shared.routes.remove(id);
        warn!(shared.log, "session refused: too many sessions"; "peer" => %peer, "max_sessions" => max);
        refuse(
            &mut writer,
            ErrorCode::LimitExceeded,
            format!("the server already has {max} sessions open (--max-sessions)"),
        );
        return;
    }
    let sink: Arc<dyn SessionSink> = Arc::new(Sink {
        session: Arc::clone(&session),
        wrote_output: AtomicU64::new(0),
    });
    let backend = challenger.backend_for(&hello.backend).to_owned();
    match shared.backend.open_named(&backend, id, sink, log.clone()) {
        Ok(engine) => *lock(&session.engine) = Some(engine),
        Err(e) => {
            // Logged once, by `session ended` (WARN, reason "engine failed: …").
            refuse(
                &mut writer,
                ErrorCode::Internal,
                format!("the server could not open a session: {e}"),
            );
            session.end(EndReason::EngineFailed(e));
        }
    }
    if !session.is_ended() {
        let welcome = challenger.welcome(
            &hello,
            id,
            secret,
            (
                shared.backend.implementation(),
                shared.backend.python_version(),
            ),
            shared.wire_limits(),
        );
        let sent = writer.write_frame(&welcome).and_then(|()| writer.flush());
        // Reads time out so that a frame that stalls half-way is noticed
        // (`FrameReader::set_frame_timeout`); waiting between frames has no limit.
        let timeouts = stream
            .set_read_timeout(Some(shared.limits.frame_timeout))
            .and_then(|()| stream.set_write_timeout(None));
        match (sent, timeouts) {
            (Ok(()), Ok(())) => {
                if let Ok(direct) = stream.try_clone() {
                    let _ = session.main_line.stream.set(direct);
                }
                info!(log, "client connected";
                    "peer" => %peer, "client" => &hello.client,
                    "client_python" => &hello.python_version,
                    "client_implementation" => &hello.implementation,
                    "backend" => &backend);
                *lock(&session.main_writer) = Some(MainWriterStart {
                    writer,
                    rx: main_rx,
                    group: group.handle(),
                    shared: Arc::downgrade(shared),
                });
                reader.set_max_frame(shared.limits.max_frame);
                reader.set_frame_timeout(shared.limits.frame_timeout);
                read_requests(&session, &mut reader);
            }
            (Err(e), _) => session.end(EndReason::StreamError(format!("writing WELCOME: {e}"))),
            (_, Err(e)) => session.end(EndReason::StreamError(e.to_string())),
        }
    }
    teardown(shared, &session, &mut group, &stream);
    drop(slot);
}

/// The owner's loop: one frame at a time until the session ends.
fn read_requests(session: &Session, reader: &mut Reader) {
    loop {
        let mut frame = match reader.read_frame() {
            Ok(f) => f,
            Err(e) if e.is_disconnect() => return session.end(EndReason::MainStreamClosed),
            Err(e @ protocol::Error::Stalled { .. }) => {
                return protocol_error(session, ErrorCode::Timeout, e.to_string())
            }
            Err(protocol::Error::Io(e)) => {
                return session.end(EndReason::StreamError(format!("reading main-stream: {e}")))
            }
            Err(e) => return protocol_error(session, ErrorCode::BadFrame, e.to_string()),
        };
        if session.is_ended() {
            return;
        }
        // Owned decode: a large EVAL field keeps the frame's buffer (no copy).
        let msg = match Message::decode_owned(frame.kind, std::mem::take(&mut frame.payload)) {
            Ok(m) => m,
            Err(e) => {
                return protocol_error(
                    session,
                    ErrorCode::BadFrame,
                    format!("bad {}: {e}", frame.kind),
                )
            }
        };
        match msg {
            Message::Eval(_) if frame.request_id == 0 => {
                return protocol_error(
                    session,
                    ErrorCode::BadFrame,
                    "EVAL with request id 0: id 0 is reserved for the connection".into(),
                );
            }
            Message::Eval(eval) => session.on_eval(frame.request_id, eval),
            Message::Cancel(c) => session.on_cancel(c.target),
            Message::Close => return session.end(EndReason::ClientClosed),
            other => {
                return protocol_error(
                    session,
                    ErrorCode::UnexpectedMessage,
                    format!(
                        "{} is not valid on an open main-stream (expected EVAL, CANCEL or CLOSE)",
                        other.kind()
                    ),
                )
            }
        }
    }
}

/// Answers a protocol violation with ERROR (request id 0) and ends the session.
fn protocol_error(session: &Session, code: ErrorCode, message: String) {
    warn!(session.log, "closing session after a protocol error"; "peer" => %session.peer, "error" => &message);
    session.push_main(
        Message::Error(ErrorMsg {
            code,
            message: message.clone(),
        })
        .to_frame(0),
    );
    session.end(EndReason::ProtocolError(message));
}

/// Tears a session down in a fixed order (traced with PYPROXY_DEBUG=1):
/// 1. seal: unregister (never attachable again), drop held atoms and unread queues;
/// 2. close the read sides; the output-stream is no longer watched;
/// 3. let the writers drain what was queued (bounded by LINGER), then cut the sockets;
/// 4. close the engine session: queued atoms dropped, a running atom interrupted;
/// 5. wait for the session's threads, forget its log route.
fn teardown(shared: &Shared, session: &Arc<Session>, group: &mut ThreadGroup, main: &TcpStream) {
    // Whatever woke us, make sure the end is recorded and the writers told.
    session.end(EndReason::MainStreamClosed);
    let reason = session.reason().unwrap_or(EndReason::MainStreamClosed);
    session.trace("1 seal: unregister, drop held atoms and queues");
    shared.registry.remove(session.id);
    let output = session.seal();
    // A main writer never started never will (the session has ended): its
    // start holds a member of the group this teardown waits for.
    drop(lock(&session.main_writer).take());
    session.trace("2 close read sides, stop watching the output-stream");
    if let Some(fd) = session.output_fd() {
        shared.out_watch.forget(session.id, fd);
    }
    let _ = main.shutdown(Shutdown::Read);
    if let Some(o) = &output {
        let _ = o.shutdown(Shutdown::Read);
    }
    session.trace("3 drain writers, then close write sides");
    // Held answers go now; a running main writer would send them first anyway.
    session.flush_held();
    let lingered = group.wait_until(Instant::now() + LINGER);
    let _ = main.shutdown(Shutdown::Both);
    if let Some(o) = &output {
        let _ = o.shutdown(Shutdown::Both);
    }
    session.trace("4 close engine session: drop queued atoms, interrupt the running one");
    if let Some(engine) = lock(&session.engine).take() {
        engine.close();
    }
    session.trace("5 wait for session threads");
    if lingered.is_err() {
        if let Err(live) = group.wait_until(Instant::now() + THREAD_WAIT) {
            warn!(session.log, "session threads did not end"; "live" => live);
        }
    }
    let level_warn = matches!(
        reason,
        EndReason::StreamError(_)
            | EndReason::ProtocolError(_)
            | EndReason::AttachTimeout
            | EndReason::EngineFailed(_)
    );
    let dur = session.opened.elapsed().as_secs_f64();
    if level_warn {
        warn!(session.log, "session ended"; "reason" => %reason, "duration_s" => dur, "peer" => %session.peer);
    } else {
        info!(session.log, "session ended"; "reason" => %reason, "duration_s" => dur, "peer" => %session.peer);
    }
    shared.routes.remove(session.id);
}

/// Runs an output-stream after its ATTACH: checks it, binds it, then is the
/// session's output writer until the session ends. The stream's closing is
/// noticed by the server's [`OutWatch`](super::out_watch::OutWatch) thread, which ends the session.
pub fn run_attach(
    shared: &Arc<Shared>,
    stream: TcpStream,
    reader: Reader,
    mut writer: Writer,
    attach: protocol::Attach,
    slot: ConnSlot,
) {
    let peer = stream.peer_addr().ok();
    let peer_text = peer.map_or_else(|| "?".to_owned(), |p| p.to_string());
    let session = match shared
        .registry
        .lookup_for_attach(attach.session_id, &attach.secret)
    {
        Ok(s) => s,
        Err(why) => return refuse_attach(shared, &mut writer, attach.session_id, &peer_text, why),
    };
    // From here the stream may wait on a slow client for as long as it likes
    // (back-pressure).
    if let Err(e) = stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
    {
        info!(shared.log, "attach failed"; "peer" => &peer_text, "error" => %e);
        return;
    }
    let (group, output_writer) = match session.attach(shared, &stream, writer) {
        Ok(attached) => attached,
        Err(why) => {
            // The writer was consumed; answer on a fresh one.
            if let Ok(s) = stream.try_clone() {
                let mut w = FrameWriter::new(BufWriter::new(s));
                return refuse_attach(shared, &mut w, attach.session_id, &peer_text, why);
            }
            return;
        }
    };
    debug!(session.log, "output-stream attached"; "peer" => &peer_text);
    // Held until this thread returns: the owner's teardown waits for us.
    let _group = group;
    // What came with ATTACH in the same read is past the watcher's reach.
    let early = reader.get_ref().buffer();
    if !early.is_empty() {
        session.client_sent_on_output(early);
    }
    // The watcher reads the stream from here on: its buffer would sit idle for
    // the session's life (W7: 1,000 sessions).
    drop(reader);
    if let Some(w) = output_writer {
        session.output_writer(w);
    }
    drop(slot);
}

fn refuse_attach(
    shared: &Shared,
    writer: &mut Writer,
    session_id: u64,
    peer: &str,
    why: AttachRefused,
) {
    // Logged without the session key: a refused peer must not reach that session's log.
    warn!(shared.log, "attach refused"; "peer" => peer, "session_id" => session_id, "reason" => why.log_reason());
    let frame = Message::Error(ErrorMsg {
        code: ErrorCode::AttachRefused,
        message: why.client_message(session_id),
    })
    .to_frame(0);
    let _ = writer.write_frame(&frame).and_then(|()| writer.flush());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_minor_cuts_the_micro_version() {
        assert_eq!(major_minor("3.13.1"), "3.13");
        assert_eq!(major_minor("3.12"), "3.12");
        assert_eq!(major_minor("3.14.0rc1"), "3.14");
        assert_eq!(major_minor(""), "");
    }

    #[test]
    fn pieces_end_at_line_ends_and_keep_every_byte() {
        let mut data = Vec::new();
        for i in 0..1000 {
            data.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        let pieces = split_pieces(data.clone(), 100);
        assert!(pieces.iter().all(|p| p.len() <= 100 && p.ends_with(b"\n")));
        assert_eq!(pieces.concat(), data);
        // A line longer than the piece size stays whole.
        let long = [vec![b'x'; 300], b"\nshort\n".to_vec()].concat();
        let pieces = split_pieces(long.clone(), 100);
        assert_eq!(pieces[0].len(), 301);
        assert_eq!(pieces.concat(), long);
        assert_eq!(split_pieces(b"a\n".to_vec(), 100), vec![b"a\n".to_vec()]);
    }
}
