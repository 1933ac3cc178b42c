//! The real engines behind the [`Backend`] seam: a one-to-one forwarding of
//! [`Engine`] and [`EngineSession`], and [`Backends`], which puts the
//! sub-interpreter engine and the fork backend side by side in one server, so
//! the network layer names the engines nowhere else.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::{AtomRequest, Engine, EngineSession, Sink};

use super::{Backend, BackendSession};

impl Backend for Engine {
    fn open_session(
        &self,
        session_id: u64,
        sink: Sink,
        log: slog::Logger,
    ) -> Result<Box<dyn BackendSession>, String> {
        Engine::open_session(self, session_id, sink, log)
            .map(|s| Box::new(s) as Box<dyn BackendSession>)
            .map_err(|e| e.to_string())
    }

    fn python_version(&self) -> &str {
        Engine::python_version(self)
    }

    fn implementation(&self) -> &str {
        Engine::implementation(self)
    }

    fn shutdown(&self, grace: Duration) {
        Engine::shutdown(self, grace);
    }
}

impl BackendSession for EngineSession {
    fn submit(&self, atom: AtomRequest) {
        EngineSession::submit(self, atom);
    }

    fn cancel(&self, atom_id: u64) -> bool {
        EngineSession::cancel(self, atom_id)
    }

    fn close(&self) {
        EngineSession::close(self);
    }
}

/// Several backends in one server, chosen per session by name. The first one
/// given is the default (`--backend`).
pub struct Backends {
    list: Vec<(&'static str, Arc<dyn Backend>)>,
}

impl Backends {
    /// `list`: (wire name, backend), the default first. Must not be empty.
    pub fn new(list: Vec<(&'static str, Arc<dyn Backend>)>) -> Backends {
        assert!(!list.is_empty(), "a server needs a backend");
        Backends { list }
    }

    fn default_backend(&self) -> &Arc<dyn Backend> {
        &self.list[0].1
    }
}

impl Backend for Backends {
    fn open_session(
        &self,
        session_id: u64,
        sink: Sink,
        log: slog::Logger,
    ) -> Result<Box<dyn BackendSession>, String> {
        self.default_backend().open_session(session_id, sink, log)
    }

    fn python_version(&self) -> &str {
        self.default_backend().python_version()
    }

    fn implementation(&self) -> &str {
        self.default_backend().implementation()
    }

    fn shutdown(&self, grace: Duration) {
        // In parallel, so the grace period is not spent once per backend.
        std::thread::scope(|s| {
            for (_, b) in &self.list {
                s.spawn(move || b.shutdown(grace));
            }
        });
    }

    fn names(&self) -> Vec<&str> {
        self.list.iter().map(|(n, _)| *n).collect()
    }

    fn open_named(
        &self,
        name: &str,
        session_id: u64,
        sink: Sink,
        log: slog::Logger,
    ) -> Result<Box<dyn BackendSession>, String> {
        match self.list.iter().find(|(n, _)| *n == name) {
            Some((_, b)) => b.open_session(session_id, sink, log),
            None => Err(format!("this server does not run the `{name}` backend")),
        }
    }
}
