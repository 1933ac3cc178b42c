//! The execution engine: runs atoms in per-session sub-interpreters with their
//! own GIL on a bounded pool of executor threads.
//!
//! This file is the contract between the engine and the network layer
//! (`crate::server`). The network layer opens an [`EngineSession`] per PyProxy
//! session, submits atoms to it, and receives everything an atom produces
//! through the [`SessionSink`] it handed over: output lines, the end-of-output
//! mark and the result, in that order for each atom.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{AtomKind, AtomResult, Buffer, FailureOrigin};

/// Settings the engine is started with (from the command line).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Executor threads shared by all sessions (default: the number of cores).
    pub executors: usize,
    /// Ready interpreters kept warm, cloudpickle imported, so opening a session never waits.
    pub warm_pool: usize,
    /// A virtual environment whose site-packages atoms can import (`--python-env` or `VIRTUAL_ENV`).
    pub python_env: Option<PathBuf>,
    /// Working directory of the server process, and so of every atom.
    pub workdir: Option<PathBuf>,
    /// Modules imported into every interpreter before it is handed to a session.
    pub preload: Vec<String>,
    /// Longest line sent in one piece; longer lines are split at this many bytes.
    pub max_line: usize,
    /// Timeout applied to atoms that carry none.
    pub default_timeout: Option<Duration>,
    /// How long an executor that ran out of atoms keeps polling the run queue
    /// before it sleeps (one executor at a time; zero: it sleeps at once).
    pub idle_spin: Duration,
}

/// One atom to run, as decoded from an `EVAL` frame.
#[derive(Clone)]
pub struct AtomRequest {
    /// The EVAL frame's request id; every sink call for this atom carries it.
    pub id: u64,
    pub kind: AtomKind,
    /// Source text (UTF-8) or a cloudpickled code object / callable.
    pub payload: Vec<u8>,
    /// Pickled dict, or None.
    pub globals: Option<Vec<u8>>,
    /// Pickled dict, or None.
    pub locals: Option<Vec<u8>>,
    /// Out-of-band buffers the pickles refer to, in the order they take them.
    pub buffers: Vec<Buffer>,
    /// Overrides the engine's default timeout.
    pub timeout: Option<Duration>,
}

/// Where a session's atoms deliver what they produce. Implemented by the network
/// layer; called from engine threads. For each atom, in this order: any number
/// of `output` calls, then exactly one `finish`. Atoms of a session are
/// finished in submission order.
///
/// One call ends an atom, with its result, because the network layer decides
/// from it how to tell the client: a round trip waits only for the RESULT, so
/// it goes first, and an atom that wrote nothing needs no END_OF_OUTPUT frame
/// at all (docs/performance.md, "RESULT before END_OF_OUTPUT" and "no
/// END_OF_OUTPUT for silent atoms").
///
/// A call may block (back-pressure from a client that does not read); the
/// engine tolerates that, and it slows only that session's atoms.
pub trait SessionSink: Send + Sync + 'static {
    /// Lines the atom wrote to `fd` (1 or 2), each ending in `\n` — except that
    /// the last piece of a call may lack it: an atom's final partial line, or a
    /// `max_line`-sized piece of a longer line. Bytes are passed unchanged.
    fn output(&self, atom: u64, fd: u8, lines: Vec<u8>);
    /// The atom's value or exception. Every byte the atom wrote before it
    /// returned has been passed to `output`; no more output comes for it.
    fn finish(&self, atom: u64, result: AtomResult);
    /// As `finish`, when the session's next atom starts at once on the same
    /// executor: the sink may hold the result back to send it with later ones.
    /// The engine calls `flush` when the session's atoms stop running back to
    /// back, and the executor's pump while the next atom runs past its tick.
    fn finish_with_more(&self, atom: u64, result: AtomResult) {
        self.finish(atom, result);
    }
    /// Sends whatever `finish_with_more` held back.
    fn flush(&self) {}
}

/// Shared handle to a sink.
pub type Sink = Arc<dyn SessionSink>;

/// Why the server interrupted a running atom (either backend); decides how
/// its failure is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interruption {
    Cancelled,
    Timeout(Duration),
    /// The session was closed.
    Closed,
    Shutdown,
}

impl Interruption {
    /// The origin, exception type and message an interrupted atom reports.
    pub(crate) fn failure(self, atom: u64) -> (FailureOrigin, &'static str, String) {
        match self {
            Interruption::Timeout(t) => (
                FailureOrigin::Timeout,
                "builtins.TimeoutError",
                format!("atom {atom} timed out after {:.1} s", t.as_secs_f64()),
            ),
            Interruption::Cancelled => (
                FailureOrigin::Cancelled,
                "builtins.KeyboardInterrupt",
                format!("atom {atom} was cancelled"),
            ),
            Interruption::Closed => (
                FailureOrigin::Cancelled,
                "builtins.KeyboardInterrupt",
                format!("atom {atom} was interrupted: its session was closed"),
            ),
            Interruption::Shutdown => (
                FailureOrigin::Shutdown,
                "builtins.KeyboardInterrupt",
                format!("atom {atom} was interrupted: the server is shutting down"),
            ),
        }
    }
}

mod arena_cache;
mod dict_watch;
mod error;
mod huge_alloc;
mod interp;
pub(crate) mod output;
pub(crate) mod python;
mod runtime;
mod session;
mod watchdog;

pub use error::EngineError;
pub use runtime::Engine;
pub use session::EngineSession;
