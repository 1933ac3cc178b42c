//! The main-stream's write side. Requests leave in the order they were
//! submitted, written by whichever thread holds the *token*; small ones may
//! wait (be *corked*) while an earlier atom is still unanswered.
//!
//! Why corking: a `send` on loopback cost the caller ≈ 9 µs here (a pipelined
//! `eval` took 12.6 µs, 3.3 µs once corked) and woke the server's connection
//! thread, so a caller that pipelines thousands of atoms spent most of its time
//! in the kernel. The server runs a session's atoms one
//! at a time, in order, so an atom queued behind an unanswered one cannot start
//! before that one's `RESULT` anyway: it waits here, and the session thread,
//! which wakes for that `RESULT`, sends everything waiting in one write. An
//! atom submitted when nothing is unanswered (a lone `eval(...).wait()`) is
//! written at once by its caller, as before.
//!
//! No request can be stranded: bytes wait only while a thread holds the token
//! (it sends them before giving the token up) or while some atom is
//! unanswered; the session thread takes the token whenever a completion
//! leaves bytes waiting with the token free. It never blocks on the socket:
//! it writes with `MSG_DONTWAIT` and keeps the rest until poll reports the
//! socket writable, so it keeps reading responses whatever the server does.
//! Callers write blocking (as before), so only callers wait for a full socket.

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Requests at most this large may wait in the queue; larger ones (big pickles,
/// out-of-band buffers) are written from the caller's memory by the caller.
pub(crate) const SMALL_REQUEST: usize = 64 * 1024;

/// Once this many bytes wait, the submitting caller sends them itself.
const FLUSH_AT: usize = 256 * 1024;

#[derive(Default)]
struct Queue {
    /// Encoded requests not yet handed to a writer, in submission order.
    waiting: Vec<u8>,
    /// A thread holds the token: it is writing and sends `waiting` before
    /// letting go.
    writing: bool,
    /// Atoms submitted whose completion the session thread has not reported.
    unanswered: u64,
    /// The session is dead: nothing more is written.
    closed: bool,
}

/// What a caller's request does with the queue.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Send {
    /// An atom: may wait while an earlier atom is unanswered.
    Atom,
    /// `CANCEL`, `CLOSE`: sent now (after whatever waits ahead of it).
    Now,
}

pub(crate) struct Outbox {
    queue: Mutex<Queue>,
    /// Signalled when the token is given up or the outbox closes.
    token_free: Condvar,
    stream: TcpStream,
}

impl Outbox {
    pub(crate) fn new(stream: TcpStream) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            token_free: Condvar::new(),
            stream,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a small request and sends it now or leaves it corked; see the
    /// module comment. `encode` appends the request's frame (and may fail
    /// without sending anything); what it returns is returned.
    pub(crate) fn submit<T, E: From<io::Error>>(
        &self,
        send: Send,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<T, E>,
    ) -> Result<T, E> {
        let (value, due) = self.queue(send, encode)?;
        if due {
            self.flush()?;
        }
        Ok(value)
    }

    /// [`Outbox::submit`] without the write: queues the request and says
    /// whether it is due now (not corked, and no one holds the token), in
    /// which case the caller must [`Outbox::flush`]. Never blocks on the
    /// socket, so a caller may hold the GIL through it.
    pub(crate) fn queue<T, E: From<io::Error>>(
        &self,
        send: Send,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<T, E>,
    ) -> Result<(T, bool), E> {
        let mut q = self.lock();
        if q.closed {
            return Err(closed().into());
        }
        let earlier_unanswered = q.unanswered > 0;
        let before = q.waiting.len();
        let value = match encode(&mut q.waiting) {
            Ok(v) => v,
            Err(e) => {
                q.waiting.truncate(before);
                return Err(e);
            }
        };
        if send == Send::Atom {
            q.unanswered += 1;
        }
        let corked = send == Send::Atom && earlier_unanswered && q.waiting.len() < FLUSH_AT;
        Ok((value, !q.writing && !corked))
    }

    /// Sends a large atom with `write`, straight from the caller's memory,
    /// after everything queued ahead of it; waits for the token. `prepare`
    /// runs first, under the queue's lock (it takes the atom's id, so ids
    /// still increase on the wire).
    pub(crate) fn submit_large<T, E: From<io::Error>>(
        &self,
        prepare: impl FnOnce() -> Result<T, E>,
        write: impl FnOnce(&mut &TcpStream, &T) -> io::Result<()>,
    ) -> Result<T, E> {
        let mut q = self.lock();
        while q.writing && !q.closed {
            q = self.token_free.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if q.closed {
            return Err(closed().into());
        }
        let value = prepare()?;
        q.writing = true;
        q.unanswered += 1;
        self.drain(q, Some(|w: &mut &TcpStream| write(w, &value)))?;
        Ok(value)
    }

    /// With the token held: writes what waits, then `then`, then whatever was
    /// queued meanwhile, and gives the token up.
    fn drain<'a>(
        &'a self,
        mut q: MutexGuard<'a, Queue>,
        mut then: Option<impl FnOnce(&mut &TcpStream) -> io::Result<()>>,
    ) -> io::Result<()> {
        let mut batch = Vec::new();
        let result = loop {
            std::mem::swap(&mut batch, &mut q.waiting);
            let last = batch.is_empty() && then.is_none();
            if last {
                break Ok(());
            }
            drop(q);
            let mut w = &self.stream;
            let written = w.write_all(&batch).and_then(|()| match then.take() {
                Some(f) => f(&mut w),
                None => Ok(()),
            });
            batch.clear();
            q = self.lock();
            if let Err(e) = written {
                break Err(e);
            }
        };
        if q.waiting.capacity() < batch.capacity() {
            q.waiting = batch; // keep the larger allocation for the next batch
        }
        q.writing = false;
        drop(q);
        self.token_free.notify_all();
        result
    }

    /// Sends what waits now if no one is writing (a caller about to block on
    /// a result: it should not depend on the session thread to send it).
    pub(crate) fn flush(&self) -> io::Result<()> {
        let q = self.lock();
        if q.writing || q.closed || q.waiting.is_empty() {
            return Ok(());
        }
        self.send_waiting(q)
    }

    /// Takes the token (free, checked by the caller) and writes what waits.
    fn send_waiting(&self, mut q: MutexGuard<'_, Queue>) -> io::Result<()> {
        q.writing = true;
        self.drain(q, None::<fn(&mut &TcpStream) -> io::Result<()>>)
    }

    /// The session thread saw `n` atoms complete. Returns what it should now
    /// send, holding the token, if requests were waiting and no one writes.
    pub(crate) fn answered(&self, n: u64) -> Option<Vec<u8>> {
        let mut q = self.lock();
        q.unanswered = q.unanswered.saturating_sub(n);
        if q.writing || q.closed || q.waiting.is_empty() {
            return None;
        }
        q.writing = true;
        Some(std::mem::take(&mut q.waiting))
    }

    /// The session thread sent all it held: more to send, or the token is given up.
    pub(crate) fn sent_all(&self) -> Option<Vec<u8>> {
        let mut q = self.lock();
        if !q.waiting.is_empty() && !q.closed {
            return Some(std::mem::take(&mut q.waiting));
        }
        q.writing = false;
        drop(q);
        self.token_free.notify_all();
        None
    }

    /// Sends as much of `bytes[*from..]` as the socket takes without blocking.
    /// True when all of it is sent; false when the socket is full.
    pub(crate) fn send_some(&self, bytes: &[u8], from: &mut usize) -> io::Result<bool> {
        while *from < bytes.len() {
            let rest = &bytes[*from..];
            // SAFETY: a valid fd and a live buffer of `rest.len()` bytes.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(false),
                    _ => return Err(e),
                }
            }
            *from += n as usize;
        }
        Ok(true)
    }

    /// The session is dead: drops what waits and wakes callers waiting for the token.
    pub(crate) fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.waiting = Vec::new();
        drop(q);
        self.token_free.notify_all();
    }

    /// Bounds the blocking writes still to come (used by `close`).
    pub(crate) fn set_write_timeout(&self, t: Duration) {
        let _ = self.stream.set_write_timeout(Some(t));
    }

    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the session is closed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::sync::Arc;

    /// An outbox writing to one end of a loopback connection, and the other end.
    fn pair() -> (Arc<Outbox>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        theirs.set_nonblocking(true).unwrap();
        (Arc::new(Outbox::new(ours)), theirs)
    }

    /// What has arrived so far (waits a moment for loopback to deliver).
    fn arrived(peer: &mut TcpStream) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(50));
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    fn put(outbox: &Outbox, send: Send, bytes: &'static [u8]) {
        outbox
            .submit(send, |buf| {
                buf.extend_from_slice(bytes);
                Ok::<(), io::Error>(())
            })
            .unwrap();
    }

    /// Plays the session thread: sends what `answered` handed over, to the end.
    fn send_as_session_thread(outbox: &Outbox, mut bytes: Option<Vec<u8>>) {
        while let Some(b) = bytes {
            let mut from = 0;
            assert!(outbox.send_some(&b, &mut from).unwrap());
            bytes = outbox.sent_all();
        }
    }

    #[test]
    fn a_lone_atom_goes_at_once_and_later_ones_wait_for_an_answer() {
        let (outbox, mut peer) = pair();
        put(&outbox, Send::Atom, b"a");
        assert_eq!(arrived(&mut peer), b"a");
        put(&outbox, Send::Atom, b"b");
        put(&outbox, Send::Atom, b"c");
        assert_eq!(arrived(&mut peer), b"", "corked behind the unanswered atom");
        let bytes = outbox.answered(1);
        assert_eq!(bytes.as_deref(), Some(&b"bc"[..]));
        // While the session thread holds the token, even CANCEL waits for it.
        put(&outbox, Send::Now, b"X");
        send_as_session_thread(&outbox, bytes);
        assert_eq!(arrived(&mut peer), b"bcX");
        // Two still unanswered: the next atom waits; an answer with nothing
        // waiting hands nothing over.
        put(&outbox, Send::Atom, b"d");
        assert_eq!(arrived(&mut peer), b"");
        let bytes = outbox.answered(2);
        send_as_session_thread(&outbox, bytes);
        assert_eq!(arrived(&mut peer), b"d");
        assert_eq!(outbox.answered(1), None);
        put(&outbox, Send::Atom, b"e");
        assert_eq!(arrived(&mut peer), b"e", "nothing unanswered: sent at once");
    }

    #[test]
    fn control_requests_and_flush_send_what_waits_ahead_of_them() {
        let (outbox, mut peer) = pair();
        put(&outbox, Send::Atom, b"a");
        put(&outbox, Send::Atom, b"b");
        put(&outbox, Send::Now, b"C");
        assert_eq!(arrived(&mut peer), b"abC");
        put(&outbox, Send::Atom, b"d");
        assert_eq!(arrived(&mut peer), b"");
        outbox.flush().unwrap();
        assert_eq!(arrived(&mut peer), b"d");
    }

    #[test]
    fn a_large_request_waits_for_the_token_and_follows_what_was_queued() {
        let (outbox, mut peer) = pair();
        put(&outbox, Send::Atom, b"a");
        put(&outbox, Send::Atom, b"b");
        let held = outbox.answered(1);
        assert!(held.is_some());
        let large = {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                outbox.submit_large(
                    || Ok::<u64, io::Error>(7),
                    |w, &id| {
                        assert_eq!(id, 7);
                        w.write_all(b"LARGE")
                    },
                )
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!large.is_finished(), "it waits while the token is held");
        put(&outbox, Send::Atom, b"c");
        send_as_session_thread(&outbox, held);
        assert_eq!(large.join().unwrap().unwrap(), 7);
        assert_eq!(arrived(&mut peer), b"abcLARGE");
    }

    #[test]
    fn the_session_thread_stops_at_a_full_socket_and_resumes() {
        let (outbox, mut peer) = pair();
        put(&outbox, Send::Atom, b"a");
        assert_eq!(arrived(&mut peer), b"a");
        let big = vec![7u8; 32 << 20];
        let mut from = 0;
        assert!(
            !outbox.send_some(&big, &mut from).unwrap(),
            "the socket filled up"
        );
        assert!(from > 0 && from < big.len());
        let reader = std::thread::spawn(move || {
            peer.set_nonblocking(false).unwrap();
            let mut got = vec![0u8; 1 + (32 << 20)];
            peer.read_exact(&mut got[1..]).unwrap();
            got
        });
        while !outbox.send_some(&big, &mut from).unwrap() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(reader.join().unwrap()[1..], big[..]);
    }

    #[test]
    fn closing_fails_a_caller_waiting_for_the_token_and_later_submits() {
        let (outbox, _peer) = pair();
        put(&outbox, Send::Atom, b"a");
        put(&outbox, Send::Atom, b"b");
        let _held = outbox.answered(1);
        let waiting = {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                outbox.submit_large(|| Ok::<(), io::Error>(()), |w, ()| w.write_all(b"L"))
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        outbox.close();
        assert!(waiting.join().unwrap().is_err());
        let r = outbox.submit(Send::Atom, |_| Ok::<(), io::Error>(()));
        assert!(r.is_err());
    }
}
