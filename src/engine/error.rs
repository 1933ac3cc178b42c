//! The engine's error type: one variant per way starting the engine or opening a
//! session can fail. Failures of an atom are not errors here: they are results
//! (`Outcome::Exception`) delivered to the session's sink.

use std::fmt;
use std::path::PathBuf;

/// Why the engine could not start or could not open a session.
#[derive(Debug)]
pub enum EngineError {
    /// `python_env` does not contain `bin/python`.
    PythonEnvNotFound { path: PathBuf },
    /// `workdir` could not be made the current directory.
    Workdir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A path handed to CPython contains a NUL byte or is not UTF-8.
    BadPath { path: PathBuf },
    /// CPython's `Py_InitializeFromConfig` (or a config setter) failed.
    PythonInit { message: String },
    /// CPython was already initialised in this process (the engine owns it).
    AlreadyInitialized,
    /// Creating or warming up a sub-interpreter failed (e.g. cloudpickle or a
    /// preload module missing).
    Interpreter { message: String },
    /// No interpreter became ready in time (the warm pool could not keep up).
    PoolTimeout { waited_ms: u64 },
    /// The engine is shutting down or has shut down.
    ShuttingDown,
    /// An engine thread could not be started.
    Thread { source: std::io::Error },
    /// Creating the output pipes failed (e.g. out of file descriptors).
    Pipe { source: std::io::Error },
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::PythonEnvNotFound { path } => {
                write!(
                    f,
                    "no Python environment at {} (bin/python missing)",
                    path.display()
                )
            }
            EngineError::Workdir { path, source } => {
                write!(
                    f,
                    "cannot change to working directory {}: {source}",
                    path.display()
                )
            }
            EngineError::BadPath { path } => {
                write!(f, "path {} cannot be passed to Python", path.display())
            }
            EngineError::PythonInit { message } => {
                write!(f, "initialising Python failed: {message}")
            }
            EngineError::AlreadyInitialized => {
                write!(f, "Python is already initialised in this process")
            }
            EngineError::Interpreter { message } => {
                write!(f, "creating a sub-interpreter failed: {message}")
            }
            EngineError::PoolTimeout { waited_ms } => {
                write!(f, "no interpreter became ready within {waited_ms} ms")
            }
            EngineError::ShuttingDown => write!(f, "the engine is shutting down"),
            EngineError::Thread { source } => write!(f, "cannot start an engine thread: {source}"),
            EngineError::Pipe { source } => write!(f, "cannot create output pipes: {source}"),
        }
    }
}

impl std::error::Error for EngineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EngineError::Workdir { source, .. }
            | EngineError::Thread { source }
            | EngineError::Pipe { source } => Some(source),
            _ => None,
        }
    }
}
