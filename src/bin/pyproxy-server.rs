//! `pyproxy-server`: see `pyproxy-server --help` and `docs/operations.md`.
//!
//! The only place that formats an error for a human and picks an exit code:
//! 0 after a clean shutdown, 2 for a usage error, 1 for any other failure.
//! Start-up order matters: the fork backend's zygote is forked first, while
//! this process still has one thread (forking a multi-threaded process is
//! unsafe); then the engine initialises CPython on this thread before any
//! other thread exists; then we bind, then print the one stdout line clients
//! and tests wait for.

use std::io::Write;
use std::sync::Arc;

use clap::Parser;
use slog::{o, warn};

use pyproxy::engine::Engine;
use pyproxy::fork::{self, ForkBackend};
use pyproxy::server::config::BackendKind;
use pyproxy::server::listener::SignalThread;
use pyproxy::server::logging::{build_logger, LogRoutes};
use pyproxy::server::{token, Backend, Backends, Cli, Server, ServerError};

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("pyproxy-server: error: {e}");
        std::process::exit(e.exit_code());
    }
}

fn run(cli: Cli) -> Result<(), ServerError> {
    let env_token = std::env::var_os("PYPROXY_TOKEN").is_some();
    let config = cli.into_config(env_token)?;
    // A replacement zygote is this binary run again by the server (see `exec_zygote`).
    fork::zygote::run_if_exec_zygote(&config.fork);
    // Forked first, while this process has one thread.
    let zygote = if config.runs(BackendKind::Fork) {
        Some(fork::fork_zygote(&config.fork).map_err(|e| {
            ServerError::Engine(format!("cannot fork the fork backend's zygote: {e}"))
        })?)
    } else {
        None
    };
    let routes = LogRoutes::new();
    let log = build_logger(config.log_format, config.log_level, Arc::clone(&routes));
    let token = token::resolve(&config.token_source)?;
    if config.fork.user.is_some() && config.runs(BackendKind::Subinterp) {
        warn!(
            log,
            "--user applies to fork workers only: a client that asks for the subinterp \
                    backend runs code inside this server as its own user; pass --backends fork \
                    to allow only isolated sessions"
        );
    }

    // The engine first: it initialises CPython on this thread, before any other exists.
    let engine: Option<Arc<dyn Backend>> = if config.runs(BackendKind::Subinterp) {
        Some(Arc::new(
            Engine::start(config.engine.clone(), log.new(o!("component" => "engine")))
                .map_err(|e| ServerError::Engine(e.to_string()))?,
        ))
    } else {
        None
    };
    let forker: Option<Arc<dyn Backend>> = match zygote {
        Some(z) => {
            match ForkBackend::start(z, config.fork.clone(), log.new(o!("component" => "fork"))) {
                Ok(f) => Some(Arc::new(f)),
                Err(e) => {
                    if let Some(engine) = &engine {
                        engine.shutdown(config.limits.shutdown_grace);
                    }
                    return Err(ServerError::Engine(e));
                }
            }
        }
        None => None,
    };
    let list = config
        .backends
        .iter()
        .map(|kind| {
            let started = match kind {
                BackendKind::Subinterp => &engine,
                BackendKind::Fork => &forker,
            };
            let started = started
                .clone()
                .expect("every backend in --backends was started");
            (kind.name(), started)
        })
        .collect();
    let backend: Arc<dyn Backend> = Arc::new(Backends::new(list));

    let server = match Server::bind(&config, token, Arc::clone(&backend), log.clone(), routes) {
        Ok(s) => s,
        Err(e) => {
            backend.shutdown(config.limits.shutdown_grace);
            return Err(e);
        }
    };
    let (signals, signal_rx) = match SignalThread::install() {
        Ok(s) => s,
        Err(e) => {
            backend.shutdown(config.limits.shutdown_grace);
            return Err(e);
        }
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "pyproxy-server listening on {}", server.local_addr())?;
        out.flush()?;
    }
    let result = server.run(signal_rx);
    signals.stop();
    result
}
