//! The network layer end to end on loopback, with a fake engine in place of
//! CPython: handshake, attach, atoms with output, ordering, refusal of a bad
//! attach, and a shutdown that returns only once every server thread ended.
//!
//! The fake engine runs each session's atoms on one thread, in order, and
//! understands two kinds of source: `lines N` prints N lines, `sleep MS`
//! sleeps; the value is the payload itself.
#![cfg(feature = "server")]

use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam::channel::{never, unbounded, Sender};

use pyproxy::engine::{AtomRequest, Sink};
use pyproxy::protocol::{
    auth, AtomKind, AtomResult, Attach, ErrorCode, Eval, Frame, FrameReader, FrameWriter, Hello,
    Kind, Message, Outcome, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use pyproxy::server::config::Cli;
use pyproxy::server::logging::LogRoutes;
use pyproxy::server::token::Token;
use pyproxy::server::{Backend, BackendSession, Server};

struct FakeEngine;

struct FakeSession {
    tx: Sender<AtomRequest>,
}

impl Backend for FakeEngine {
    fn open_session(
        &self,
        _id: u64,
        sink: Sink,
        _log: slog::Logger,
    ) -> Result<Box<dyn BackendSession>, String> {
        let (tx, rx) = unbounded::<AtomRequest>();
        thread::spawn(move || {
            for atom in rx {
                let text = String::from_utf8_lossy(&atom.payload).to_string();
                let mut parts = text.split_whitespace();
                match (
                    parts.next(),
                    parts.next().and_then(|n| n.parse::<u64>().ok()),
                ) {
                    (Some("lines"), Some(n)) => {
                        let lines: Vec<u8> =
                            (0..n).flat_map(|i| format!("{i}\n").into_bytes()).collect();
                        sink.output(atom.id, 1, lines);
                    }
                    (Some("sleep"), Some(ms)) => thread::sleep(Duration::from_millis(ms)),
                    _ => {}
                }
                sink.finish(
                    atom.id,
                    AtomResult {
                        duration_us: 1,
                        ends_output: false,
                        outcome: Outcome::Value {
                            pickled: atom.payload,
                            buffers: atom.buffers,
                        },
                    },
                );
            }
        });
        Ok(Box::new(FakeSession { tx }))
    }

    fn python_version(&self) -> &str {
        "3.13.0"
    }

    fn implementation(&self) -> &str {
        "cpython"
    }

    fn shutdown(&self, _grace: Duration) {}
}

impl BackendSession for FakeSession {
    fn submit(&self, atom: AtomRequest) {
        let _ = self.tx.send(atom);
    }

    fn cancel(&self, _atom_id: u64) -> bool {
        false
    }

    fn close(&self) {}
}

const TOKEN: &str = "loopback-token";

fn start(
    extra: &[&str],
) -> (
    SocketAddr,
    pyproxy::server::listener::StopHandle,
    thread::JoinHandle<()>,
) {
    let mut args = vec![
        "pyproxy-server",
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        "/dev/null",
    ];
    args.extend_from_slice(extra);
    let config = <Cli as clap::Parser>::try_parse_from(args)
        .unwrap()
        .into_config(false)
        .unwrap();
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let server = Server::bind(
        &config,
        Some(Token::new(TOKEN)),
        Arc::new(FakeEngine),
        log,
        LogRoutes::new(),
    )
    .unwrap();
    let addr = server.local_addr();
    let stop = server.stop_handle();
    let join = thread::spawn(move || server.run(never()).unwrap());
    (addr, stop, join)
}

struct Conn {
    r: FrameReader<BufReader<TcpStream>>,
    w: FrameWriter<BufWriter<TcpStream>>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn {
            r: FrameReader::new(BufReader::new(s.try_clone().unwrap()), DEFAULT_MAX_FRAME),
            w: FrameWriter::new(BufWriter::new(s)),
        }
    }

    fn send(&mut self, m: Message, id: u64) {
        self.w.write_frame(&m.to_frame(id)).unwrap();
        self.w.flush().unwrap();
    }

    fn recv(&mut self) -> (Frame, Message) {
        let f = self.r.read_frame().unwrap();
        let m = Message::decode(&f).unwrap();
        (f, m)
    }

    /// Next frame that is not a LOG.
    fn recv_skip_logs(&mut self) -> (Frame, Message) {
        loop {
            let (f, m) = self.recv();
            if f.kind != Kind::Log {
                return (f, m);
            }
        }
    }
}

fn open_session(addr: SocketAddr) -> (Conn, Conn, u64) {
    let mut main = Conn::open(addr);
    let Message::Challenge(ch) = main.recv().1 else {
        panic!("no CHALLENGE")
    };
    let client_nonce = auth::random_nonce().unwrap();
    main.send(
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_nonce,
            proof: auth::client_proof(TOKEN.as_bytes(), &ch.server_nonce, &client_nonce),
            implementation: "cpython".into(),
            python_version: "3.13.0".into(),
            backend: String::new(),
            client: "loopback".into(),
        }),
        0,
    );
    let Message::Welcome(w) = main.recv().1 else {
        panic!("no WELCOME")
    };
    assert!(auth::verify_server_proof(
        TOKEN.as_bytes(),
        &ch.server_nonce,
        &client_nonce,
        &w.server_proof
    ));
    let mut out = Conn::open(addr);
    out.recv();
    out.send(
        Message::Attach(Attach {
            session_id: w.session_id,
            secret: w.attach_secret,
        }),
        0,
    );
    assert_eq!(
        out.recv().1,
        Message::Attached {
            session_id: w.session_id
        }
    );
    (main, out, w.session_id)
}

fn eval(source: &str) -> Message {
    Message::Eval(Eval {
        kind: AtomKind::Source,
        payload: source.as_bytes().to_vec(),
        globals: None,
        locals: None,
        timeout_ms: None,
        buffers: Vec::new(),
    })
}

#[test]
fn atoms_output_and_results_flow_and_shutdown_joins_every_thread() {
    let (addr, stop, join) = start(&[]);
    let (mut main, mut out, _) = open_session(addr);
    for id in 1..=50 {
        main.send(eval(&format!("lines {id}")), id);
    }
    for id in 1..=50u64 {
        let (f, m) = main.recv();
        assert_eq!(f.request_id, id);
        assert!(matches!(m, Message::Result(_)));
    }
    for id in 1..=50u64 {
        let mut text = Vec::new();
        loop {
            let (f, m) = out.recv_skip_logs();
            assert_eq!(f.request_id, id);
            match m {
                Message::Output(o) => text.extend(o.data),
                Message::EndOfOutput => break,
                other => panic!("{other:?}"),
            }
        }
        let expected: Vec<u8> = (0..id)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        assert_eq!(text, expected);
    }
    // A large output is split into bounded pieces at line ends, nothing lost.
    main.send(eval("lines 100000"), 99);
    let mut total = 0;
    loop {
        match out.recv_skip_logs().1 {
            Message::Output(o) => {
                assert!(o.data.len() <= 64 * 1024 && o.data.ends_with(b"\n"));
                total += o.data.len();
            }
            Message::EndOfOutput => break,
            other => panic!("{other:?}"),
        }
    }
    let expected: usize = (0..100000).map(|i: usize| i.to_string().len() + 1).sum();
    assert_eq!(total, expected);
    main.recv();

    let started = Instant::now();
    stop.stop();
    // GOODBYE is the last frame of the output-stream.
    let mut last = None;
    while let Ok(f) = out.r.read_frame() {
        last = Some(f.kind);
    }
    assert_eq!(last, Some(Kind::Goodbye));
    join.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_guessed_attach_secret_is_refused_and_the_session_keeps_working() {
    let (addr, stop, join) = start(&[]);
    let (mut main, mut out, id) = open_session(addr);
    let mut thief = Conn::open(addr);
    thief.recv();
    thief.send(
        Message::Attach(Attach {
            session_id: id,
            secret: [0; 32],
        }),
        0,
    );
    match thief.recv().1 {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::AttachRefused),
        other => panic!("{other:?}"),
    }
    assert!(thief.r.read_frame().unwrap_err().is_disconnect());
    main.send(eval("lines 3"), 1);
    assert!(matches!(main.recv().1, Message::Result(_)));
    assert!(matches!(out.recv_skip_logs().1, Message::Output(_)));
    main.send(Message::Close, 0);
    assert!(main.r.read_frame().unwrap_err().is_disconnect());
    stop.stop();
    join.join().unwrap();
}

#[test]
fn an_unattached_session_is_dropped_at_its_deadline() {
    let (addr, stop, join) = start(&["--attach-timeout", "0.3"]);
    let mut main = Conn::open(addr);
    let Message::Challenge(ch) = main.recv().1 else {
        panic!()
    };
    let client_nonce = [1; 32];
    main.send(
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_nonce,
            proof: auth::client_proof(TOKEN.as_bytes(), &ch.server_nonce, &client_nonce),
            implementation: "cpython".into(),
            python_version: "3.13.0".into(),
            backend: "subinterp".into(),
            client: "loopback".into(),
        }),
        0,
    );
    assert!(matches!(main.recv().1, Message::Welcome(_)));
    let started = Instant::now();
    match main.recv().1 {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::Timeout),
        other => panic!("{other:?}"),
    }
    assert!(main.r.read_frame().unwrap_err().is_disconnect());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    stop.stop();
    join.join().unwrap();
}
