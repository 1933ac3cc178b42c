//! The server's logger, and the slog `Drain` that also pushes every record
//! about a session to that session as a `LOG` frame.
//!
//! A record is "about a session" when it carries the key `session` (the
//! network layer and the engine both log through a child logger with
//! `o!("session" => id)`). Routing happens in the drain, not at call sites, so
//! no log line can forget to reach the client and none needs ad-hoc writes.
//! Delivery to a session never blocks the thread that logs: a full per-session
//! log queue drops the record for that session (the server log still has it).

use std::collections::HashMap;
use std::fmt;
use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam::channel::Sender;
use slog::{Drain, Key, Level, OwnedKVList, Record, Serializer, KV};

use crate::protocol::{Frame, Log, LogLevel, Message};

use super::config::LogFormat;

/// The key that marks a record as being about a session.
pub const SESSION_KEY: &str = "session";

/// `LOG` frames queued per session; past this, log records skip the session
/// (checked before each send, so concurrent senders may pass it by a few).
/// The queues are unbounded channels so that an idle session holds no slots:
/// a bounded one preallocated ~48 KiB per session (W7 RSS).
pub const LOG_QUEUE: usize = 1024;

/// Per-session queues for `LOG` frames, keyed by session id.
#[derive(Default)]
pub struct LogRoutes {
    routes: RwLock<HashMap<u64, Sender<Frame>>>,
}

impl LogRoutes {
    pub fn new() -> Arc<LogRoutes> {
        Arc::new(LogRoutes::default())
    }

    pub fn add(&self, session: u64, tx: Sender<Frame>) {
        // Never log while holding this lock: the drain takes it too.
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session, tx);
    }

    pub fn remove(&self, session: u64) {
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&session);
    }

    fn deliver(&self, session: u64, frame: Frame) {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = routes.get(&session).filter(|tx| tx.len() < LOG_QUEUE) {
            let _ = tx.try_send(frame);
        }
    }
}

/// Collects key/values as strings, noting the session id if present.
#[derive(Default)]
struct Collect {
    fields: Vec<(String, String)>,
    session: Option<u64>,
}

impl Serializer for Collect {
    fn emit_arguments(&mut self, key: Key, val: &fmt::Arguments<'_>) -> slog::Result {
        let key = key.to_string();
        let value = val.to_string();
        if key == SESSION_KEY && self.session.is_none() {
            self.session = value.parse().ok();
        }
        // Child loggers may repeat a key; the innermost (first seen) wins.
        if !self.fields.iter().any(|(k, _)| *k == key) {
            self.fields.push((key, value));
        }
        Ok(())
    }
}

fn wire_level(level: Level) -> LogLevel {
    match level {
        Level::Critical => LogLevel::Critical,
        Level::Error => LogLevel::Error,
        Level::Warning => LogLevel::Warning,
        Level::Info => LogLevel::Info,
        Level::Debug => LogLevel::Debug,
        Level::Trace => LogLevel::Trace,
    }
}

/// Builds the `LOG` frame for a record, if it is about a session.
pub fn session_log_frame(record: &Record<'_>, values: &OwnedKVList) -> Option<(u64, Frame)> {
    let mut c = Collect::default();
    let _ = record.kv().serialize(record, &mut c);
    let _ = values.serialize(record, &mut c);
    let session = c.session?;
    let timestamp_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let msg = Message::Log(Log {
        level: wire_level(record.level()),
        timestamp_us,
        message: record.msg().to_string(),
        fields: c.fields,
    });
    Some((session, msg.to_frame(session)))
}

/// Passes every record to `inner` and a copy of each session record to its session.
pub struct SessionRouter<D> {
    inner: D,
    routes: Arc<LogRoutes>,
}

impl<D> SessionRouter<D> {
    pub fn new(inner: D, routes: Arc<LogRoutes>) -> Self {
        SessionRouter { inner, routes }
    }
}

impl<D: Drain> Drain for SessionRouter<D> {
    type Ok = D::Ok;
    type Err = D::Err;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<D::Ok, D::Err> {
        if let Some((session, frame)) = session_log_frame(record, values) {
            self.routes.deliver(session, frame);
        }
        self.inner.log(record, values)
    }
}

/// The server's root logger: stderr in `format`, records below `level` dropped,
/// session records also routed through `routes`.
pub fn build_logger(format: LogFormat, level: Level, routes: Arc<LogRoutes>) -> slog::Logger {
    let stderr: Box<
        dyn Drain<Ok = (), Err = slog::Never> + Send + Sync + RefUnwindSafe + UnwindSafe,
    > = match format {
        LogFormat::Human => {
            let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
            Box::new(slog_term::FullFormat::new(decorator).build().fuse())
        }
        LogFormat::Json => Box::new(
            std::sync::Mutex::new(
                slog_json::Json::new(std::io::stderr())
                    .add_default_keys()
                    .build(),
            )
            .fuse(),
        ),
    };
    let drain = SessionRouter::new(stderr, routes)
        .filter_level(level)
        .fuse();
    slog::Logger::root(drain, slog::o!())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam::channel::bounded;
    use slog::{info, o, Discard};

    #[test]
    fn records_with_a_session_key_reach_that_session_only() {
        let routes = LogRoutes::new();
        let (tx7, rx7) = bounded(8);
        let (tx8, rx8) = bounded(8);
        routes.add(7, tx7);
        routes.add(8, tx8);
        let root = slog::Logger::root(
            SessionRouter::new(Discard, Arc::clone(&routes)).fuse(),
            o!("server" => "test"),
        );
        let s7 = root.new(o!("session" => 7u64));
        info!(s7, "atom finished"; "atom" => 3, "duration_ms" => 1.5);
        info!(root, "not about a session");
        let frame = rx7.try_recv().unwrap();
        assert_eq!(frame.request_id, 7);
        let Message::Log(log) = Message::decode(&frame).unwrap() else {
            panic!("not a LOG frame")
        };
        assert_eq!(log.level, LogLevel::Info);
        assert_eq!(log.message, "atom finished");
        let get = |k: &str| {
            log.fields
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("atom").as_deref(), Some("3"));
        assert_eq!(get("session").as_deref(), Some("7"));
        assert_eq!(get("server").as_deref(), Some("test"));
        assert!(rx7.try_recv().is_err(), "the unkeyed record stays local");
        assert!(
            rx8.try_recv().is_err(),
            "session 8 sees nothing of session 7"
        );
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let routes = LogRoutes::new();
        let (tx, rx) = bounded(1);
        routes.add(1, tx);
        let log = slog::Logger::root(
            SessionRouter::new(Discard, Arc::clone(&routes)).fuse(),
            o!("session" => 1u64),
        );
        for i in 0..10 {
            info!(log, "record"; "i" => i);
        }
        assert_eq!(rx.len(), 1);
        routes.remove(1);
        info!(log, "after removal");
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn a_session_queue_holds_at_most_log_queue_records() {
        // Sessions get unbounded channels (no preallocated slots); the bound is ours.
        let routes = LogRoutes::new();
        let (tx, rx) = crossbeam::channel::unbounded();
        routes.add(1, tx);
        let log = slog::Logger::root(
            SessionRouter::new(Discard, Arc::clone(&routes)).fuse(),
            o!("session" => 1u64),
        );
        for i in 0..LOG_QUEUE + 100 {
            info!(log, "record"; "i" => i);
        }
        assert_eq!(rx.len(), LOG_QUEUE);
        rx.recv().unwrap();
        info!(log, "room for one more");
        assert_eq!(rx.len(), LOG_QUEUE);
    }
}
