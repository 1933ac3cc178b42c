//! Typed messages: one struct per frame kind, with conversions to and from
//! [`Frame`]. Field order here is the byte order on the wire and the order of
//! the field tables in `docs/protocol.md`.

use super::buffer::Buffer;
use super::codec::{PayloadReader, PayloadWriter};
use super::error::{Error, Result};
use super::frame::{Frame, Kind};

/// The protocol version this crate speaks, sent in `CHALLENGE` and `HELLO`.
pub const PROTOCOL_VERSION: u16 = 3;

/// Length of nonces, proofs and attach secrets.
pub const NONCE_LEN: usize = 32;

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident : $repr:ty, $field:literal { $($(#[$vm:meta])* $variant:ident = $value:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $($(#[$vm])* $variant = $value,)*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn from_wire(value: $repr) -> Result<Self> {
                match value {
                    $($value => Ok($name::$variant),)*
                    other => Err(Error::InvalidValue { field: $field, value: u64::from(other) }),
                }
            }
        }
    };
}

wire_enum! {
    /// What an `EVAL` payload holds.
    AtomKind: u8, "atom_kind" {
        /// UTF-8 Python source text.
        Source = 0,
        /// A code object, pickled with cloudpickle.
        Code = 1,
        /// A callable, pickled with cloudpickle, called with no arguments.
        Function = 2,
    }
}

wire_enum! {
    /// Why an atom failed, so the client can pick the exception to raise.
    FailureOrigin: u8, "origin" {
        /// The atom raised; `pickled` may carry the exception itself.
        Raised = 0,
        /// The atom ran past its timeout and was interrupted.
        Timeout = 1,
        /// The client cancelled the atom.
        Cancelled = 2,
        /// The atom needs the client's Python minor version to match the server's.
        VersionMismatch = 3,
        /// The process running the atom died (fork backend).
        WorkerDied = 4,
        /// The server is shutting down or the session is ending.
        Shutdown = 5,
        /// The server could not run the atom (bad payload, internal fault).
        ServerError = 6,
    }
}

wire_enum! {
    /// Protocol-level failure codes carried by `ERROR`.
    ErrorCode: u16, "error_code" {
        /// A frame could not be decoded or broke a framing rule.
        BadFrame = 1,
        /// The handshake proof did not match the server's token.
        AuthFailed = 2,
        /// The peers speak different protocol versions.
        VersionMismatch = 3,
        /// A frame arrived that is not valid at this point or on this stream.
        UnexpectedMessage = 4,
        /// A configured limit was exceeded (pipelined atoms, sessions, connections).
        LimitExceeded = 5,
        /// ATTACH named an unknown session or gave the wrong secret.
        AttachRefused = 6,
        /// The requested backend is not available on this server.
        UnsupportedBackend = 7,
        /// The server failed internally.
        Internal = 8,
        /// A deadline passed (handshake or attach).
        Timeout = 9,
    }
}

wire_enum! {
    /// Severity of a `LOG` record (slog's levels).
    LogLevel: u8, "level" {
        Critical = 0,
        Error = 1,
        Warning = 2,
        Info = 3,
        Debug = 4,
        Trace = 5,
    }
}

/// Server → client first frame on main-stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub protocol_version: u16,
    pub auth_required: bool,
    pub server_nonce: [u8; NONCE_LEN],
}

/// Client → server handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub client_nonce: [u8; NONCE_LEN],
    /// HMAC proof of the token (see `auth`); all zeros when the server said auth is off.
    pub proof: [u8; NONCE_LEN],
    /// `sys.implementation.name` of the client, e.g. `cpython`.
    pub implementation: String,
    /// The client's Python version, `major.minor.micro`.
    pub python_version: String,
    /// Requested backend (`subinterp`, `fork`), or empty for the server default.
    pub backend: String,
    /// Free-form client name and version, for the server's log.
    pub client: String,
}

/// Limits the server enforces, announced so the client can respect them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_frame: u32,
    pub max_pipelined: u32,
    pub max_line: u32,
    pub default_timeout_ms: Option<u64>,
}

/// Server → client: the handshake succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub session_id: u64,
    pub attach_secret: [u8; NONCE_LEN],
    /// HMAC proof that the server knows the token too; zeros without auth.
    pub server_proof: [u8; NONCE_LEN],
    pub server_version: String,
    pub implementation: String,
    pub python_version: String,
    pub backend: String,
    pub limits: Limits,
}

/// Client → server: run an atom. The frame's request id is the atom id.
#[derive(Clone, PartialEq, Eq)]
pub struct Eval {
    pub kind: AtomKind,
    pub payload: Vec<u8>,
    pub globals: Option<Vec<u8>>,
    pub locals: Option<Vec<u8>>,
    pub timeout_ms: Option<u64>,
    /// Out-of-band buffers the pickles in `globals`, `locals` and `payload`
    /// refer to, in the order they take them.
    pub buffers: Vec<Buffer>,
}

impl std::fmt::Debug for Eval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eval")
            .field("kind", &self.kind)
            .field("payload_len", &self.payload.len())
            .field("globals_len", &self.globals.as_ref().map(Vec::len))
            .field("locals_len", &self.locals.as_ref().map(Vec::len))
            .field("timeout_ms", &self.timeout_ms)
            .field("buffers", &self.buffers)
            .finish()
    }
}

/// Client → server: cancel the atom with id `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancel {
    pub target: u64,
}

/// An atom's outcome.
#[derive(Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The value, pickled with protocol 5, and the out-of-band buffers the
    /// pickle refers to.
    Value {
        pickled: Vec<u8>,
        buffers: Vec<Buffer>,
    },
    /// The atom failed.
    Exception(RemoteException),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Value { pickled, buffers } => {
                write!(f, "Value({} bytes, {buffers:?})", pickled.len())
            }
            Outcome::Exception(e) => e.fmt(f),
        }
    }
}

/// What the client needs to re-raise a remote failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteException {
    pub origin: FailureOrigin,
    /// Qualified type name, e.g. `builtins.ZeroDivisionError`.
    pub type_name: String,
    pub message: String,
    /// The remote traceback, formatted as Python prints it.
    pub traceback: String,
    /// The exception object pickled, when it pickles.
    pub pickled: Option<Vec<u8>>,
}

/// Server → client: an atom's result. The frame's request id is the atom id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtomResult {
    /// Time the atom ran, in microseconds.
    pub duration_us: u64,
    /// The atom wrote no output: this RESULT also ends its output, and no
    /// END_OF_OUTPUT follows for it (saving a frame, and the wake-up of a
    /// client thread, per atom that prints nothing).
    pub ends_output: bool,
    pub outcome: Outcome,
}

impl Outcome {
    /// A one-word description for the server's log ("value", "raised", "timeout", …).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Value { .. } => "value",
            Outcome::Exception(e) => match e.origin {
                FailureOrigin::Raised => "raised",
                FailureOrigin::Timeout => "timeout",
                FailureOrigin::Cancelled => "cancelled",
                FailureOrigin::WorkerDied => "worker died",
                FailureOrigin::Shutdown => "shutdown",
                FailureOrigin::VersionMismatch | FailureOrigin::ServerError => "error",
            },
        }
    }
}

impl AtomResult {
    /// A failure the server reports on its own account (timeout, cancel, version
    /// mismatch, a dead worker…): no remote traceback, nothing pickled.
    pub fn failure(
        origin: FailureOrigin,
        type_name: &str,
        message: String,
        duration_us: u64,
    ) -> AtomResult {
        AtomResult {
            duration_us,
            ends_output: false,
            outcome: Outcome::Exception(RemoteException {
                origin,
                type_name: type_name.to_owned(),
                message,
                traceback: String::new(),
                pickled: None,
            }),
        }
    }
}

/// A protocol-level failure. Request id 0 when it concerns the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
}

/// Client → server, first frame on output-stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attach {
    pub session_id: u64,
    pub secret: [u8; NONCE_LEN],
}

/// Whole lines an atom wrote. `data` is one or more lines, each ending in `\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub fd: u8,
    pub data: Vec<u8>,
}

/// A server log record about the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    pub level: LogLevel,
    /// Microseconds since the Unix epoch.
    pub timestamp_us: u64,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

/// Every message, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Challenge(Challenge),
    Hello(Hello),
    Welcome(Welcome),
    Eval(Eval),
    Cancel(Cancel),
    Close,
    Result(AtomResult),
    Error(ErrorMsg),
    Attach(Attach),
    Attached { session_id: u64 },
    Output(Output),
    EndOfOutput,
    Log(Log),
    Goodbye { reason: String },
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Challenge(_) => Kind::Challenge,
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Eval(_) => Kind::Eval,
            Message::Cancel(_) => Kind::Cancel,
            Message::Close => Kind::Close,
            Message::Result(_) => Kind::Result,
            Message::Error(_) => Kind::Error,
            Message::Attach(_) => Kind::Attach,
            Message::Attached { .. } => Kind::Attached,
            Message::Output(_) => Kind::Output,
            Message::EndOfOutput => Kind::EndOfOutput,
            Message::Log(_) => Kind::Log,
            Message::Goodbye { .. } => Kind::Goodbye,
        }
    }

    /// Encodes the payload of this message.
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut w = PayloadWriter::new();
        match self {
            Message::Challenge(c) => {
                w.u16(c.protocol_version)
                    .bool(c.auth_required)
                    .nonce(&c.server_nonce);
            }
            Message::Hello(h) => {
                w.u16(h.protocol_version)
                    .nonce(&h.client_nonce)
                    .nonce(&h.proof)
                    .str(&h.implementation)
                    .str(&h.python_version)
                    .str(&h.backend)
                    .str(&h.client);
            }
            Message::Welcome(m) => {
                w.u64(m.session_id)
                    .nonce(&m.attach_secret)
                    .nonce(&m.server_proof)
                    .str(&m.server_version)
                    .str(&m.implementation)
                    .str(&m.python_version)
                    .str(&m.backend)
                    .u32(m.limits.max_frame)
                    .u32(m.limits.max_pipelined)
                    .u32(m.limits.max_line)
                    .opt_u64(m.limits.default_timeout_ms);
            }
            Message::Eval(e) => {
                w = PayloadWriter::with_capacity(e.payload.len() + 32);
                w.u8(e.kind as u8)
                    .opt_u64(e.timeout_ms)
                    .opt_bytes(e.globals.as_deref())
                    .opt_bytes(e.locals.as_deref())
                    .bytes(&e.payload)
                    .buffers(&e.buffers);
            }
            Message::Cancel(c) => {
                w.u64(c.target);
            }
            Message::Close | Message::EndOfOutput => {}
            Message::Result(r) => {
                if let Outcome::Value { pickled, buffers } = &r.outcome {
                    let oob: usize = buffers.iter().map(|b| b.len() + 4).sum();
                    w = PayloadWriter::with_capacity(pickled.len() + oob + 20);
                }
                encode_result(&mut w, r)
            }
            Message::Error(e) => {
                w.u16(e.code as u16).str(&e.message);
            }
            Message::Attach(a) => {
                w.u64(a.session_id).nonce(&a.secret);
            }
            Message::Attached { session_id } => {
                w.u64(*session_id);
            }
            Message::Output(o) => {
                w.u8(o.fd).rest(&o.data);
            }
            Message::Log(l) => {
                w.u8(l.level as u8)
                    .u64(l.timestamp_us)
                    .str(&l.message)
                    .u32(l.fields.len() as u32);
                for (k, v) in &l.fields {
                    w.str(k).str(v);
                }
            }
            Message::Goodbye { reason } => {
                w.str(reason);
            }
        }
        w.finish()
    }

    /// Like [`Message::to_frame`], but a RESULT's value and buffers or an
    /// EVAL's payload and buffers are not copied: they become the frame's
    /// tail, written from where they lie, behind a few bytes of head.
    pub fn into_frame(self, request_id: u64) -> Frame {
        let kind = self.kind();
        let mut head = PayloadWriter::with_capacity(64);
        let (big, buffers) = match self {
            Message::Result(AtomResult {
                duration_us,
                ends_output,
                outcome: Outcome::Value { pickled, buffers },
            }) => {
                head.u64(duration_us)
                    .u8(result_flags(ends_output))
                    .u8(OUTCOME_VALUE)
                    .u32(pickled.len() as u32);
                (pickled, buffers)
            }
            Message::Eval(e) => {
                head.u8(e.kind as u8)
                    .opt_u64(e.timeout_ms)
                    .opt_bytes(e.globals.as_deref())
                    .opt_bytes(e.locals.as_deref())
                    .u32(e.payload.len() as u32);
                (e.payload, e.buffers)
            }
            other => return other.to_frame(request_id),
        };
        let mut oob = PayloadWriter::with_capacity(4 + 4 * buffers.len());
        oob.buffers_head(&buffers);
        let mut frame = Frame::new(kind, request_id, head.finish());
        frame.tail.reserve(2 + buffers.len());
        frame.tail.push(Buffer::from(big));
        frame.tail.push(Buffer::from(oob.finish()));
        frame.tail.extend(buffers);
        frame
    }

    pub fn to_frame(&self, request_id: u64) -> Frame {
        Frame::new(self.kind(), request_id, self.encode_payload())
    }

    /// Decodes a frame's payload according to its kind. Never panics.
    pub fn decode(frame: &Frame) -> Result<Message> {
        Message::decode_parts(frame.kind, &frame.payload)
    }

    /// Decodes an owned payload, moving the largest byte field (an EVAL's
    /// payload, globals or locals; a RESULT's value) out of `payload` in place
    /// instead of copying it into a fresh allocation: for a 64 MiB argument
    /// that is one `memmove` within pages already touched rather than a copy
    /// into 16,384 new ones. Same result and errors as [`Message::decode_parts`].
    pub fn decode_owned(kind: Kind, payload: Vec<u8>) -> Result<Message> {
        match kind {
            Kind::Eval => decode_eval_owned(payload),
            Kind::Result => decode_result_owned(payload),
            _ => Message::decode_parts(kind, &payload),
        }
    }

    pub fn decode_parts(kind: Kind, payload: &[u8]) -> Result<Message> {
        let mut r = PayloadReader::new(payload);
        let msg = match kind {
            Kind::Challenge => Message::Challenge(Challenge {
                protocol_version: r.u16("protocol_version")?,
                auth_required: r.bool("auth_required")?,
                server_nonce: r.nonce("server_nonce")?,
            }),
            Kind::Hello => Message::Hello(Hello {
                protocol_version: r.u16("protocol_version")?,
                client_nonce: r.nonce("client_nonce")?,
                proof: r.nonce("proof")?,
                implementation: r.string("implementation")?,
                python_version: r.string("python_version")?,
                backend: r.string("backend")?,
                client: r.string("client")?,
            }),
            Kind::Welcome => Message::Welcome(Welcome {
                session_id: r.u64("session_id")?,
                attach_secret: r.nonce("attach_secret")?,
                server_proof: r.nonce("server_proof")?,
                server_version: r.string("server_version")?,
                implementation: r.string("implementation")?,
                python_version: r.string("python_version")?,
                backend: r.string("backend")?,
                limits: Limits {
                    max_frame: r.u32("max_frame")?,
                    max_pipelined: r.u32("max_pipelined")?,
                    max_line: r.u32("max_line")?,
                    default_timeout_ms: r.opt_u64("default_timeout_ms")?,
                },
            }),
            Kind::Eval => Message::Eval(Eval {
                kind: AtomKind::from_wire(r.u8("atom_kind")?)?,
                timeout_ms: r.opt_u64("timeout_ms")?,
                globals: r.opt_bytes("globals")?.map(<[u8]>::to_vec),
                locals: r.opt_bytes("locals")?.map(<[u8]>::to_vec),
                payload: r.bytes("payload")?.to_vec(),
                buffers: copy_buffers(payload, r.buffer_ranges()?),
            }),
            Kind::Cancel => Message::Cancel(Cancel {
                target: r.u64("target")?,
            }),
            Kind::Close => Message::Close,
            Kind::Result => Message::Result(decode_result(&mut r, payload)?),
            Kind::Error => Message::Error(ErrorMsg {
                code: ErrorCode::from_wire(r.u16("error_code")?)?,
                message: r.string("message")?,
            }),
            Kind::Attach => Message::Attach(Attach {
                session_id: r.u64("session_id")?,
                secret: r.nonce("secret")?,
            }),
            Kind::Attached => Message::Attached {
                session_id: r.u64("session_id")?,
            },
            Kind::Output => {
                let fd = r.u8("fd")?;
                if fd != 1 && fd != 2 {
                    return Err(Error::InvalidValue {
                        field: "fd",
                        value: u64::from(fd),
                    });
                }
                Message::Output(Output {
                    fd,
                    data: r.rest().to_vec(),
                })
            }
            Kind::EndOfOutput => Message::EndOfOutput,
            Kind::Log => {
                let level = LogLevel::from_wire(r.u8("level")?)?;
                let timestamp_us = r.u64("timestamp_us")?;
                let message = r.string("message")?;
                let count = r.u32("field_count")?;
                // Each field takes at least 8 bytes, so the count cannot ask for
                // more than the payload holds.
                let mut fields = Vec::with_capacity((count as usize).min(payload.len() / 8));
                for _ in 0..count {
                    fields.push((r.string("field_key")?, r.string("field_value")?));
                }
                Message::Log(Log {
                    level,
                    timestamp_us,
                    message,
                    fields,
                })
            }
            Kind::Goodbye => Message::Goodbye {
                reason: r.string("reason")?,
            },
        };
        r.finish(kind.name())?;
        Ok(msg)
    }
}

/// Writes an EVAL frame from borrowed parts with vectored writes, so a large
/// payload, globals or locals goes from the caller's buffers to the socket
/// without being copied into a frame first. Each field is given as the
/// pieces it is the concatenation of (e.g. a pickle stream with large buffers
/// spliced in). Same bytes as `Message::Eval(..).to_frame(request_id)` with
/// each field's pieces joined.
#[allow(clippy::too_many_arguments)] // the EVAL's fields, as the caller holds them
pub fn write_eval<W: std::io::Write>(
    w: &mut W,
    request_id: u64,
    kind: AtomKind,
    timeout_ms: Option<u64>,
    globals: Option<&[&[u8]]>,
    locals: Option<&[&[u8]]>,
    payload: &[&[u8]],
    buffers: &[&[u8]],
) -> Result<()> {
    let total = |parts: &[&[u8]]| parts.iter().map(|p| p.len()).sum::<usize>();
    let field_len = |parts: &[&[u8]]| {
        u32::try_from(total(parts)).map_err(|_| Error::FrameTooLarge {
            size: total(parts) as u64,
            max: u32::MAX,
        })
    };
    let mut head = PayloadWriter::with_capacity(16);
    head.u8(kind as u8).opt_u64(timeout_ms);
    let head = head.finish();
    let prefix = |v: Option<&[&[u8]]>| -> Result<Vec<u8>> {
        let mut p = PayloadWriter::with_capacity(5);
        match v {
            None => p.u8(0),
            Some(b) => p.u8(1).u32(field_len(b)?),
        };
        Ok(p.finish())
    };
    let (gp, lp) = (prefix(globals)?, prefix(locals)?);
    let pp = field_len(payload)?.to_be_bytes();
    for b in buffers {
        field_len(&[b])?;
    }
    let mut oob = PayloadWriter::with_capacity(4 + 4 * buffers.len());
    oob.buffers_head(buffers);
    let oob = oob.finish();
    let mut slices: Vec<&[u8]> = Vec::with_capacity(9 + buffers.len());
    slices.push(&head);
    slices.push(&gp);
    slices.extend_from_slice(globals.unwrap_or_default());
    slices.push(&lp);
    slices.extend_from_slice(locals.unwrap_or_default());
    slices.push(&pp);
    slices.extend_from_slice(payload);
    slices.push(&oob);
    slices.extend_from_slice(buffers);
    super::frame::write_frame_slices(w, Kind::Eval, request_id, &slices)
}

/// The bytes of `range` as their own Vec, reusing `payload`'s allocation.
fn take_range(mut payload: Vec<u8>, range: std::ops::Range<usize>) -> Vec<u8> {
    payload.truncate(range.end);
    payload.drain(..range.start);
    payload
}

/// Buffers copied out of a borrowed payload.
fn copy_buffers(payload: &[u8], ranges: Vec<std::ops::Range<usize>>) -> Vec<Buffer> {
    ranges
        .into_iter()
        .map(|r| Buffer::from(&payload[r]))
        .collect()
}

fn decode_eval_owned(payload: Vec<u8>) -> Result<Message> {
    let mut r = PayloadReader::new(&payload);
    let kind = AtomKind::from_wire(r.u8("atom_kind")?)?;
    let timeout_ms = r.opt_u64("timeout_ms")?;
    let globals = r.opt_bytes_range("globals")?;
    let locals = r.opt_bytes_range("locals")?;
    let body = r.bytes_range("payload")?;
    let buffers = r.buffer_ranges()?;
    r.finish(Kind::Eval.name())?;
    let copy = |x: &Option<std::ops::Range<usize>>| x.clone().map(|r| payload[r].to_vec());
    if !buffers.is_empty() {
        // The pickles are small (their large parts are the buffers): copy them,
        // and let the buffers share the frame's allocation.
        let (globals, locals, body) = (copy(&globals), copy(&locals), payload[body].to_vec());
        return Ok(Message::Eval(Eval {
            kind,
            timeout_ms,
            globals,
            locals,
            payload: body,
            buffers: Buffer::split(payload, buffers),
        }));
    }
    // Only the largest field keeps the frame's allocation; the others are copied.
    let len = |x: &Option<std::ops::Range<usize>>| x.as_ref().map_or(0, |r| r.len());
    let (gl, ll, pl) = (len(&globals), len(&locals), body.len());
    let eval = if pl >= gl && pl >= ll {
        let (globals, locals) = (copy(&globals), copy(&locals));
        Eval {
            kind,
            timeout_ms,
            globals,
            locals,
            payload: take_range(payload, body),
            buffers: Vec::new(),
        }
    } else if gl >= ll {
        let (locals, body) = (copy(&locals), payload[body].to_vec());
        Eval {
            kind,
            timeout_ms,
            globals: globals.map(|g| take_range(payload, g)),
            locals,
            payload: body,
            buffers: Vec::new(),
        }
    } else {
        let (globals, body) = (copy(&globals), payload[body].to_vec());
        Eval {
            kind,
            timeout_ms,
            globals,
            locals: locals.map(|l| take_range(payload, l)),
            payload: body,
            buffers: Vec::new(),
        }
    };
    Ok(Message::Eval(eval))
}

fn decode_result_owned(payload: Vec<u8>) -> Result<Message> {
    let mut r = PayloadReader::new(&payload);
    let duration_us = r.u64("duration_us")?;
    let ends_output = ends_output_flag(r.u8("flags")?)?;
    if r.u8("outcome")? != OUTCOME_VALUE {
        return Message::decode_parts(Kind::Result, &payload);
    }
    let value = r.bytes_range("value")?;
    let buffers = r.buffer_ranges()?;
    r.finish(Kind::Result.name())?;
    let outcome = if buffers.is_empty() {
        Outcome::Value {
            pickled: take_range(payload, value),
            buffers: Vec::new(),
        }
    } else {
        let pickled = payload[value].to_vec();
        Outcome::Value {
            pickled,
            buffers: Buffer::split(payload, buffers),
        }
    };
    Ok(Message::Result(AtomResult {
        duration_us,
        ends_output,
        outcome,
    }))
}

const OUTCOME_VALUE: u8 = 0;
const OUTCOME_EXCEPTION: u8 = 1;
/// RESULT `flags` bit: no END_OF_OUTPUT follows for this atom.
const FLAG_ENDS_OUTPUT: u8 = 1;

fn result_flags(ends_output: bool) -> u8 {
    if ends_output {
        FLAG_ENDS_OUTPUT
    } else {
        0
    }
}

fn ends_output_flag(flags: u8) -> Result<bool> {
    if flags & !FLAG_ENDS_OUTPUT != 0 {
        return Err(Error::InvalidValue {
            field: "flags",
            value: u64::from(flags),
        });
    }
    Ok(flags == FLAG_ENDS_OUTPUT)
}

fn encode_result(w: &mut PayloadWriter, r: &AtomResult) {
    w.u64(r.duration_us).u8(result_flags(r.ends_output));
    match &r.outcome {
        Outcome::Value { pickled, buffers } => {
            w.u8(OUTCOME_VALUE).bytes(pickled).buffers(buffers);
        }
        Outcome::Exception(e) => {
            w.u8(OUTCOME_EXCEPTION)
                .u8(e.origin as u8)
                .str(&e.type_name)
                .str(&e.message)
                .str(&e.traceback)
                .opt_bytes(e.pickled.as_deref());
        }
    }
}

fn decode_result(r: &mut PayloadReader<'_>, payload: &[u8]) -> Result<AtomResult> {
    let duration_us = r.u64("duration_us")?;
    let ends_output = ends_output_flag(r.u8("flags")?)?;
    let outcome = match r.u8("outcome")? {
        OUTCOME_VALUE => Outcome::Value {
            pickled: r.bytes("value")?.to_vec(),
            buffers: copy_buffers(payload, r.buffer_ranges()?),
        },
        OUTCOME_EXCEPTION => Outcome::Exception(RemoteException {
            origin: FailureOrigin::from_wire(r.u8("origin")?)?,
            type_name: r.string("type_name")?,
            message: r.string("message")?,
            traceback: r.string("traceback")?,
            pickled: r.opt_bytes("pickled")?.map(<[u8]>::to_vec),
        }),
        other => {
            return Err(Error::InvalidValue {
                field: "outcome",
                value: u64::from(other),
            })
        }
    };
    Ok(AtomResult {
        duration_us,
        ends_output,
        outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{FrameReader, DEFAULT_MAX_FRAME};
    use proptest::prelude::*;
    use std::io::Cursor;

    fn nonce() -> impl Strategy<Value = [u8; 32]> {
        any::<[u8; 32]>()
    }

    fn text() -> impl Strategy<Value = String> {
        ".{0,40}"
    }

    fn blob() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..200)
    }

    fn buffers() -> impl Strategy<Value = Vec<Buffer>> {
        proptest::collection::vec(blob().prop_map(Buffer::from), 0..4)
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u16>(), any::<bool>(), nonce()).prop_map(|(v, a, n)| Message::Challenge(
                Challenge {
                    protocol_version: v,
                    auth_required: a,
                    server_nonce: n
                }
            )),
            (
                any::<u16>(),
                nonce(),
                nonce(),
                text(),
                text(),
                text(),
                text()
            )
                .prop_map(|(v, n, p, i, pv, b, c)| {
                    Message::Hello(Hello {
                        protocol_version: v,
                        client_nonce: n,
                        proof: p,
                        implementation: i,
                        python_version: pv,
                        backend: b,
                        client: c,
                    })
                }),
            (
                any::<u64>(),
                nonce(),
                nonce(),
                (text(), text(), text(), text()),
                (
                    any::<u32>(),
                    any::<u32>(),
                    any::<u32>(),
                    any::<Option<u64>>()
                )
            )
                .prop_map(|(id, s, p, (sv, i, pv, b), (mf, mp, ml, dt))| {
                    Message::Welcome(Welcome {
                        session_id: id,
                        attach_secret: s,
                        server_proof: p,
                        server_version: sv,
                        implementation: i,
                        python_version: pv,
                        backend: b,
                        limits: Limits {
                            max_frame: mf,
                            max_pipelined: mp,
                            max_line: ml,
                            default_timeout_ms: dt,
                        },
                    })
                }),
            (
                proptest::sample::select(AtomKind::ALL.to_vec()),
                blob(),
                proptest::option::of(blob()),
                proptest::option::of(blob()),
                any::<Option<u64>>(),
                buffers()
            )
                .prop_map(|(k, p, g, l, t, b)| Message::Eval(Eval {
                    kind: k,
                    payload: p,
                    globals: g,
                    locals: l,
                    timeout_ms: t,
                    buffers: b
                })),
            any::<u64>().prop_map(|t| Message::Cancel(Cancel { target: t })),
            Just(Message::Close),
            (any::<u64>(), any::<bool>(), blob(), buffers()).prop_map(|(d, e, p, b)| {
                Message::Result(AtomResult {
                    duration_us: d,
                    ends_output: e,
                    outcome: Outcome::Value {
                        pickled: p,
                        buffers: b,
                    },
                })
            }),
            (
                any::<u64>(),
                proptest::sample::select(FailureOrigin::ALL.to_vec()),
                text(),
                text(),
                text(),
                proptest::option::of(blob())
            )
                .prop_map(|(d, o, t, m, tb, p)| Message::Result(AtomResult {
                    duration_us: d,
                    ends_output: d % 2 == 0,
                    outcome: Outcome::Exception(RemoteException {
                        origin: o,
                        type_name: t,
                        message: m,
                        traceback: tb,
                        pickled: p
                    })
                })),
            (proptest::sample::select(ErrorCode::ALL.to_vec()), text()).prop_map(|(c, m)| {
                Message::Error(ErrorMsg {
                    code: c,
                    message: m,
                })
            }),
            (any::<u64>(), nonce()).prop_map(|(id, s)| Message::Attach(Attach {
                session_id: id,
                secret: s
            })),
            any::<u64>().prop_map(|id| Message::Attached { session_id: id }),
            (1u8..=2, blob()).prop_map(|(fd, d)| Message::Output(Output { fd, data: d })),
            Just(Message::EndOfOutput),
            (
                proptest::sample::select(LogLevel::ALL.to_vec()),
                any::<u64>(),
                text(),
                proptest::collection::vec((text(), text()), 0..5)
            )
                .prop_map(|(l, t, m, f)| Message::Log(Log {
                    level: l,
                    timestamp_us: t,
                    message: m,
                    fields: f
                })),
            text().prop_map(|r| Message::Goodbye { reason: r }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_message_round_trips(msg in message(), id in any::<u64>()) {
            let frame = msg.to_frame(id);
            let bytes = frame.to_bytes();
            let mut reader = FrameReader::new(Cursor::new(bytes), DEFAULT_MAX_FRAME);
            let back = reader.read_frame().unwrap();
            prop_assert_eq!(back.request_id, id);
            prop_assert_eq!(Message::decode(&back).unwrap(), msg);
        }

        #[test]
        fn truncated_payloads_are_errors(msg in message(), cut in any::<prop::sample::Index>()) {
            let payload = msg.encode_payload();
            // OUTPUT's data runs to the end of the payload, and a message with an
            // empty payload has nothing to cut.
            prop_assume!(!payload.is_empty() && !matches!(msg, Message::Output(_)));
            let at = cut.index(payload.len());
            prop_assert!(Message::decode_parts(msg.kind(), &payload[..at]).is_err());
        }

        #[test]
        fn extra_bytes_are_errors(msg in message(), extra in proptest::collection::vec(any::<u8>(), 1..10)) {
            prop_assume!(!matches!(msg, Message::Output(_)));
            let mut payload = msg.encode_payload();
            payload.extend_from_slice(&extra);
            prop_assert!(Message::decode_parts(msg.kind(), &payload).is_err());
        }

        #[test]
        fn random_payloads_never_panic(kind in proptest::sample::select(Kind::ALL.to_vec()), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::decode_parts(kind, &payload);
        }

        #[test]
        fn owned_decode_matches_borrowed_decode(msg in message(), cut in any::<prop::sample::Index>(), extra in proptest::collection::vec(any::<u8>(), 0..4)) {
            let payload = msg.encode_payload();
            prop_assert_eq!(Message::decode_owned(msg.kind(), payload.clone()).unwrap(), msg.clone());
            // Truncated or padded payloads fail (or succeed) exactly as the borrowed decode does.
            let mut bad = payload[..cut.index(payload.len() + 1)].to_vec();
            bad.extend_from_slice(&extra);
            prop_assert_eq!(
                Message::decode_owned(msg.kind(), bad.clone()).ok(),
                Message::decode_parts(msg.kind(), &bad).ok()
            );
        }

        #[test]
        fn write_eval_matches_to_frame(g in proptest::option::of(blob()), l in proptest::option::of(blob()), p in blob(), t in proptest::option::of(any::<u64>()), id in any::<u64>(), b in buffers()) {
            let mut out = Vec::new();
            // Each field split into pieces at an arbitrary point.
            let split = |v: &[u8]| { let at = v.len() / 3; vec![v[..at].to_vec(), v[at..].to_vec()] };
            let (gs, ls, ps) = (g.as_deref().map(split), l.as_deref().map(split), split(&p));
            fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> { v.iter().map(Vec::as_slice).collect() }
            let (gr, lr, pr) = (gs.as_deref().map(refs), ls.as_deref().map(refs), refs(&ps));
            let br: Vec<&[u8]> = b.iter().map(|b| &b[..]).collect();
            write_eval(&mut out, id, AtomKind::Function, t, gr.as_deref(), lr.as_deref(), &pr, &br).unwrap();
            let msg = Message::Eval(Eval { kind: AtomKind::Function, payload: p, globals: g, locals: l, timeout_ms: t, buffers: b });
            prop_assert_eq!(out, msg.to_frame(id).to_bytes());
        }

        #[test]
        fn into_frame_matches_to_frame(msg in message(), id in any::<u64>()) {
            prop_assert_eq!(msg.clone().into_frame(id).to_bytes(), msg.to_frame(id).to_bytes());
        }

        #[test]
        fn owned_decode_shares_the_frame_with_the_buffers(msg in message()) {
            let payload = msg.encode_payload();
            let back = Message::decode_owned(msg.kind(), payload).unwrap();
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn owned_decode_takes_whichever_eval_field_is_largest(
            g in proptest::option::of(blob()), l in proptest::option::of(blob()), p in blob(), t in proptest::option::of(any::<u64>())
        ) {
            let msg = Message::Eval(Eval { kind: AtomKind::Code, payload: p, globals: g, locals: l, timeout_ms: t, buffers: Vec::new() });
            prop_assert_eq!(Message::decode_owned(Kind::Eval, msg.encode_payload()).unwrap(), msg);
        }
    }

    #[test]
    fn owned_decode_of_a_large_result_keeps_the_bytes() {
        let value: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let msg = Message::Result(AtomResult {
            duration_us: 9,
            ends_output: false,
            outcome: Outcome::Value {
                pickled: b"p".to_vec(),
                buffers: vec![Buffer::from(value), Buffer::from(vec![7u8; 10])],
            },
        });
        let frame = msg.to_frame(4);
        let mut reader = FrameReader::new(Cursor::new(frame.to_bytes()), DEFAULT_MAX_FRAME);
        reader.set_max_frame(DEFAULT_MAX_FRAME);
        let back = reader.read_frame().unwrap();
        assert_eq!(Message::decode_owned(back.kind, back.payload).unwrap(), msg);
    }

    #[test]
    fn huge_declared_lengths_do_not_allocate() {
        // A LOG claiming 4 billion fields in a 20-byte payload.
        let mut p = vec![3u8];
        p.extend_from_slice(&0u64.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        p.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Message::decode_parts(Kind::Log, &p),
            Err(Error::PayloadTruncated {
                field: "field_key",
                ..
            })
        ));
        // An EVAL whose payload claims 4 GiB.
        let p = [0u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Message::decode_parts(Kind::Eval, &p),
            Err(Error::PayloadTruncated {
                field: "payload",
                ..
            })
        ));
    }

    /// A RESULT value payload: duration 0, flags 0, outcome 0, a 1-byte pickle, then `tail`.
    fn result_with(tail: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 9];
        p.extend_from_slice(&[0, 0, 0, 0, 1, 0x2e]);
        p.extend_from_slice(tail);
        p
    }

    #[test]
    fn result_flags_other_than_ends_output_are_refused() {
        let mut p = result_with(&[0, 0, 0, 0]);
        for (flags, ends) in [(0u8, Some(false)), (1, Some(true)), (2, None)] {
            p[8] = flags;
            for decoded in [
                Message::decode_parts(Kind::Result, &p),
                Message::decode_owned(Kind::Result, p.clone()),
            ] {
                match (decoded, ends) {
                    (Ok(Message::Result(r)), Some(e)) => assert_eq!(r.ends_output, e),
                    (Err(Error::InvalidValue { field, value }), None) => {
                        assert_eq!((field, value), ("flags", 2))
                    }
                    (other, _) => panic!("flags {flags}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn hostile_buffer_lengths_are_refused_before_allocating() {
        // 4 billion buffers declared in a few bytes: refused on the count alone.
        let p = result_with(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        for decode in [
            Message::decode_parts(Kind::Result, &p),
            Message::decode_owned(Kind::Result, p.clone()),
        ] {
            assert!(matches!(
                decode,
                Err(Error::PayloadTruncated {
                    field: "buffer_lengths",
                    ..
                })
            ));
        }
        // Two buffers whose lengths together run past the payload (each alone fits).
        let mut tail = vec![0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 3];
        tail.extend_from_slice(b"abcd");
        let p = result_with(&tail);
        assert!(matches!(
            Message::decode_owned(Kind::Result, p.clone()),
            Err(Error::PayloadTruncated {
                field: "buffers",
                needed: 3,
                remaining: 1
            })
        ));
        // A length of 4 GiB - 1 in an EVAL.
        let mut e = vec![0u8; 8];
        e.extend_from_slice(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            Message::decode_owned(Kind::Eval, e),
            Err(Error::PayloadTruncated {
                field: "buffers",
                ..
            })
        ));
        // Bytes after the last buffer.
        let p = result_with(&[0, 0, 0, 1, 0, 0, 0, 1, b'x', b'y']);
        assert!(matches!(
            Message::decode_parts(Kind::Result, &p),
            Err(Error::TrailingBytes { extra: 1, .. })
        ));
        // Well formed: two buffers, the second empty.
        let p = result_with(&[0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, b'x']);
        let Message::Result(AtomResult {
            outcome: Outcome::Value { buffers, .. },
            ..
        }) = Message::decode_owned(Kind::Result, p).unwrap()
        else {
            panic!("a value")
        };
        assert_eq!(buffers, [Buffer::from(&b"x"[..]), Buffer::from(Vec::new())]);
    }

    #[test]
    fn literal_cancel_bytes() {
        let frame = Message::Cancel(Cancel { target: 0x0102 }).to_frame(9);
        assert_eq!(
            frame.to_bytes(),
            [0, 0, 0, 17, 0x11, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 1, 2]
        );
    }

    #[test]
    fn output_fd_must_be_1_or_2() {
        assert!(matches!(
            Message::decode_parts(Kind::Output, &[3, b'x', b'\n']),
            Err(Error::InvalidValue {
                field: "fd",
                value: 3
            })
        ));
    }
}
