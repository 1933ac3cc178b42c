//! One thread watches every attached output-stream for the client closing it
//! (or sending on it, which the protocol forbids), with one `epoll` set.
//!
//! Before, each session kept a thread blocked reading its output-stream for
//! this alone: a fourth thread per session, and a thread hand-off at every
//! ATTACH. A session's output-stream is watched from ATTACH until its teardown
//! calls [`OutWatch::forget`]. An event carries the session id, never a
//! pointer: one that arrives for a session already gone finds nothing and is
//! dropped. Each registration is one-shot and re-armed only when the socket
//! turned out to have nothing to say, so a misbehaving client costs one event.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::session::Session;

/// The `epoll_event.u64` of the stop pipe; session ids are never 0.
const STOP: u64 = 0;
const EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;

/// What the watcher learned from a stirred output-stream.
pub enum Stirred {
    /// Nothing to read after all: keep watching.
    Nothing,
    /// The session was ended (closed, broken, or a protocol error).
    Ended,
}

pub struct OutWatch {
    epoll: OwnedFd,
    stop_w: OwnedFd,
    stop_r: OwnedFd,
    stopping: AtomicBool,
    watched: Mutex<HashMap<u64, Weak<Session>>>,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl OutWatch {
    pub fn new() -> io::Result<OutWatch> {
        // SAFETY: plain syscalls; every fd they return is owned at once.
        unsafe {
            let epoll = OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?);
            let mut fds = [0 as RawFd; 2];
            cvt(libc::pipe2(
                fds.as_mut_ptr(),
                libc::O_CLOEXEC | libc::O_NONBLOCK,
            ))?;
            let (stop_r, stop_w) = (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]));
            let watch = OutWatch {
                epoll,
                stop_w,
                stop_r,
                stopping: AtomicBool::new(false),
                watched: Mutex::new(HashMap::new()),
            };
            watch.ctl(
                libc::EPOLL_CTL_ADD,
                watch.stop_r.as_raw_fd(),
                libc::EPOLLIN as u32,
                STOP,
            )?;
            Ok(watch)
        }
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, id: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: id };
        // SAFETY: our epoll fd; `fd` is open (the caller holds it).
        cvt(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<Session>>> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `session`'s output-stream `fd`, which the session keeps open
    /// until its teardown has called [`OutWatch::forget`].
    pub fn watch(&self, session: &Arc<Session>, fd: RawFd) -> io::Result<()> {
        self.map().insert(session.id, Arc::downgrade(session));
        self.ctl(libc::EPOLL_CTL_ADD, fd, EVENTS, session.id)
            .inspect_err(|_| {
                self.map().remove(&session.id);
            })
    }

    /// Stops watching; call while `fd` is still open (so the number names
    /// the same socket that was registered).
    pub fn forget(&self, id: u64, fd: RawFd) {
        if self.map().remove(&id).is_some() {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, id);
        }
    }

    /// The watcher thread's loop; returns after [`OutWatch::stop`].
    pub fn run(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        while !self.stopping.load(Ordering::Acquire) {
            // SAFETY: our epoll fd and an array of the length we pass.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    -1,
                )
            };
            for ev in &events[..n.max(0) as usize] {
                let id = ev.u64;
                if id == STOP {
                    continue;
                }
                let Some(session) = self.map().get(&id).and_then(Weak::upgrade) else {
                    continue;
                };
                match session.output_stream_stirred() {
                    Stirred::Ended => {
                        self.map().remove(&id);
                    }
                    Stirred::Nothing => {
                        if let Some(fd) = session.output_fd() {
                            if self.map().contains_key(&id) {
                                let _ = self.ctl(libc::EPOLL_CTL_MOD, fd, EVENTS, id);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Ends [`OutWatch::run`] (at server shutdown, when every session is ending anyway).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        // SAFETY: a one-byte write to our own pipe.
        unsafe { libc::write(self.stop_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }
}
