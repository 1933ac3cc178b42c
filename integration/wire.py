"""A tiny pure-Python codec for the PyProxy wire protocol (docs/protocol.md),
so integration tests can drive the real server over raw sockets — including
sending what a well-behaved client never would.

Frame: u32 length (bytes after it) | u8 kind | u64 request id | payload, big endian.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

PROTOCOL_VERSION = 3

CHALLENGE, HELLO, WELCOME = 0x01, 0x02, 0x03
EVAL, CANCEL, CLOSE = 0x10, 0x11, 0x12
RESULT, ERROR = 0x20, 0x21
ATTACH, ATTACHED, OUTPUT, END_OF_OUTPUT, LOG, GOODBYE = 0x30, 0x31, 0x32, 0x33, 0x34, 0x35

KIND_NAMES = {
    v: k
    for k, v in dict(
        CHALLENGE=CHALLENGE, HELLO=HELLO, WELCOME=WELCOME, EVAL=EVAL, CANCEL=CANCEL, CLOSE=CLOSE,
        RESULT=RESULT, ERROR=ERROR, ATTACH=ATTACH, ATTACHED=ATTACHED, OUTPUT=OUTPUT,
        END_OF_OUTPUT=END_OF_OUTPUT, LOG=LOG, GOODBYE=GOODBYE,
    ).items()
}

# ERROR codes
BAD_FRAME, AUTH_FAILED, VERSION_MISMATCH, UNEXPECTED, LIMIT_EXCEEDED = 1, 2, 3, 4, 5
ATTACH_REFUSED, UNSUPPORTED_BACKEND, INTERNAL, TIMEOUT = 6, 7, 8, 9

# atom kinds and failure origins
SOURCE, CODE, FUNCTION = 0, 1, 2
ORIGIN_RAISED, ORIGIN_TIMEOUT, ORIGIN_CANCELLED, ORIGIN_VERSION_MISMATCH = 0, 1, 2, 3
ORIGIN_WORKER_DIED, ORIGIN_SHUTDOWN, ORIGIN_SERVER_ERROR = 4, 5, 6


def client_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(token, b"pyproxy-hello-v1" + server_nonce + client_nonce, hashlib.sha256).digest()


def server_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(token, b"pyproxy-welcome-v1" + server_nonce + client_nonce, hashlib.sha256).digest()


# ---- payload fields -------------------------------------------------------


def p_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(b)) + b


def p_opt_bytes(b: bytes | None) -> bytes:
    return b"\x00" if b is None else b"\x01" + p_str(b)


def p_opt_u64(v: int | None) -> bytes:
    return b"\x00" if v is None else b"\x01" + struct.pack(">Q", v)


class Fields:
    """Reads payload fields in order."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"payload truncated at {self.pos}+{n} of {len(self.data)}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def bytes(self) -> bytes:
        return self.take(self.u32())

    def str(self) -> str:
        return self.bytes().decode()

    def opt_bytes(self) -> bytes | None:
        return self.bytes() if self.u8() else None

    def opt_u64(self) -> int | None:
        return self.u64() if self.u8() else None

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out


# ---- frames --------------------------------------------------------------


@dataclass
class Frame:
    kind: int
    request_id: int
    payload: bytes = b""
    decoded: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return KIND_NAMES.get(self.kind, hex(self.kind))

    def __repr__(self) -> str:
        return f"Frame({self.name}, id={self.request_id}, {self.decoded or len(self.payload)})"


def encode(kind: int, request_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBQ", 9 + len(payload), kind, request_id) + payload


def hello(token: bytes | None, server_nonce: bytes, *, client_nonce: bytes | None = None,
          version: int = PROTOCOL_VERSION, python: str | None = None, backend: str = "") -> bytes:
    cn = client_nonce or os.urandom(32)
    proof = client_proof(token, server_nonce, cn) if token is not None else bytes(32)
    py = python or "%d.%d.%d" % sys.version_info[:3]
    payload = (struct.pack(">H", version) + cn + proof + p_str("cpython") + p_str(py)
               + p_str(backend) + p_str("wire.py"))
    return encode(HELLO, 0, payload)


def eval_frame(atom: int, payload: bytes | str, *, kind: int = SOURCE, timeout_ms: int | None = None,
               globals_: bytes | None = None, locals_: bytes | None = None) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    body = bytes([kind]) + p_opt_u64(timeout_ms) + p_opt_bytes(globals_) + p_opt_bytes(locals_) + p_str(payload)
    body += b"\x00\x00\x00\x00"  # no out-of-band buffers
    return encode(EVAL, atom, body)


def attach(session_id: int, secret: bytes) -> bytes:
    return encode(ATTACH, 0, struct.pack(">Q", session_id) + secret)


def cancel(atom: int) -> bytes:
    return encode(CANCEL, 0, struct.pack(">Q", atom))


def close() -> bytes:
    return encode(CLOSE, 0)


def decode(kind: int, payload: bytes) -> dict:
    f = Fields(payload)
    if kind == CHALLENGE:
        return dict(protocol_version=f.u16(), auth_required=bool(f.u8()), server_nonce=f.take(32))
    if kind == WELCOME:
        return dict(session_id=f.u64(), attach_secret=f.take(32), server_proof=f.take(32),
                    server_version=f.str(), implementation=f.str(), python_version=f.str(),
                    backend=f.str(), max_frame=f.u32(), max_pipelined=f.u32(), max_line=f.u32(),
                    default_timeout_ms=f.opt_u64())
    if kind == RESULT:
        d = dict(duration_us=f.u64())
        d["ends_output"] = bool(f.u8() & 1)
        if f.u8() == 0:
            d.update(ok=True, value=f.bytes())
            n = f.u32()
            lengths = [f.u32() for _ in range(n)]
            d.update(buffers=[f.take(k) for k in lengths])
        else:
            d.update(ok=False, origin=f.u8(), type_name=f.str(), message=f.str(), traceback=f.str(),
                     pickled=f.opt_bytes())
        return d
    if kind == ERROR:
        return dict(code=f.u16(), message=f.str())
    if kind == ATTACHED:
        return dict(session_id=f.u64())
    if kind == OUTPUT:
        return dict(fd=f.u8(), data=f.rest())
    if kind == LOG:
        d = dict(level=f.u8(), timestamp_us=f.u64(), message=f.str())
        d["fields"] = dict((f.str(), f.str()) for _ in range(f.u32()))
        return d
    if kind == GOODBYE:
        return dict(reason=f.str())
    return {}


class Closed(Exception):
    """The server closed the connection."""


_open: list["Conn"] = []


def close_all() -> None:
    """Closes every connection this module opened (tests call it at teardown)."""
    while _open:
        _open.pop().close()


class Conn:
    """One TCP connection with frame-level reads."""

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        _open.append(self)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed(f"connection closed with {len(self.buf)} of {n} bytes buffered")
            self.buf += chunk

    def read(self, timeout: float | None = 10.0) -> Frame:
        self.sock.settimeout(timeout)
        self._fill(4)
        (length,) = struct.unpack(">I", self.buf[:4])
        self._fill(4 + length)
        kind = self.buf[4]
        (rid,) = struct.unpack(">Q", self.buf[5:13])
        payload = self.buf[13 : 4 + length]
        self.buf = self.buf[4 + length :]
        return Frame(kind, rid, payload, decode(kind, payload))

    def read_kind(self, kind: int, timeout: float = 10.0, skip=(LOG,)) -> Frame:
        """Reads until a frame of `kind`, skipping kinds in `skip`; anything else is an error."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.read(max(0.01, deadline - time.monotonic()))
            if f.kind == kind:
                return f
            if f.kind not in skip:
                raise AssertionError(f"expected {KIND_NAMES.get(kind)}, got {f!r}")

    def frames_for(self, seconds: float) -> list[Frame]:
        """Every frame that arrives within `seconds` (for checking what did *not* come)."""
        frames = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                frames.append(self.read(min(0.2, left)))
            except TimeoutError:
                continue
        return frames

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection within `timeout` (frames before it are dropped)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.read(max(0.01, deadline - time.monotonic()))
        except Closed:
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass
class Session:
    main: Conn
    out: Conn
    welcome: dict

    @property
    def id(self) -> int:
        return self.welcome["session_id"]

    def run(self, atom: int, source: str, timeout: float = 30.0, **kw) -> tuple[list, Frame]:
        """Sends an EVAL and collects its (fd, line) output and RESULT (or ERROR) frame."""
        self.main.send(eval_frame(atom, source, **kw))
        return self.collect(atom, timeout)

    def collect(self, atom: int, timeout: float = 30.0) -> tuple[list, Frame]:
        lines = []
        deadline = time.monotonic() + timeout
        result = self.main.read(max(0.01, deadline - time.monotonic()))
        if result.kind == RESULT and result.decoded["ends_output"]:
            # The atom wrote nothing: no END_OF_OUTPUT follows.
            return lines, result
        while True:
            f = self.out.read(max(0.01, deadline - time.monotonic()))
            if f.kind == OUTPUT and f.request_id == atom:
                lines += [(f.decoded["fd"], l) for l in f.decoded["data"].decode().splitlines()]
            elif f.kind == END_OF_OUTPUT and f.request_id == atom:
                break
        return lines, result

    def close(self) -> None:
        try:
            self.main.send(close())
        except OSError:
            pass
        self.main.close()
        self.out.close()


def handshake(host: str, port: int, token: str | bytes | None, **hello_kw) -> tuple[Conn, dict]:
    """Connects a main-stream and completes the handshake; returns it and the WELCOME fields."""
    tok = token.encode() if isinstance(token, str) else token
    c = Conn(host, port)
    ch = c.read_kind(CHALLENGE)
    cn = os.urandom(32)
    c.send(hello(tok, ch.decoded["server_nonce"], client_nonce=cn, **hello_kw))
    f = c.read()
    if f.kind != WELCOME:
        raise AssertionError(f"handshake refused: {f!r}")
    if tok is not None:
        assert f.decoded["server_proof"] == server_proof(tok, ch.decoded["server_nonce"], cn), "bad server proof"
    return c, f.decoded


def open_session(host: str, port: int, token: str | bytes | None, **hello_kw) -> Session:
    """Handshake on a main-stream, then attach an output-stream."""
    main, welcome = handshake(host, port, token, **hello_kw)
    out = Conn(host, port)
    out.read_kind(CHALLENGE)
    out.send(attach(welcome["session_id"], welcome["attach_secret"]))
    f = out.read_kind(ATTACHED)
    assert f.decoded["session_id"] == welcome["session_id"]
    return Session(main, out, welcome)
