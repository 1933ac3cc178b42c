//! Completion signals that cross from the reader thread to Python without the
//! GIL: a non-blocking pipe plus a queue of tokens.
//!
//! The reader thread must never call into Python, so when an atom completes it
//! pushes the watcher's token onto the queue and writes one byte to the pipe.
//! Whoever holds the read end — an asyncio loop (`add_reader`), the callback
//! dispatcher thread, or `pyproxy.wait` — wakes up, drains the bytes, takes the
//! tokens and does the Python work in its own thread. The byte is written after
//! the token is queued and the bytes are drained before the queue is taken, so
//! a token is never left behind without a byte to announce it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

/// A pipe whose both ends are non-blocking and close-on-exec.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        unsafe {
            Ok(Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            })
        }
    }

    /// Writes one byte. A full pipe already guarantees a wake-up, so `EAGAIN` is success.
    pub fn signal(&self) {
        let byte = 1u8;
        loop {
            // SAFETY: writing one byte from a valid buffer to an fd we own.
            let rc = unsafe { libc::write(self.write.as_raw_fd(), (&byte as *const u8).cast(), 1) };
            if rc >= 0 {
                return;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
    }

    /// Reads and discards every byte currently in the pipe.
    pub fn drain(&self) {
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reading into a valid buffer of the given length from an fd we own.
            let rc =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if rc > 0 {
                continue;
            }
            if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes (`None`: forever). True if readable.
pub fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = match timeout {
        None => -1,
        Some(d) => d.as_millis().min(i32::MAX as u128) as i32,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0)
}

/// Where completions are announced: tokens chosen by the watcher, and a pipe to wake it.
pub struct Notifier {
    pipe: Pipe,
    tokens: Mutex<Vec<u64>>,
}

impl Notifier {
    pub fn new() -> io::Result<Notifier> {
        Ok(Notifier {
            pipe: Pipe::new()?,
            tokens: Mutex::new(Vec::new()),
        })
    }

    /// The read end, for an event loop to watch.
    pub fn fileno(&self) -> RawFd {
        self.pipe.read.as_raw_fd()
    }

    /// Queues `token` and wakes the watcher. Safe from any thread; never blocks.
    pub fn notify(&self, token: u64) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(token);
        self.pipe.signal();
    }

    /// Takes every queued token without waiting.
    pub fn drain(&self) -> Vec<u64> {
        self.pipe.drain();
        std::mem::take(&mut *self.tokens.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits up to `timeout` for at least one token, then takes them all.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Vec<u64>> {
        let ready = self.drain();
        if !ready.is_empty() {
            return Ok(ready);
        }
        wait_readable(self.fileno(), timeout)?;
        Ok(self.drain())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_token_from_another_thread_wakes_the_waiter() {
        let n = Arc::new(Notifier::new().unwrap());
        let n2 = n.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            n2.notify(7);
            n2.notify(8);
        });
        let start = Instant::now();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(n.wait(Some(Duration::from_secs(5))).unwrap());
        }
        assert_eq!(got, vec![7, 8]);
        assert!(start.elapsed() < Duration::from_secs(2));
        t.join().unwrap();
    }

    #[test]
    fn waiting_with_nothing_queued_times_out_empty() {
        let n = Notifier::new().unwrap();
        let start = Instant::now();
        assert!(n.wait(Some(Duration::from_millis(30))).unwrap().is_empty());
        assert!(start.elapsed() >= Duration::from_millis(25));
    }

    #[test]
    fn a_full_pipe_does_not_block_the_notifier() {
        let n = Notifier::new().unwrap();
        for i in 0..200_000 {
            n.notify(i);
        }
        assert_eq!(n.drain().len(), 200_000);
    }
}
