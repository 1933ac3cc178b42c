//! The network layer of `pyproxy-server`: listener, handshake, sessions on two
//! TCP streams, output and log delivery, limits, signals and shutdown.
//!
//! It exists so that everything a remote peer can touch lives apart from the
//! code that runs Python: this layer speaks [`crate::protocol`], turns `EVAL`
//! frames into [`AtomRequest`]s, and turns what the engine reports through a
//! [`SessionSink`](crate::engine::SessionSink) back into frames. It is
//! blocking `std::net`, one thread per connection, `crossbeam` channels
//! between threads; `docs/architecture.md` lists every thread and how it ends.
//!
//! The engine is reached through the small [`Backend`] seam below so the
//! network layer's tests can run on loopback without embedding CPython; the
//! real engine implements it in [`engine_link`].

pub mod config;
pub mod engine_link;
pub mod error;
pub mod handshake;
pub mod listener;
pub mod logging;
pub mod out_watch;
pub mod registry;
pub mod session;
pub mod threads;
pub mod token;

use std::time::Duration;

use crate::engine::{AtomRequest, Sink};

pub use config::{Cli, ServerConfig};
pub use engine_link::Backends;
pub use error::ServerError;
pub use listener::Server;

/// What the network layer needs from an engine: open sessions, tell its
/// Python version, shut down. [`crate::engine::Engine`] implements it.
pub trait Backend: Send + Sync + 'static {
    /// Opens the engine side of a session; everything its atoms produce goes to `sink`.
    fn open_session(
        &self,
        session_id: u64,
        sink: Sink,
        log: slog::Logger,
    ) -> Result<Box<dyn BackendSession>, String>;
    /// `major.minor.micro` of the Python that runs atoms.
    fn python_version(&self) -> &str;
    /// `sys.implementation.name`, e.g. `cpython`.
    fn implementation(&self) -> &str;
    /// Lets running atoms finish within `grace`, interrupts the rest, ends the interpreters.
    fn shutdown(&self, grace: Duration);
    /// The backend names (HELLO/WELCOME `backend`) this server runs; the
    /// first is the default for a HELLO that names none.
    fn names(&self) -> Vec<&str> {
        vec![handshake::BACKEND]
    }
    /// Opens a session on the backend `name`, one of [`names`](Backend::names).
    fn open_named(
        &self,
        name: &str,
        session_id: u64,
        sink: Sink,
        log: slog::Logger,
    ) -> Result<Box<dyn BackendSession>, String> {
        let _ = name;
        self.open_session(session_id, sink, log)
    }
}

/// One session's handle on the engine.
pub trait BackendSession: Send + 'static {
    fn submit(&self, atom: AtomRequest);
    /// Drops a queued atom or interrupts a running one; false if the id is unknown or done.
    fn cancel(&self, atom_id: u64) -> bool;
    /// Drops queued atoms and interrupts the running one. Idempotent.
    fn close(&self);
}
