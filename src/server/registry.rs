//! The server's tables: live sessions by id (for ATTACH, the attach-deadline
//! sweep and shutdown) and open connections by peer (for the per-peer limit
//! and for closing every socket at shutdown).
//!
//! Session ids come from a counter and are never reused, so an id that has
//! ended is simply unknown from then on: it can never be attached again.

use std::collections::HashMap;
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::protocol::{auth, NONCE_LEN};

use super::session::Session;

/// Why an ATTACH was refused. The peer is told only "unknown session or wrong
/// secret" for the first two, so guessing ids teaches it nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachRefused {
    /// No live session has this id (never existed, ended or expired).
    UnknownSession,
    /// The id is live but the secret does not match.
    WrongSecret,
    /// The session already has its output-stream.
    AlreadyAttached,
}

impl AttachRefused {
    /// Text for the log (the server's eyes only).
    pub fn log_reason(self) -> &'static str {
        match self {
            AttachRefused::UnknownSession => "unknown, ended or expired session",
            AttachRefused::WrongSecret => "wrong attach secret",
            AttachRefused::AlreadyAttached => "session already has an output-stream",
        }
    }

    /// Text for the peer.
    pub fn client_message(self, session_id: u64) -> String {
        match self {
            AttachRefused::UnknownSession | AttachRefused::WrongSecret => {
                format!("attach refused: unknown session {session_id} or wrong secret")
            }
            AttachRefused::AlreadyAttached => {
                format!("attach refused: session {session_id} already has an output-stream")
            }
        }
    }
}

#[derive(Default)]
struct Conns {
    next: u64,
    open: HashMap<u64, TcpStream>,
    per_peer: HashMap<IpAddr, usize>,
}

/// Sessions and connections. Shared by every connection thread and the main thread.
pub struct Registry {
    next_session: AtomicU64,
    max_sessions: usize,
    max_conns_per_peer: usize,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    conns: Mutex<Conns>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One open connection. Dropping it forgets the socket and frees the peer's slot.
pub struct ConnSlot {
    registry: Arc<Registry>,
    id: u64,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = lock(&self.registry.conns);
        c.open.remove(&self.id);
        if let Some(n) = c.per_peer.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.ip);
            }
        }
    }
}

impl Registry {
    pub fn new(max_sessions: usize, max_conns_per_peer: usize) -> Arc<Registry> {
        Arc::new(Registry {
            next_session: AtomicU64::new(1),
            max_sessions,
            max_conns_per_peer,
            sessions: Mutex::new(HashMap::new()),
            conns: Mutex::new(Conns::default()),
        })
    }

    /// Takes a connection slot for `ip`, or `None` when the peer is at its limit.
    /// `stream` is a clone kept so shutdown can close the connection.
    pub fn open_conn(self: &Arc<Self>, ip: IpAddr, stream: TcpStream) -> Option<ConnSlot> {
        let mut c = lock(&self.conns);
        let n = c.per_peer.entry(ip).or_insert(0);
        if *n >= self.max_conns_per_peer {
            return None;
        }
        *n += 1;
        c.next += 1;
        let id = c.next;
        c.open.insert(id, stream);
        Some(ConnSlot {
            registry: Arc::clone(self),
            id,
            ip,
        })
    }

    /// Open connections, all peers.
    pub fn conn_count(&self) -> usize {
        lock(&self.conns).open.len()
    }

    /// Shuts every open socket both ways: blocked readers and writers return.
    pub fn shutdown_all_conns(&self) {
        for s in lock(&self.conns).open.values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A fresh session id; never returned twice in this process.
    pub fn allocate_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a session unless `max_sessions` are already open.
    pub fn insert(&self, session: Arc<Session>) -> Result<(), usize> {
        let mut s = lock(&self.sessions);
        if s.len() >= self.max_sessions {
            return Err(self.max_sessions);
        }
        s.insert(session.id, session);
        Ok(())
    }

    pub fn remove(&self, id: u64) {
        lock(&self.sessions).remove(&id);
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        lock(&self.sessions).values().cloned().collect()
    }

    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Finds the session an ATTACH names and checks its secret in constant
    /// time. Whether it is still waiting for its output-stream is the
    /// session's to decide (under its own lock), see [`Session::attach`].
    pub fn lookup_for_attach(
        &self,
        id: u64,
        secret: &[u8; NONCE_LEN],
    ) -> Result<Arc<Session>, AttachRefused> {
        let session = lock(&self.sessions)
            .get(&id)
            .cloned()
            .ok_or(AttachRefused::UnknownSession)?;
        if !auth::constant_time_eq(session.secret(), secret) {
            return Err(AttachRefused::WrongSecret);
        }
        Ok(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn per_peer_slots_are_limited_and_released() {
        let r = Registry::new(4, 2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let (a, _a) = pair();
        let s1 = r.open_conn(ip, a.try_clone().unwrap()).unwrap();
        let s2 = r.open_conn(ip, a.try_clone().unwrap()).unwrap();
        assert!(r.open_conn(ip, a.try_clone().unwrap()).is_none());
        let s3 = r.open_conn(other, a.try_clone().unwrap()).unwrap();
        assert_eq!(r.conn_count(), 3);
        drop(s1);
        let s4 = r.open_conn(ip, a.try_clone().unwrap()).unwrap();
        drop((s2, s3, s4));
        assert_eq!(r.conn_count(), 0);
    }

    #[test]
    fn session_ids_are_never_reused() {
        let r = Registry::new(4, 2);
        let ids: Vec<u64> = (0..100).map(|_| r.allocate_id()).collect();
        let mut sorted = ids.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), 100);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(ids[0] >= 1, "0 is never a session id");
    }

    #[test]
    fn refusal_messages_do_not_tell_unknown_from_wrong_secret() {
        assert_eq!(
            AttachRefused::UnknownSession.client_message(5),
            AttachRefused::WrongSecret.client_message(5)
        );
        assert_ne!(
            AttachRefused::UnknownSession.log_reason(),
            AttachRefused::WrongSecret.log_reason()
        );
    }
}
