//! The session's one background thread: it reads both streams and routes
//! frames into the session's [`State`], and never touches Python.
//!
//! It polls main-stream, output-stream and a wake pipe (written by `close`),
//! reads whatever is available, cuts it into frames and files each one:
//! `RESULT`/`ERROR` complete an atom (waking its watchers through their
//! pipes), `OUTPUT`/`END_OF_OUTPUT`/`LOG` are stored as bytes. It holds no
//! Python object and never attaches to the interpreter, so a Python thread
//! that keeps the GIL for seconds cannot stall it: results keep arriving and
//! the server is never blocked on a full socket.
//!
//! Any end — a read error, the peer closing, `GOODBYE`, an invalid frame, a
//! `close()` or a panic here (caught) — is final: teardown fails every pending
//! atom with the cause, closes the read sides, then the write sides, and the
//! thread exits. Nothing is retried.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use pyproxy::protocol::{Frame, Header, Kind, Message, HEADER_SIZE};

use crate::error::code_name;
use crate::notify::Pipe;
use crate::outbox::Outbox;
use crate::session::{Completion, Death, LogRecord, Shared, State};

/// Bytes read from a socket per `read` call.
const READ_SIZE: usize = 256 * 1024;

/// Why the reader thread stopped.
#[derive(Debug)]
pub(crate) enum Cause {
    ClientClosed,
    PeerClosed(&'static str),
    Io(&'static str, io::Error),
    Goodbye(String),
    ServerError(String),
    Protocol(String),
    Panic(String),
}

impl Cause {
    fn message(&self, label: &str) -> String {
        match self {
            Cause::ClientClosed => format!(
                "{label} was closed by this client (close() was called); open a new \
                 PyProxySession to run more atoms"
            ),
            Cause::PeerClosed(stream) => format!(
                "{label} is closed: the server closed {stream} (it stopped, crashed or ended \
                 the session); open a new PyProxySession"
            ),
            Cause::Io(stream, e) => format!(
                "{label} is closed: reading {stream} failed ({e}); the network or the server \
                 went away — open a new PyProxySession"
            ),
            Cause::Goodbye(reason) => format!(
                "{label} is closed: the server said goodbye ({reason}); open a new \
                 PyProxySession once the server is back"
            ),
            Cause::ServerError(m) => format!("{label} is closed: the server reported {m}"),
            Cause::Protocol(m) => format!(
                "{label} is closed: the server broke the protocol ({m}); check that client \
                 and server versions match"
            ),
            Cause::Panic(m) => format!(
                "{label} is closed: the client's reader thread crashed ({m}); this is a bug \
                 in the pyproxy client — please report it, and open a new PyProxySession"
            ),
        }
    }
}

/// Payloads at least this large are read from the socket straight into a
/// buffer of their final size instead of through `scratch` and `data`.
const BIG_FRAME: usize = 1024 * 1024;

/// A large frame being read in place: its header, and its payload so far, in
/// one buffer of its final size (huge pages: see `protocol::buffer::for_writing`).
/// Decoding then shares that buffer with a RESULT's out-of-band buffers.
struct BigFrame {
    kind: Kind,
    request_id: u64,
    payload: Vec<u8>,
    filled: usize,
}

impl BigFrame {
    fn new(kind: Kind, request_id: u64, len: usize, have: &[u8]) -> BigFrame {
        let mut payload = pyproxy::protocol::buffer::for_writing(len);
        payload[..have.len()].copy_from_slice(have);
        BigFrame {
            kind,
            request_id,
            payload,
            filled: have.len(),
        }
    }

    fn unfilled(&mut self) -> &mut [u8] {
        &mut self.payload[self.filled..]
    }

    fn advance(&mut self, n: usize) {
        self.filled += n;
    }

    fn complete(&self) -> bool {
        self.filled == self.payload.len()
    }

    fn finish(self) -> Frame {
        Frame::new(self.kind, self.request_id, self.payload)
    }
}

/// Bytes read from one stream and not yet cut into frames.
struct Inbox {
    name: &'static str,
    data: Vec<u8>,
    start: usize,
    /// Set while a large frame's payload is read directly into its buffer.
    big: Option<BigFrame>,
}

impl Inbox {
    fn new(name: &'static str) -> Inbox {
        Inbox {
            name,
            data: Vec::new(),
            start: 0,
            big: None,
        }
    }

    /// Where the next read from the socket should go.
    fn read_buf<'a>(&'a mut self, scratch: &'a mut [u8]) -> &'a mut [u8] {
        match &mut self.big {
            Some(b) => b.unfilled(),
            None => scratch,
        }
    }

    /// Takes `n` bytes just read into [`Inbox::read_buf`]; returns every frame now complete.
    fn received(&mut self, scratch: &[u8], n: usize, max_frame: u32) -> Result<Vec<Frame>, Cause> {
        if let Some(b) = &mut self.big {
            b.advance(n);
            if !b.complete() {
                return Ok(Vec::new());
            }
            let b = self.big.take().expect("checked above");
            return Ok(vec![b.finish()]);
        }
        self.data.extend_from_slice(&scratch[..n]);
        Ok(self.frames(max_frame)?.into_iter().collect())
    }

    /// Every complete frame in the buffer.
    fn frames(&mut self, max_frame: u32) -> Result<Vec<Frame>, Cause> {
        let mut out = Vec::new();
        loop {
            match Frame::parse(&self.data[self.start..], max_frame) {
                Ok(Some((frame, used))) => {
                    self.start += used;
                    out.push(frame);
                }
                Ok(None) => break,
                Err(e) => return Err(Cause::Protocol(format!("{} on {}", e, self.name))),
            }
        }
        // A large frame has begun (its length already passed the max_frame
        // check in Frame::parse): read the rest of it in place, in one buffer
        // of its final size.
        let rest = &self.data[self.start..];
        if let Ok(Some(h)) = Header::parse(rest, max_frame) {
            let len = h.payload_len as usize;
            if len >= BIG_FRAME {
                let have = &rest[HEADER_SIZE..];
                self.big = Some(BigFrame::new(h.kind, h.request_id, len, have));
                self.start = self.data.len();
            }
        }
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        } else if self.start > READ_SIZE {
            self.data.drain(..self.start);
            self.start = 0;
        }
        Ok(out)
    }
}

/// What the session's thread needs once the handshake is done.
pub(crate) struct Start {
    pub session_id: u64,
    pub shared: Arc<Shared>,
    pub main: TcpStream,
    pub out: TcpStream,
    pub wake: Arc<Pipe>,
    pub outbox: Arc<Outbox>,
    pub max_frame: u32,
}

/// The session's thread, started while the server accepts the two streams and
/// sends CHALLENGE, so that its start-up overlaps that wait instead of
/// delaying the session's first result. Dropping it unused ends the thread
/// and waits for it.
pub(crate) struct Prestarted {
    tx: Option<std::sync::mpsc::SyncSender<Start>>,
    handle: Option<JoinHandle<()>>,
}

impl Prestarted {
    pub(crate) fn spawn() -> io::Result<Prestarted> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Start>(1);
        let handle = std::thread::Builder::new()
            .name("pyproxy-connect".into())
            .spawn(move || {
                if let Ok(start) = rx.recv() {
                    serve(start);
                }
            })?;
        Ok(Prestarted {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Hands the connected session to the thread, which names itself
    /// `pyproxy-<session id>` (cheaper on its own thread than from here).
    pub(crate) fn start(mut self, start: Start) -> io::Result<JoinHandle<()>> {
        let handle = self.handle.take().expect("started once");
        let tx = self.tx.take().expect("started once");
        if tx.send(start).is_err() {
            let _ = handle.join();
            return Err(io::Error::other(
                "the session thread ended before it started",
            ));
        }
        Ok(handle)
    }
}

impl Drop for Prestarted {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn serve(start: Start) {
    let Start {
        session_id,
        shared,
        main,
        out,
        wake,
        outbox,
        max_frame,
    } = start;
    name_this_thread(&format!("pyproxy-{session_id}"));
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let streams = Streams {
            main: &main,
            out: &out,
            wake: &wake,
        };
        run(&shared, streams, &outbox, max_frame, session_id)
    }));
    let mut cause = result.unwrap_or_else(|payload| {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Cause::Panic(text)
    });
    if shared.close_requested.load(Ordering::SeqCst)
        && matches!(cause, Cause::PeerClosed(_) | Cause::Io(..))
    {
        // The server answered our CLOSE by closing before we saw the wake-up.
        cause = Cause::ClientClosed;
    }
    teardown(&shared, cause, &main, &out);
    outbox.close();
}

/// Names the calling thread, so `/proc/self/task/*/comm` and debuggers show
/// whose it is (the kernel keeps 15 bytes).
fn name_this_thread(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, buf.as_ptr());
    }
}

/// Fails the waiters, closes the read sides, closes the write sides; the
/// session is dead when this returns, and the thread exits right after.
fn teardown(shared: &Shared, cause: Cause, main: &TcpStream, out: &TcpStream) {
    shared.trace(&format!("reader stopping: {cause:?}"));
    {
        let mut st = shared.lock();
        if st.dead.is_none() {
            st.dead = Some(Death {
                message: cause.message(&shared.label),
                by_client: matches!(cause, Cause::ClientClosed),
            });
        }
        let message = st
            .dead
            .as_ref()
            .map(|d| d.message.clone())
            .unwrap_or_default();
        let pending: Vec<u64> = st.pending.iter().copied().collect();
        shared.trace(&format!("failing {} pending atom(s)", pending.len()));
        for atom in pending {
            st.complete(atom, Completion::Closed(message.clone()));
        }
    }
    shared.announce();
    shared.trace("closing read sides");
    let _ = main.shutdown(Shutdown::Read);
    let _ = out.shutdown(Shutdown::Read);
    shared.trace("closing write sides");
    let _ = main.shutdown(Shutdown::Write);
    let _ = out.shutdown(Shutdown::Write);
    shared.trace("session dead; reader thread exiting");
}

/// Requests this thread is sending for the outbox (it holds the token), and
/// how far it got: the rest goes when the socket is writable again.
type Sending = Option<(Vec<u8>, usize)>;

/// Sends what this thread holds for the outbox without blocking, then
/// whatever was queued meanwhile, until the socket is full or nothing is left
/// (the token is given up).
fn send_queued(outbox: &Outbox, sending: &mut Sending) -> Result<(), Cause> {
    while let Some((bytes, from)) = sending {
        match outbox.send_some(bytes, from) {
            Ok(true) => *sending = outbox.sent_all().map(|b| (b, 0)),
            Ok(false) => return Ok(()),
            Err(e) => return Err(Cause::Io("main-stream", e)),
        }
    }
    Ok(())
}

/// What the session's thread polls.
struct Streams<'a> {
    main: &'a TcpStream,
    out: &'a TcpStream,
    wake: &'a Pipe,
}

fn run(
    shared: &Shared,
    Streams { main, out, wake }: Streams<'_>,
    outbox: &Outbox,
    max_frame: u32,
    session_id: u64,
) -> Cause {
    // The handshake sent ATTACH and returned without waiting for its answer
    // (W5: one round trip less before the first EVAL, which the server holds
    // until output-stream is attached): it is output-stream's first frame.
    let mut attach_pending = Some(session_id);
    let mut inboxes = [Inbox::new("main-stream"), Inbox::new("output-stream")];
    let streams = [main, out];
    let mut scratch = vec![0u8; READ_SIZE];
    let mut sending: Sending = None;
    loop {
        let mut fds = [
            pollfd(main.as_raw_fd()),
            pollfd(out.as_raw_fd()),
            pollfd(wake.read.as_raw_fd()),
        ];
        if sending.is_some() {
            fds[0].events |= libc::POLLOUT;
        }
        // SAFETY: three valid pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Cause::Io("poll", e);
        }
        if fds[2].revents != 0 {
            return Cause::ClientClosed;
        }
        if fds[0].revents & libc::POLLOUT != 0 {
            if let Err(cause) = send_queued(outbox, &mut sending) {
                return cause;
            }
        }
        for i in 0..2 {
            if fds[i].revents & !libc::POLLOUT == 0 {
                continue;
            }
            let n = match (&mut &*streams[i]).read(inboxes[i].read_buf(&mut scratch)) {
                Ok(0) => return Cause::PeerClosed(inboxes[i].name),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                // A reset is the server going away with our requests unread.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Cause::PeerClosed(inboxes[i].name)
                }
                Err(e) => return Cause::Io(inboxes[i].name, e),
            };
            let frames = match inboxes[i].received(&scratch, n, max_frame) {
                Ok(f) => f,
                Err(cause) => return cause,
            };
            if frames.is_empty() {
                continue;
            }
            // Decode main-stream frames before taking the lock: a large RESULT
            // without out-of-band buffers has its value moved within its buffer,
            // which should not hold up wait().
            let frames: Vec<(Frame, Option<Result<Message, Cause>>)> = frames
                .into_iter()
                .map(|frame| match frame {
                    mut f if i == 0 => {
                        let payload = std::mem::take(&mut f.payload);
                        let msg = Message::decode_owned(f.kind, payload).map_err(|e| {
                            Cause::Protocol(format!("undecodable {} on main-stream: {e}", f.kind))
                        });
                        (f, Some(msg))
                    }
                    f => (f, None),
                })
                .collect();
            // One lock and one wake-up per read, however many frames it held.
            let mut answered = 0;
            let stop = {
                let mut st = shared.lock();
                let mut stop = None;
                for (frame, decoded) in frames {
                    let routed = match decoded {
                        Some(msg) => route_main(&mut st, frame.request_id, msg),
                        None => match attach_pending.take() {
                            Some(id) => attached(id, &frame).map(|()| false),
                            None => route_output(&mut st, frame).map(|()| false),
                        },
                    };
                    match routed {
                        Ok(completed) => answered += u64::from(completed),
                        Err(cause) => {
                            stop = Some(cause);
                            break;
                        }
                    }
                }
                stop
            };
            shared.announce();
            if let Some(cause) = stop {
                return cause;
            }
            // Requests corked behind these atoms go now (see `outbox`).
            if answered > 0 {
                if let Some(bytes) = outbox.answered(answered) {
                    sending = Some((bytes, 0));
                    if let Err(cause) = send_queued(outbox, &mut sending) {
                        return cause;
                    }
                }
            }
        }
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn decode(frame: &Frame, stream: &str) -> Result<Message, Cause> {
    Message::decode(frame)
        .map_err(|e| Cause::Protocol(format!("undecodable {} on {stream}: {e}", frame.kind)))
}

/// Files a main-stream message; true when it completed an atom.
fn route_main(st: &mut State, atom: u64, msg: Result<Message, Cause>) -> Result<bool, Cause> {
    match msg? {
        Message::Result(r) => {
            // The atom wrote nothing: no END_OF_OUTPUT follows for it.
            let ended = r.ends_output;
            st.complete(atom, Completion::Result(r));
            if ended {
                st.end_output(atom);
            }
        }
        Message::Error(e) if atom != 0 => st.complete(atom, Completion::Refused(e)),
        Message::Error(e) => {
            return Err(Cause::ServerError(format!(
                "{}: {}",
                code_name(e.code),
                e.message
            )))
        }
        other => {
            return Err(Cause::Protocol(format!(
                "unexpected {} on main-stream",
                other.kind()
            )))
        }
    }
    Ok(true)
}

/// The first frame on output-stream, which answers the handshake's ATTACH.
fn attached(session_id: u64, frame: &Frame) -> Result<(), Cause> {
    match decode(frame, "output-stream")? {
        Message::Attached { session_id: id } if id == session_id => Ok(()),
        Message::Attached { session_id: id } => Err(Cause::Protocol(format!(
            "output-stream was attached to session {id}, not {session_id}"
        ))),
        Message::Error(e) => Err(Cause::ServerError(format!(
            "{} when output-stream attached: {}",
            code_name(e.code),
            e.message
        ))),
        other => Err(Cause::Protocol(format!(
            "{} on output-stream before ATTACHED",
            other.kind()
        ))),
    }
}

fn route_output(st: &mut State, frame: Frame) -> Result<(), Cause> {
    let atom = frame.request_id;
    // OUTPUT is the bulk of the traffic: take its bytes without a second copy.
    if frame.kind == Kind::Output {
        let Some((&fd, _)) = frame.payload.split_first() else {
            return Err(Cause::Protocol("empty OUTPUT payload".into()));
        };
        if fd != 1 && fd != 2 {
            return Err(Cause::Protocol(format!("OUTPUT for fd {fd}")));
        }
        let mut data = frame.payload;
        data.remove(0);
        st.push_output(atom, fd, data);
        return Ok(());
    }
    match decode(&frame, "output-stream")? {
        Message::EndOfOutput => st.end_output(atom),
        Message::Log(l) => {
            #[cfg(test)]
            if l.message == tests::PANIC_LOG {
                panic!("test hook: reader told to panic");
            }
            st.push_log(LogRecord {
                level: l.level as u8,
                timestamp_us: l.timestamp_us,
                message: l.message,
                fields: l.fields,
            })
        }
        Message::Goodbye { reason } => return Err(Cause::Goodbye(reason)),
        Message::Error(e) => {
            return Err(Cause::ServerError(format!(
                "{} on output-stream: {}",
                code_name(e.code),
                e.message
            )))
        }
        other => {
            return Err(Cause::Protocol(format!(
                "unexpected {} on output-stream",
                other.kind()
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    //! The reader's routing against an in-process peer that speaks the protocol
    //! through the protocol crate: real sockets, real frames, no Python.

    use super::*;
    use crate::error::ClientError;
    use crate::notify::Notifier;
    use crate::session::{ConnectOptions, Session};
    use pyproxy::protocol::{
        auth, AtomKind, AtomResult, Challenge, ErrorCode, ErrorMsg, FailureOrigin, FrameReader,
        FrameWriter, Limits, Log, LogLevel, Outcome, Output, RemoteException, Welcome,
        DEFAULT_MAX_FRAME,
    };
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    #[test]
    fn a_large_result_that_is_not_a_value_is_reassembled_for_the_decoder() {
        let msg = Message::Result(AtomResult {
            duration_us: 3,
            ends_output: false,
            outcome: Outcome::Exception(RemoteException {
                origin: FailureOrigin::Raised,
                type_name: "builtins.ValueError".into(),
                message: "x".repeat(2 * BIG_FRAME),
                traceback: String::new(),
                pickled: None,
            }),
        });
        let bytes = msg.to_frame(9).to_bytes();
        let mut inbox = Inbox::new("main-stream");
        let mut scratch = vec![0u8; READ_SIZE];
        let (mut off, mut got) = (0, Vec::new());
        while off < bytes.len() {
            let buf = inbox.read_buf(&mut scratch);
            let n = buf.len().min(bytes.len() - off).min(5);
            buf[..n].copy_from_slice(&bytes[off..off + n]);
            off += n;
            got.extend(inbox.received(&scratch, n, DEFAULT_MAX_FRAME).unwrap());
        }
        let [f] = &got[..] else {
            panic!("expected one frame")
        };
        assert_eq!(Message::decode(f).unwrap(), msg);
    }

    #[test]
    fn a_large_frame_is_read_in_place_across_reads_and_the_next_one_follows() {
        let value: Vec<u8> = (0..3 * BIG_FRAME).map(|i| (i % 253) as u8).collect();
        let big = Message::Result(AtomResult {
            duration_us: 1,
            ends_output: false,
            outcome: Outcome::Value {
                pickled: b"pickle".to_vec(),
                buffers: vec![value.clone().into()],
            },
        });
        let small = Message::EndOfOutput;
        let mut bytes = big.to_frame(5).to_bytes();
        bytes.extend_from_slice(&small.to_frame(6).to_bytes());
        let mut inbox = Inbox::new("main-stream");
        let mut scratch = vec![0u8; READ_SIZE];
        let (mut off, mut frames, mut in_place) = (0, Vec::new(), false);
        while off < bytes.len() {
            let buf = inbox.read_buf(&mut scratch);
            let n = buf.len().min(bytes.len() - off).min(100_000);
            buf[..n].copy_from_slice(&bytes[off..off + n]);
            off += n;
            frames.extend(inbox.received(&scratch, n, DEFAULT_MAX_FRAME).unwrap());
            in_place |= inbox.big.is_some();
        }
        assert!(in_place && inbox.big.is_none());
        assert_eq!(frames.len(), 2);
        // The frame arrives whole; decoding shares it with the value's buffer.
        let f = frames.remove(0);
        assert_eq!(Message::decode_owned(f.kind, f.payload).unwrap(), big);
        let f = &frames[0];
        assert_eq!(Message::decode(f).unwrap(), small);
    }

    pub(crate) const PANIC_LOG: &str = "__pyproxy_test_panic__";
    const TOKEN: &str = "unit-test-token";

    /// The server side of one session, driven step by step by the test.
    struct Peer {
        main: TcpStream,
        out: TcpStream,
    }

    impl Peer {
        fn send_main(&self, msg: Message, id: u64) {
            FrameWriter::new(&self.main)
                .write_frame(&msg.to_frame(id))
                .unwrap();
        }
        fn send_out(&self, msg: Message, id: u64) {
            FrameWriter::new(&self.out)
                .write_frame(&msg.to_frame(id))
                .unwrap();
        }
        fn recv_main(&self) -> (u64, Message) {
            let f = FrameReader::new(&self.main, DEFAULT_MAX_FRAME)
                .read_frame()
                .unwrap();
            (f.request_id, Message::decode(&f).unwrap())
        }
    }

    fn options(port: u16, token: Option<&str>) -> ConnectOptions {
        ConnectOptions {
            host: "localhost".into(),
            port,
            token: token.map(str::to_string),
            token_source: "the unit test".into(),
            backend: String::new(),
            connect_timeout: Duration::from_secs(5),
            implementation: "cpython".into(),
            python_version: "3.13.0".into(),
        }
    }

    /// Accepts one session on a fresh port; `server_token` is what the fake server proves with.
    fn session_with(
        server_token: &str,
        client_token: Option<&str>,
    ) -> (Result<Session, ClientError>, Option<Peer>) {
        session_answering_attach(
            server_token,
            client_token,
            Message::Attached { session_id: 42 },
        )
    }

    /// As `session_with`, the fake server answering ATTACH with `attach_answer`.
    fn session_answering_attach(
        server_token: &str,
        client_token: Option<&str>,
        attach_answer: Message,
    ) -> (Result<Session, ClientError>, Option<Peer>) {
        let challenge = Message::Challenge(Challenge {
            protocol_version: 1,
            auth_required: true,
            server_nonce: [8; 32],
        });
        session_opening_output_with(server_token, client_token, challenge, attach_answer)
    }

    /// As `session_answering_attach`, the fake server opening output-stream
    /// with `out_opening` (anything but CHALLENGE ends the exchange there).
    fn session_opening_output_with(
        server_token: &str,
        client_token: Option<&str>,
        out_opening: Message,
        attach_answer: Message,
    ) -> (Result<Session, ClientError>, Option<Peer>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server_token = server_token.to_string();
        let server = std::thread::spawn(move || {
            let (main, _) = listener.accept().unwrap();
            let nonce = [7u8; 32];
            let peer_write = |s: &TcpStream, m: Message| {
                FrameWriter::new(s).write_frame(&m.to_frame(0)).unwrap()
            };
            peer_write(
                &main,
                Message::Challenge(Challenge {
                    protocol_version: pyproxy::protocol::PROTOCOL_VERSION,
                    auth_required: true,
                    server_nonce: nonce,
                }),
            );
            let hello = match FrameReader::new(&main, DEFAULT_MAX_FRAME).read_frame() {
                Ok(f) => Message::decode(&f).unwrap(),
                Err(_) => return None,
            };
            let Message::Hello(hello) = hello else {
                panic!("expected HELLO")
            };
            assert_eq!(hello.implementation, "cpython");
            assert!(hello.client.starts_with("pyproxy-client "));
            // "*": an impostor that accepts any proof but cannot prove the token back.
            let impostor = server_token == "*";
            if !impostor
                && !auth::verify_client_proof(
                    server_token.as_bytes(),
                    &nonce,
                    &hello.client_nonce,
                    &hello.proof,
                )
            {
                peer_write(
                    &main,
                    Message::Error(ErrorMsg {
                        code: ErrorCode::AuthFailed,
                        message: "bad proof".into(),
                    }),
                );
                return None;
            }
            peer_write(
                &main,
                Message::Welcome(Welcome {
                    session_id: 42,
                    attach_secret: [9; 32],
                    server_proof: auth::server_proof(
                        if impostor {
                            b"guess".as_slice()
                        } else {
                            server_token.as_bytes()
                        },
                        &nonce,
                        &hello.client_nonce,
                    ),
                    server_version: "0.1.0".into(),
                    implementation: "cpython".into(),
                    python_version: "3.13.0".into(),
                    backend: "subinterp".into(),
                    limits: Limits {
                        max_frame: DEFAULT_MAX_FRAME,
                        max_pipelined: 64,
                        max_line: 65536,
                        default_timeout_ms: None,
                    },
                }),
            );
            if impostor {
                return None;
            }
            let (out, _) = listener.accept().unwrap();
            let challenged = matches!(out_opening, Message::Challenge(_));
            peer_write(&out, out_opening);
            if !challenged {
                return None;
            }
            let f = FrameReader::new(&out, DEFAULT_MAX_FRAME)
                .read_frame()
                .unwrap();
            let Message::Attach(a) = Message::decode(&f).unwrap() else {
                panic!("expected ATTACH")
            };
            assert_eq!((a.session_id, a.secret), (42, [9; 32]));
            peer_write(&out, attach_answer);
            Some(Peer { main, out })
        });
        let session = Session::connect(&options(port, client_token));
        (session, server.join().unwrap())
    }

    fn connected() -> (Session, Peer) {
        let (s, p) = session_with(TOKEN, Some(TOKEN));
        (s.unwrap(), p.unwrap())
    }

    fn value(pickled: &[u8]) -> Message {
        Message::Result(AtomResult {
            duration_us: 5,
            ends_output: false,
            outcome: Outcome::Value {
                pickled: pickled.to_vec(),
                buffers: Vec::new(),
            },
        })
    }

    fn wait(s: &Session, atom: u64) -> Arc<Completion> {
        s.wait(atom, Some(Duration::from_secs(5)))
            .unwrap()
            .expect("completed in time")
    }

    fn read_all(s: &Session, atom: Option<u64>) -> Result<Vec<Chunk>, ClientError> {
        let mut all = Vec::new();
        loop {
            let (chunks, ended) = s.read_output(atom, Some(Duration::from_secs(5)), 1 << 20)?;
            all.extend(chunks);
            if ended {
                return Ok(all);
            }
        }
    }

    use crate::session::Chunk;

    #[test]
    fn results_and_output_are_routed_to_their_atoms() {
        let (s, peer) = connected();
        assert_eq!(s.info.session_id, 42);
        let a1 = s.submit(AtomKind::Source, b"1", None, None, None).unwrap();
        let a2 = s
            .submit(AtomKind::Source, b"2", None, None, Some(500))
            .unwrap();
        assert_eq!((a1, a2), (1, 2), "atom ids increase from 1");
        // Atom 2 waits in the outbox behind unanswered atom 1 until flushed.
        s.flush();
        let (id, m) = peer.recv_main();
        assert_eq!(id, 1);
        assert!(matches!(m, Message::Eval(ref e) if e.payload == b"1" && e.timeout_ms.is_none()));
        let (id, m) = peer.recv_main();
        assert!(id == 2 && matches!(m, Message::Eval(ref e) if e.timeout_ms == Some(500)));

        peer.send_out(
            Message::Output(Output {
                fd: 1,
                data: b"one\ntwo\n".to_vec(),
            }),
            1,
        );
        peer.send_out(
            Message::Output(Output {
                fd: 2,
                data: b"err\n".to_vec(),
            }),
            2,
        );
        peer.send_out(
            Message::Output(Output {
                fd: 2,
                data: b"three\n".to_vec(),
            }),
            1,
        );
        peer.send_out(Message::EndOfOutput, 1);
        peer.send_main(value(b"v1"), 1);
        peer.send_out(Message::EndOfOutput, 2);
        peer.send_main(value(b"v2"), 2);

        match &*wait(&s, 1) {
            Completion::Result(AtomResult {
                outcome: Outcome::Value { pickled, .. },
                ..
            }) => assert_eq!(pickled, b"v1"),
            other => panic!("{other:?}"),
        }
        let out1 = read_all(&s, Some(1)).unwrap();
        assert_eq!(
            out1.iter()
                .map(|c| (c.fd, c.data.clone()))
                .collect::<Vec<_>>(),
            vec![(1, b"one\ntwo\n".to_vec()), (2, b"three\n".to_vec())]
        );
        assert!(matches!(&*wait(&s, 2), Completion::Result(_)));
        // Atom 1's lines were delivered to its iterator; the session sees only atom 2's.
        let (rest, ended) = s
            .read_output(None, Some(Duration::from_millis(100)), 1 << 20)
            .unwrap();
        assert!(!ended);
        assert_eq!(
            rest,
            vec![Chunk {
                atom: 2,
                fd: 2,
                data: b"err\n".to_vec()
            }]
        );
        s.close();
        assert!(!s.reader_alive());
    }

    #[test]
    fn a_result_that_ends_output_ends_the_atoms_output_without_end_of_output() {
        let (s, peer) = connected();
        let a = s.submit(AtomKind::Source, b"1", None, None, None).unwrap();
        let Message::Result(mut r) = value(b"v") else {
            unreachable!()
        };
        r.ends_output = true;
        peer.send_main(Message::Result(r), a);
        assert!(matches!(&*wait(&s, a), Completion::Result(_)));
        // No END_OF_OUTPUT is ever sent: the iterator ends on the RESULT alone.
        let (chunks, ended) = s
            .read_output(Some(a), Some(Duration::from_secs(5)), 1 << 20)
            .unwrap();
        assert!(chunks.is_empty() && ended);
        // Without the flag, the iterator waits for END_OF_OUTPUT.
        let b = s.submit(AtomKind::Source, b"2", None, None, None).unwrap();
        s.flush();
        peer.send_main(value(b"w"), b);
        assert!(matches!(&*wait(&s, b), Completion::Result(_)));
        let (_, ended) = s
            .read_output(Some(b), Some(Duration::from_millis(100)), 1 << 20)
            .unwrap();
        assert!(!ended, "output ends only with END_OF_OUTPUT");
        peer.send_out(Message::EndOfOutput, b);
        assert!(read_all(&s, Some(b)).unwrap().is_empty());
        s.close();
    }

    #[test]
    fn exceptions_refusals_and_logs_arrive_as_data() {
        let (s, peer) = connected();
        let a = s
            .submit(AtomKind::Source, b"1/0", None, None, None)
            .unwrap();
        let b = s.submit(AtomKind::Source, b"x", None, None, None).unwrap();
        peer.send_out(
            Message::Log(Log {
                level: LogLevel::Info,
                timestamp_us: 123,
                message: "atom started".into(),
                fields: vec![("atom".into(), "1".into())],
            }),
            0,
        );
        peer.send_main(
            Message::Result(AtomResult {
                duration_us: 1,
                ends_output: false,
                outcome: Outcome::Exception(RemoteException {
                    origin: FailureOrigin::Raised,
                    type_name: "builtins.ZeroDivisionError".into(),
                    message: "division by zero".into(),
                    traceback: "Traceback...".into(),
                    pickled: None,
                }),
            }),
            a,
        );
        peer.send_main(
            Message::Error(ErrorMsg {
                code: ErrorCode::LimitExceeded,
                message: "too many".into(),
            }),
            b,
        );
        assert!(
            matches!(&*wait(&s, a), Completion::Result(AtomResult { outcome: Outcome::Exception(e), .. }) if e.type_name == "builtins.ZeroDivisionError")
        );
        assert!(
            matches!(&*wait(&s, b), Completion::Refused(e) if e.code == ErrorCode::LimitExceeded)
        );
        // LOG travels on output-stream, RESULT on main-stream: either may come first.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.logs().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let logs = s.logs();
        assert_eq!(logs.len(), 1);
        assert_eq!(
            (
                logs[0].level,
                logs[0].timestamp_us,
                logs[0].message.as_str()
            ),
            (3, 123, "atom started")
        );
    }

    #[test]
    fn a_peer_that_closes_fails_pending_atoms_and_ends_the_thread() {
        let (s, peer) = connected();
        let a = s.submit(AtomKind::Source, b"1", None, None, None).unwrap();
        let notifier = Arc::new(Notifier::new().unwrap());
        s.watch(a, &notifier, 77);
        peer.send_out(
            Message::Output(Output {
                fd: 1,
                data: b"partial\n".to_vec(),
            }),
            a,
        );
        // Let the line arrive before the hang-up, so we can check it is still delivered.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.shared.lock().output.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let start = Instant::now();
        drop(peer);
        match &*wait(&s, a) {
            Completion::Closed(m) => assert!(m.contains("the server closed"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(
            notifier.wait(Some(Duration::from_secs(1))).unwrap(),
            vec![77]
        );
        // The delivered line comes out, then the iterator reports the death.
        let (chunks, ended) = s
            .read_output(Some(a), Some(Duration::from_secs(1)), 1 << 20)
            .unwrap();
        assert_eq!((chunks.len(), ended), (1, false));
        assert!(matches!(
            s.read_output(Some(a), Some(Duration::from_secs(1)), 1 << 20),
            Err(ClientError::SessionClosed { .. })
        ));
        assert!(matches!(
            s.submit(AtomKind::Source, b"1", None, None, None),
            Err(ClientError::SessionClosed { .. })
        ));
        let deadline = Instant::now() + Duration::from_secs(2);
        while s.reader_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!s.reader_alive(), "the reader thread exits on its own");
    }

    /// `connect` returns once ATTACH is sent; the session's thread reads the
    /// answer, and a refusal or a wrong session id ends the session with it.
    #[test]
    fn an_attach_answered_with_anything_but_our_attached_ends_the_session() {
        let refused = Message::Error(ErrorMsg {
            code: ErrorCode::AttachRefused,
            message: "session 42 has ended".into(),
        });
        let cases = [
            (
                refused,
                "ATTACH_REFUSED when output-stream attached: session 42 has ended",
            ),
            (
                Message::Attached { session_id: 7 },
                "output-stream was attached to session 7, not 42",
            ),
            (
                Message::EndOfOutput,
                "END_OF_OUTPUT on output-stream before ATTACHED",
            ),
        ];
        for (answer, expected) in cases {
            let (s, peer) = session_answering_attach(TOKEN, Some(TOKEN), answer);
            let (s, _peer) = (
                s.expect("connect does not wait for ATTACHED"),
                peer.unwrap(),
            );
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while !s.is_closed() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
            }
            let cause = s.close_cause().expect("the session ended");
            assert!(cause.contains(expected), "{cause}");
            match s.submit(AtomKind::Source, b"1", None, None, None) {
                Err(ClientError::SessionClosed { cause }) => {
                    assert!(cause.contains(expected), "{cause}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn goodbye_names_the_reason() {
        let (s, peer) = connected();
        let a = s.submit(AtomKind::Source, b"1", None, None, None).unwrap();
        peer.send_out(
            Message::Goodbye {
                reason: "server shutting down".into(),
            },
            0,
        );
        match &*wait(&s, a) {
            Completion::Closed(m) => assert!(m.contains("server shutting down"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_panic_in_the_reader_kills_only_the_session() {
        let (s, peer) = connected();
        let a = s.submit(AtomKind::Source, b"1", None, None, None).unwrap();
        peer.send_out(
            Message::Log(Log {
                level: LogLevel::Info,
                timestamp_us: 0,
                message: PANIC_LOG.into(),
                fields: vec![],
            }),
            0,
        );
        match &*wait(&s, a) {
            Completion::Closed(m) => assert!(m.contains("reader thread crashed"), "{m}"),
            other => panic!("{other:?}"),
        }
        drop(peer);
    }

    #[test]
    fn close_fails_pending_atoms_and_sends_close() {
        let (s, peer) = connected();
        let a = s.submit(AtomKind::Source, b"1", None, None, None).unwrap();
        let _ = peer.recv_main();
        assert!(s.is_running(a));
        assert!(s.cancel(a).unwrap());
        assert!(matches!(peer.recv_main(), (_, Message::Cancel(c)) if c.target == a));
        s.close();
        assert!(matches!(peer.recv_main(), (_, Message::Close)));
        assert!(
            matches!(&*wait(&s, a), Completion::Closed(m) if m.contains("closed by this client"))
        );
        // After close the session's iterator ends normally; the atom's raises.
        assert!(read_all(&s, None).unwrap().is_empty());
        assert!(matches!(
            read_all(&s, Some(a)),
            Err(ClientError::SessionClosed { .. })
        ));
        assert!(!s.cancel(a).unwrap());
        assert!(!s.reader_alive());
    }

    #[test]
    fn output_of_a_released_atom_is_kept_only_for_a_session_reader() {
        let (s, peer) = connected();
        let a = s.submit(AtomKind::Source, b"1", None, None, None).unwrap();
        let b = s.submit(AtomKind::Source, b"2", None, None, None).unwrap();
        peer.send_out(
            Message::Output(Output {
                fd: 1,
                data: b"early\n".to_vec(),
            }),
            a,
        );
        peer.send_out(Message::EndOfOutput, a);
        peer.send_main(value(b"x"), a);
        wait(&s, a);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.shared.lock().atom_output[&a].ended && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Nobody reads the whole session's output: a released atom's lines go.
        s.release(a);
        assert!(s.shared.lock().output.is_empty());
        assert!(!s.shared.lock().atom_output.contains_key(&a));
        // Once a session reader exists, a released atom's lines wait for it.
        let (none, _) = s.read_output(None, Some(Duration::ZERO), 1 << 20).unwrap();
        assert!(none.is_empty());
        s.release(b);
        peer.send_out(
            Message::Output(Output {
                fd: 2,
                data: b"late\n".to_vec(),
            }),
            b,
        );
        let (got, _) = s
            .read_output(None, Some(Duration::from_secs(5)), 1 << 20)
            .unwrap();
        assert_eq!(
            got,
            vec![Chunk {
                atom: b,
                fd: 2,
                data: b"late\n".to_vec()
            }]
        );
    }

    #[test]
    fn a_hang_up_after_our_close_is_a_client_close() {
        // Regression: the server answers CLOSE by closing; when that EOF beat the
        // wake-up pipe, the session counted as killed and output() raised.
        let (s, peer) = connected();
        s.shared.close_requested.store(true, Ordering::SeqCst);
        drop(peer);
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.reader_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(s.shared.lock().dead.as_ref().is_some_and(|d| d.by_client));
        assert!(read_all(&s, None).unwrap().is_empty());
    }

    #[test]
    fn a_main_stream_cut_from_our_side_is_noticed() {
        let (s, _peer) = connected();
        let a = s.submit(AtomKind::Source, b"1", None, None, None).unwrap();
        // SAFETY: shutting down a socket we own; the fd stays valid.
        unsafe { libc::shutdown(s.main_fd(), libc::SHUT_RDWR) };
        assert!(matches!(&*wait(&s, a), Completion::Closed(_)));
    }

    #[test]
    fn wrong_or_missing_token_is_an_auth_error() {
        let (s, _) = session_with(TOKEN, Some("wrong"));
        match s {
            Err(ClientError::Auth(m)) => assert!(m.contains("refused the token"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        let (s, _) = session_with(TOKEN, None);
        match s {
            Err(ClientError::Auth(m)) => assert!(
                m.contains("requires a token") && m.contains("the unit test"),
                "{m}"
            ),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_server_that_cannot_prove_the_token_is_refused() {
        let (s, _) = session_with("*", Some(TOKEN));
        match s {
            Err(ClientError::Auth(m)) => assert!(m.contains("could not prove"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    /// Connects to a fake server that answers each connection with `ERROR`
    /// in place of `CHALLENGE`.
    fn refused_at_once(code: ErrorCode, message: &str) -> (String, ClientError) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let error = Message::Error(ErrorMsg {
            code,
            message: message.into(),
        });
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (s, _) = listener.accept().unwrap();
                // The client may be gone from output-stream already.
                let _ = FrameWriter::new(&s).write_frame(&error.to_frame(0));
            }
        });
        let err = Session::connect(&options(port, Some(TOKEN))).err().unwrap();
        server.join().unwrap();
        (format!("localhost:{port}"), err)
    }

    #[test]
    fn an_error_in_place_of_challenge_refuses_with_the_servers_words() {
        let why = "too many connections from your address (--max-conns-per-peer)";
        let (address, err) = refused_at_once(ErrorCode::LimitExceeded, why);
        match &err {
            ClientError::Refused { code, message, .. } => {
                assert_eq!((*code, message.as_str()), (ErrorCode::LimitExceeded, why))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.python_class(), "SessionRefused");
        assert_eq!(
            err.to_string(),
            format!("the server at {address} refused the connection (LIMIT_EXCEEDED): {why}")
        );
        // Other codes map to the classes they map to in answer to HELLO.
        match refused_at_once(ErrorCode::AuthFailed, "not from here") {
            (_, ClientError::Auth(m)) => {
                assert!(
                    m.ends_with("refused the connection (AUTH_FAILED): not from here"),
                    "{m}"
                )
            }
            (_, other) => panic!("{other:?}"),
        }
        match refused_at_once(ErrorCode::VersionMismatch, "too old") {
            (_, ClientError::VersionMismatch(m)) => {
                assert!(
                    m.contains("refused the connection (VERSION_MISMATCH): too old"),
                    "{m}"
                )
            }
            (_, other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_error_in_place_of_the_output_streams_challenge_refuses_the_session() {
        let why = "too many connections from your address (--max-conns-per-peer)";
        let error = Message::Error(ErrorMsg {
            code: ErrorCode::LimitExceeded,
            message: why.into(),
        });
        let (s, _) = session_opening_output_with(TOKEN, Some(TOKEN), error, Message::EndOfOutput);
        let err = s.err().unwrap();
        assert_eq!(err.python_class(), "SessionRefused");
        let m = err.to_string();
        assert!(
            m.starts_with("the server at localhost:")
                && m.ends_with(&format!(
                    " refused the output-stream connection (LIMIT_EXCEEDED): {why}"
                )),
            "{m}"
        );
    }

    #[test]
    fn nothing_listening_is_a_connect_failure() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        match Session::connect(&options(port, None)) {
            Err(e @ ClientError::ConnectFailed { .. }) => {
                assert!(e.to_string().contains("is running"))
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn many_small_output_frames_are_all_kept_in_order() {
        let (s, peer) = connected();
        let a = s.submit(AtomKind::Source, b"1", None, None, None).unwrap();
        let n = 20_000;
        for i in 0..n {
            peer.send_out(
                Message::Output(Output {
                    fd: 1,
                    data: format!("{i}\n").into_bytes(),
                }),
                a,
            );
        }
        peer.send_out(Message::EndOfOutput, a);
        peer.send_main(value(b"x"), a);
        let got: Vec<u8> = read_all(&s, Some(a))
            .unwrap()
            .into_iter()
            .flat_map(|c| c.data)
            .collect();
        let want: Vec<u8> = (0..n).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        assert_eq!(got, want);
        assert!(matches!(&*wait(&s, a), Completion::Result(_)));
    }
}
