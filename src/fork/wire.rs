//! The two small formats of the fork backend, kept apart from the processes
//! that use them so they can be tested on byte vectors.
//!
//! - *Zygote records*: fixed 24-byte records on the `SOCK_SEQPACKET` socketpair
//!   between the server and its zygote (one record per packet, so no framing is
//!   needed, and a `SPAWNED` record carries the new worker's three fds as
//!   `SCM_RIGHTS` ancillary data in the same packet).
//! - *Control messages*: length-prefixed messages on a worker's `SOCK_STREAM`
//!   control socket (`u32` big-endian length of what follows, a tag byte, the
//!   body). An ATOM or a value RESULT ends with the lengths of its out-of-band
//!   buffers, whose bytes follow the message on the socket, each read straight
//!   into a buffer of its own. `src/fork/worker.py` is the other end; keep the
//!   two in step.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::engine::AtomRequest;
use crate::protocol::Buffer;

/// Size of one zygote record.
pub const RECORD_LEN: usize = 24;

/// A record on the server ↔ zygote socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// Server → zygote: fork a worker; the answer carries `token`.
    Spawn { token: u64 },
    /// Server → zygote: send `signal` to `pid` if it is still a live child
    /// (the zygote reaps, so only it knows the pid was not reused).
    Signal { pid: i32, signal: i32 },
    /// Server → zygote: SIGTERM `pid` now and SIGKILL it after `grace_ms`.
    Terminate { pid: i32, grace_ms: u64 },
    /// Zygote → server: Python is initialised, cloudpickle and the preload
    /// modules imported; workers can be forked.
    Ready { pid: i32 },
    /// Zygote → server: worker `pid` forked for `token`; the packet carries
    /// its control socket, stdout and stderr read ends (in that order).
    Spawned { token: u64, pid: i32 },
    /// Zygote → server: the fork for `token` failed with `errno`.
    SpawnFailed { token: u64, errno: i32 },
    /// Zygote → server: child `pid` was reaped with wait status `status`.
    Exited { pid: i32, status: i32 },
}

impl Record {
    fn parts(&self) -> (u32, i32, i64) {
        match *self {
            Record::Spawn { token } => (1, 0, token as i64),
            Record::Signal { pid, signal } => (2, pid, i64::from(signal)),
            Record::Terminate { pid, grace_ms } => (3, pid, grace_ms as i64),
            Record::Ready { pid } => (10, pid, 0),
            Record::Spawned { token, pid } => (11, pid, token as i64),
            Record::SpawnFailed { token, errno } => (12, errno, token as i64),
            Record::Exited { pid, status } => (13, pid, i64::from(status)),
        }
    }

    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let (tag, a, b) = self.parts();
        let mut out = [0u8; RECORD_LEN];
        out[0..4].copy_from_slice(&tag.to_be_bytes());
        out[4..8].copy_from_slice(&a.to_be_bytes());
        out[8..16].copy_from_slice(&b.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> Option<Record> {
        if buf.len() != RECORD_LEN {
            return None;
        }
        let tag = u32::from_be_bytes(buf[0..4].try_into().ok()?);
        let a = i32::from_be_bytes(buf[4..8].try_into().ok()?);
        let b = i64::from_be_bytes(buf[8..16].try_into().ok()?);
        Some(match tag {
            1 => Record::Spawn { token: b as u64 },
            2 => Record::Signal {
                pid: a,
                signal: b as i32,
            },
            3 => Record::Terminate {
                pid: a,
                grace_ms: b as u64,
            },
            10 => Record::Ready { pid: a },
            11 => Record::Spawned {
                token: b as u64,
                pid: a,
            },
            12 => Record::SpawnFailed {
                token: b as u64,
                errno: a,
            },
            13 => Record::Exited {
                pid: a,
                status: b as i32,
            },
            _ => return None,
        })
    }
}

/// Sends one record, with `fds` as `SCM_RIGHTS` when not empty.
pub fn send_record(sock: RawFd, record: &Record, fds: &[RawFd]) -> io::Result<()> {
    let bytes = record.encode();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; every pointer set below outlives sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_* compute sizes and walk the buffer we own, which is
        // large enough for up to 8 fds (checked by the assert).
        unsafe {
            let space = libc::CMSG_SPACE(data_len) as usize;
            assert!(space <= std::mem::size_of_val(&cbuf), "too many fds");
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len as usize,
            );
        }
    }
    loop {
        // SAFETY: msg points at live buffers.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one record and the fds that came with it. `Ok(None)` at end of
/// stream (the peer closed its end). `nonblocking`: `MSG_DONTWAIT`.
pub fn recv_record(sock: RawFd, nonblocking: bool) -> io::Result<Option<(Record, Vec<OwnedFd>)>> {
    let mut bytes = [0u8; RECORD_LEN + 1];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: as in send_record.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let flags = libc::MSG_CMSG_CLOEXEC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    let n = loop {
        // SAFETY: msg points at live buffers.
        let n = unsafe { libc::recvmsg(sock, &mut msg, flags) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled the control buffer; CMSG_* walk it within
    // msg_controllen, and every fd it passed is now ours to own.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    match Record::decode(&bytes[..n]) {
        Some(r) => Ok(Some((r, fds))),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed zygote record of {n} bytes"),
        )),
    }
}

/// Control message tags (server ↔ worker).
pub const TAG_INIT: u8 = 1;
pub const TAG_ATOM: u8 = 2;
pub const TAG_READY: u8 = 3;
pub const TAG_RESULT: u8 = 4;

/// Largest control message accepted from a worker (a pickled value).
pub const MAX_MESSAGE: usize = 1 << 30;

/// Writes one control message.
pub fn write_message<W: Write>(w: &mut W, tag: u8, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len() + 1)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "control message too large"))?;
    let mut head = [0u8; 5];
    head[0..4].copy_from_slice(&len.to_be_bytes());
    head[4] = tag;
    w.write_all(&head)?;
    w.write_all(body)?;
    w.flush()
}

/// Reads one control message; `Ok(None)` on a clean end before its first byte.
pub fn read_message<R: Read>(r: &mut R) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control message of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    let tag = buf.remove(0);
    Ok(Some((tag, buf)))
}

fn put_opt(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        }
    }
}

fn put_lengths<B: AsRef<[u8]>>(out: &mut Vec<u8>, buffers: &[B]) {
    out.extend_from_slice(&(buffers.len() as u32).to_be_bytes());
    for b in buffers {
        out.extend_from_slice(&(b.as_ref().len() as u32).to_be_bytes());
    }
}

/// The body of an ATOM message: kind, globals, locals, the payload and the
/// lengths of the out-of-band buffers (whose bytes follow the message).
pub fn encode_atom(atom: &AtomRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(atom.payload.len() + 32 + 4 * atom.buffers.len());
    out.push(atom.kind as u8);
    put_opt(&mut out, atom.globals.as_deref());
    put_opt(&mut out, atom.locals.as_deref());
    out.extend_from_slice(&(atom.payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&atom.payload);
    put_lengths(&mut out, &atom.buffers);
    out
}

/// Writes an ATOM message and then its buffers, in one vectored write where
/// the socket takes it: the buffers go from where they lie (the EVAL frame's
/// memory), uncopied.
pub fn write_atom<W: Write>(w: &mut W, atom: &AtomRequest) -> io::Result<()> {
    let body = encode_atom(atom);
    let len = u32::try_from(body.len() + 1)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "control message too large"))?;
    let mut head = [0u8; 5];
    head[0..4].copy_from_slice(&len.to_be_bytes());
    head[4] = TAG_ATOM;
    let mut parts: Vec<io::IoSlice<'_>> = Vec::with_capacity(2 + atom.buffers.len());
    parts.push(io::IoSlice::new(&head));
    parts.push(io::IoSlice::new(&body));
    parts.extend(
        atom.buffers
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| io::IoSlice::new(b)),
    );
    let mut slices: &mut [io::IoSlice<'_>] = &mut parts;
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.flush()
}

/// Reads the out-of-band buffers that follow a RESULT message, each straight
/// into a buffer of its exact size. Together they may not exceed [`MAX_MESSAGE`].
pub fn read_buffers<R: Read>(r: &mut R, lengths: &[usize]) -> io::Result<Vec<Buffer>> {
    let total = lengths.iter().try_fold(0usize, |a, &n| a.checked_add(n));
    if total.is_none_or(|t| t > MAX_MESSAGE) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("out-of-band buffers of {total:?} bytes"),
        ));
    }
    lengths
        .iter()
        .map(|&n| {
            let mut v = crate::protocol::buffer::for_writing(n);
            r.read_exact(&mut v)?;
            Ok(Buffer::from(v))
        })
        .collect()
}

/// What a worker's RESULT message says, before the server adds what it knows
/// (duration, why it interrupted the atom).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerOutcome {
    /// The pickled value and the lengths of the buffers that follow the message.
    Value {
        pickled: Vec<u8>,
        buffer_lengths: Vec<usize>,
    },
    Raised {
        type_name: String,
        message: String,
        traceback: String,
        pickled: Option<Vec<u8>>,
    },
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        Some(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize)
    }
}

/// Decodes a RESULT body (`src/fork/worker.py`, `_encode_result`).
pub fn decode_result(body: &[u8]) -> Option<WorkerOutcome> {
    let mut c = Cursor(body);
    match c.take(1)?[0] {
        0 => {
            let pickled = c.bytes()?.to_vec();
            let count = c.u32()?;
            if count > c.0.len() / 4 {
                return None;
            }
            let buffer_lengths = (0..count).map(|_| c.u32()).collect::<Option<Vec<_>>>()?;
            c.0.is_empty().then_some(WorkerOutcome::Value {
                pickled,
                buffer_lengths,
            })
        }
        1 => {
            let type_name = c.string()?;
            let message = c.string()?;
            let traceback = c.string()?;
            let pickled = match c.take(1)?[0] {
                0 => None,
                1 => Some(c.bytes()?.to_vec()),
                _ => return None,
            };
            c.0.is_empty().then_some(WorkerOutcome::Raised {
                type_name,
                message,
                traceback,
                pickled,
            })
        }
        _ => None,
    }
}

/// Sets or clears `O_NONBLOCK`.
pub fn set_nonblocking(fd: &OwnedFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets (`Some`) or clears (`None`) `SO_RCVTIMEO`: a receive that waits
/// longer fails with `WouldBlock`.
pub fn set_recv_timeout(sock: &OwnedFd, timeout: Option<std::time::Duration>) -> io::Result<()> {
    let t = timeout.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt on a socket we own, from a timeval on our stack.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::AtomKind;

    #[test]
    fn records_round_trip() {
        for r in [
            Record::Spawn { token: 7 },
            Record::Signal { pid: 42, signal: 2 },
            Record::Terminate {
                pid: 9,
                grace_ms: 2000,
            },
            Record::Ready { pid: 1 },
            Record::Spawned {
                token: u64::MAX,
                pid: 123,
            },
            Record::SpawnFailed {
                token: 3,
                errno: 11,
            },
            Record::Exited {
                pid: 5,
                status: 0x8b,
            },
        ] {
            assert_eq!(Record::decode(&r.encode()), Some(r));
        }
        assert_eq!(Record::decode(&[0; RECORD_LEN]), None);
        assert_eq!(Record::decode(&[0; 3]), None);
    }

    #[test]
    fn records_carry_fds_over_a_socketpair() {
        let mut sv = [0; 2];
        // SAFETY: socketpair fills two fds.
        assert_eq!(
            unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                    0,
                    sv.as_mut_ptr(),
                )
            },
            0
        );
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        let file = std::fs::File::open("/dev/null").unwrap();
        let r = Record::Spawned { token: 1, pid: 2 };
        send_record(a.as_raw_fd(), &r, &[file.as_raw_fd(), file.as_raw_fd()]).unwrap();
        let (got, fds) = recv_record(b.as_raw_fd(), false).unwrap().unwrap();
        assert_eq!(got, r);
        assert_eq!(fds.len(), 2);
        assert_ne!(fds[0].as_raw_fd(), file.as_raw_fd());
        drop(a);
        assert!(recv_record(b.as_raw_fd(), false).unwrap().is_none());
    }

    #[test]
    fn messages_round_trip_and_refuse_nonsense() {
        let mut buf = Vec::new();
        write_message(&mut buf, TAG_INIT, b"/tmp").unwrap();
        write_message(&mut buf, TAG_READY, b"").unwrap();
        let mut r = std::io::Cursor::new(buf);
        assert_eq!(
            read_message(&mut r).unwrap(),
            Some((TAG_INIT, b"/tmp".to_vec()))
        );
        assert_eq!(read_message(&mut r).unwrap(), Some((TAG_READY, vec![])));
        assert_eq!(read_message(&mut r).unwrap(), None);
        let mut cut = std::io::Cursor::new(vec![0, 0, 0, 5, 1]);
        assert!(read_message(&mut cut).is_err());
        let mut zero = std::io::Cursor::new(vec![0, 0, 0, 0]);
        assert!(read_message(&mut zero).is_err());
    }

    #[test]
    fn atom_and_result_bodies() {
        let atom = AtomRequest {
            id: 1,
            kind: AtomKind::Function,
            payload: b"xyz".to_vec(),
            globals: Some(b"g".to_vec()),
            locals: None,
            timeout: None,
            buffers: vec![Buffer::from(&b"BUF"[..])],
        };
        assert_eq!(
            encode_atom(&atom),
            [2, 1, 0, 0, 0, 1, b'g', 0, 0, 0, 0, 3, b'x', b'y', b'z', 0, 0, 0, 1, 0, 0, 0, 3]
        );
        let mut sent = Vec::new();
        write_atom(&mut sent, &atom).unwrap();
        assert_eq!(&sent[..4], &24u32.to_be_bytes());
        assert_eq!(&sent[sent.len() - 3..], b"BUF");
        assert_eq!(
            decode_result(&[0, 0, 0, 0, 2, 0x80, 5, 0, 0, 0, 0]),
            Some(WorkerOutcome::Value {
                pickled: vec![0x80, 5],
                buffer_lengths: vec![]
            })
        );
        assert_eq!(
            decode_result(&[0, 0, 0, 0, 1, 0x80, 0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 0]),
            Some(WorkerOutcome::Value {
                pickled: vec![0x80],
                buffer_lengths: vec![7, 0]
            })
        );
        // A count the body cannot hold, and a value longer than the body.
        assert_eq!(
            decode_result(&[0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(decode_result(&[0, 0, 0, 0, 9, 1]), None);
        let mut r = std::io::Cursor::new(b"abcdefg".to_vec());
        let bufs = read_buffers(&mut r, &[3, 4]).unwrap();
        assert_eq!((&*bufs[0], &*bufs[1]), (&b"abc"[..], &b"defg"[..]));
        assert!(read_buffers(&mut r, &[1]).is_err());
        assert!(read_buffers(&mut r, &[MAX_MESSAGE, 1]).is_err());
        let raised = [&[
            1u8, 0, 0, 0, 1, b'T', 0, 0, 0, 1, b'm', 0, 0, 0, 0, 1, 0, 0, 0, 1, b'p',
        ][..]]
        .concat();
        assert_eq!(
            decode_result(&raised),
            Some(WorkerOutcome::Raised {
                type_name: "T".into(),
                message: "m".into(),
                traceback: String::new(),
                pickled: Some(b"p".to_vec()),
            })
        );
        assert_eq!(decode_result(&raised[..raised.len() - 1]), None);
        assert_eq!(decode_result(&[7]), None);
    }
}
