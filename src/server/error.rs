//! Errors of the server as a whole: the few ways starting or running it can
//! fail. Per-connection failures never reach here — they end that connection
//! and are logged — so `main` formats only these for a human.

use std::fmt;
use std::io;
use std::path::PathBuf;

#[derive(Debug)]
pub enum ServerError {
    /// The command line is inconsistent (e.g. `--no-auth` on a public address).
    Config(String),
    /// The engine could not start.
    Engine(String),
    /// The listen address could not be resolved or bound.
    Bind { address: String, source: io::Error },
    /// The token file could not be read or written.
    TokenFile { path: PathBuf, source: io::Error },
    /// Signal handlers could not be installed.
    Signals(io::Error),
    /// Any other operating-system failure while serving.
    Io(io::Error),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Config(m) => write!(f, "{m}"),
            ServerError::Engine(m) => write!(f, "the Python engine failed to start: {m}"),
            ServerError::Bind { address, source } => {
                write!(f, "cannot listen on {address}: {source}")
            }
            ServerError::TokenFile { path, source } => {
                write!(f, "token file {}: {source}", path.display())
            }
            ServerError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            ServerError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Bind { source, .. } | ServerError::TokenFile { source, .. } => {
                Some(source)
            }
            ServerError::Signals(e) | ServerError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ServerError {
    fn from(e: io::Error) -> Self {
        ServerError::Io(e)
    }
}

impl ServerError {
    /// The process exit code `main` uses: 2 for a usage error, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Config(_) => 2,
            _ => 1,
        }
    }
}
