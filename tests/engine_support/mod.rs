//! Shared by the engine test binaries: a sink that records what the engine
//! delivers per atom (and checks the per-atom call order), an engine config
//! pointing at the project's venv, and a few helpers to run atoms and read
//! their pickled values back.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pyproxy::engine::{AtomRequest, Engine, EngineConfig, EngineSession, SessionSink};
use pyproxy::protocol::{AtomKind, AtomResult, Outcome, RemoteException};

/// What one atom delivered.
#[derive(Clone, Default, Debug)]
pub struct Rec {
    /// `output` calls in order: (fd, data).
    pub out: Vec<(u8, Vec<u8>)>,
    pub result: Option<AtomResult>,
    /// Broken ordering rules (output after finish, finish twice, ...).
    pub violations: Vec<String>,
}

impl Rec {
    pub fn stream(&self, fd: u8) -> Vec<u8> {
        self.out
            .iter()
            .filter(|(f, _)| *f == fd)
            .flat_map(|(_, d)| d.iter().copied())
            .collect()
    }

    pub fn text(&self, fd: u8) -> String {
        String::from_utf8(self.stream(fd)).expect("utf-8 output")
    }

    pub fn value(&self) -> Vec<u8> {
        match &self.result.as_ref().expect("result").outcome {
            Outcome::Value { pickled, .. } => pickled.clone(),
            Outcome::Exception(e) => panic!("atom raised: {e:?}\n{}", e.traceback),
        }
    }

    pub fn exception(&self) -> RemoteException {
        match &self.result.as_ref().expect("result").outcome {
            Outcome::Exception(e) => e.clone(),
            Outcome::Value { .. } => panic!("atom returned a value"),
        }
    }
}

#[derive(Default)]
pub struct Collect {
    atoms: Mutex<(HashMap<u64, Rec>, Vec<u64>)>,
    cv: Condvar,
}

impl SessionSink for Collect {
    fn output(&self, atom: u64, fd: u8, lines: Vec<u8>) {
        let mut g = self.atoms.lock().unwrap();
        let r = g.0.entry(atom).or_default();
        if r.result.is_some() {
            r.violations.push("output after finish".into());
        }
        if lines.is_empty() {
            r.violations.push("empty output call".into());
        }
        r.out.push((fd, lines));
        self.cv.notify_all();
    }

    fn finish(&self, atom: u64, result: AtomResult) {
        let mut g = self.atoms.lock().unwrap();
        g.1.push(atom);
        let r = g.0.entry(atom).or_default();
        if r.result.is_some() {
            r.violations.push("finished twice".into());
        }
        r.result = Some(result);
        self.cv.notify_all();
    }
}

impl Collect {
    pub fn new() -> Arc<Collect> {
        Arc::new(Collect::default())
    }

    /// Waits until `atom` is finished (panics after `timeout`).
    pub fn wait(&self, atom: u64, timeout: Duration) -> Rec {
        let deadline = Instant::now() + timeout;
        let mut g = self.atoms.lock().unwrap();
        loop {
            if let Some(r) = g.0.get(&atom) {
                if r.result.is_some() {
                    assert!(r.violations.is_empty(), "atom {atom}: {:?}", r.violations);
                    return r.clone();
                }
            }
            let now = Instant::now();
            assert!(now < deadline, "atom {atom}: no result within {timeout:?}");
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Waits until `atom` has written some output (panics after `timeout`):
    /// proof that it is running, where a sleep would only guess.
    pub fn wait_output(&self, atom: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut g = self.atoms.lock().unwrap();
        while g.0.get(&atom).is_none_or(|r| r.out.is_empty()) {
            let now = Instant::now();
            assert!(now < deadline, "atom {atom}: no output within {timeout:?}");
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Atom ids in the order their results arrived.
    pub fn result_order(&self) -> Vec<u64> {
        self.atoms.lock().unwrap().1.clone()
    }

    pub fn get(&self, atom: u64) -> Option<Rec> {
        self.atoms.lock().unwrap().0.get(&atom).cloned()
    }
}

/// The venv atoms import from: the project's `.venv` (3.13), or
/// `ENGINE_TEST_VENV` (e.g. a 3.12 venv, when built with that PYO3_PYTHON).
pub fn venv() -> PathBuf {
    std::env::var_os("ENGINE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv"))
}

pub fn config() -> EngineConfig {
    EngineConfig {
        executors: 4,
        warm_pool: 3,
        python_env: Some(venv()),
        workdir: None,
        preload: vec![],
        max_line: 64 * 1024,
        default_timeout: None,
        idle_spin: std::time::Duration::from_micros(100),
    }
}

pub fn logger() -> slog::Logger {
    if std::env::var_os("PYPROXY_DEBUG").is_some() {
        use slog::Drain;
        let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
        let drain = slog_term::FullFormat::new(decorator).build().fuse();
        slog::Logger::root(drain, slog::o!())
    } else {
        slog::Logger::root(slog::Discard, slog::o!())
    }
}

pub fn source(id: u64, src: &str) -> AtomRequest {
    AtomRequest {
        id,
        kind: AtomKind::Source,
        payload: src.as_bytes().to_vec(),
        globals: None,
        locals: None,
        timeout: None,
        buffers: Vec::new(),
    }
}

pub const WAIT: Duration = Duration::from_secs(60);

/// A session with a collecting sink.
pub struct TestSession {
    pub session: EngineSession,
    pub sink: Arc<Collect>,
    next: u64,
}

impl TestSession {
    pub fn open(engine: &Engine, id: u64) -> TestSession {
        let sink = Collect::new();
        let log = logger().new(slog::o!("session" => id));
        let session = engine
            .open_session(id, sink.clone(), log)
            .expect("open_session");
        TestSession {
            session,
            sink,
            next: 1,
        }
    }

    pub fn submit(&mut self, req: AtomRequest) -> u64 {
        let id = req.id;
        self.next = self.next.max(id + 1);
        self.session.submit(req);
        id
    }

    /// Runs source text and waits for its result.
    pub fn run(&mut self, src: &str) -> Rec {
        let id = self.next;
        self.submit(source(id, src));
        self.sink.wait(id, WAIT)
    }

    pub fn run_req(&mut self, mut req: AtomRequest) -> Rec {
        req.id = self.next;
        let id = self.submit(req);
        self.sink.wait(id, WAIT)
    }

    /// Runs source whose value is a str and returns it.
    pub fn run_str(&mut self, src: &str) -> String {
        let rec = self.run(src);
        unpickle_str(&rec.value())
    }
}

/// Decodes a pickled `str` (protocol 5, as the engine returns a str value).
pub fn unpickle_str(p: &[u8]) -> String {
    let mut i = 0;
    if p.get(i) == Some(&0x80) {
        i += 2; // PROTO n
    }
    if p.get(i) == Some(&0x95) {
        i += 9; // FRAME u64
    }
    let (len, start) = match p[i] {
        0x8c => (p[i + 1] as usize, i + 2),
        b'X' => (
            u32::from_le_bytes(p[i + 1..i + 5].try_into().unwrap()) as usize,
            i + 5,
        ),
        0x8d => (
            u64::from_le_bytes(p[i + 1..i + 9].try_into().unwrap()) as usize,
            i + 9,
        ),
        op => panic!("not a pickled str (opcode {op:#x}): {p:?}"),
    };
    String::from_utf8(p[start..start + len].to_vec()).unwrap()
}

/// `repr()` of a pickled value, computed by the engine in a scratch session.
pub fn repr_of(engine: &Engine, pickled: &[u8]) -> String {
    let mut s = TestSession::open(engine, 0);
    let hex: String = pickled.iter().map(|b| format!("{b:02x}")).collect();
    s.run_str(&format!(
        "import pickle\nrepr(pickle.loads(bytes.fromhex('{hex}')))"
    ))
}

pub fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Resident set size of this process, in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
