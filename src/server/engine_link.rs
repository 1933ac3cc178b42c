//! The real engine behind the [`Backend`] seam: a one-to-one forwarding of
//! [`Engine`] and [`EngineSession`], kept in one place so the network layer
//! names the engine nowhere else.

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
