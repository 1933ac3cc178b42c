//! Keeps the worked example in `docs/protocol.md` true: every frame of the
//! example is built here from the protocol code, and its hex dump must appear
//! in the spec verbatim. Run with `--nocapture` to print the dumps.

use pyproxy::protocol::auth;
use pyproxy::protocol::*;

const TOKEN: &[u8] = b"example-token";
const SERVER_NONCE: [u8; 32] = [0x11; 32];
const CLIENT_NONCE: [u8; 32] = [0x22; 32];
const SECRET: [u8; 32] = [0x33; 32];

fn hex_dump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|row| {
            row.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The example conversation: (title, frame bytes).
fn example() -> Vec<(&'static str, Vec<u8>)> {
    let proof = auth::client_proof(TOKEN, &SERVER_NONCE, &CLIENT_NONCE);
    let server_proof = auth::server_proof(TOKEN, &SERVER_NONCE, &CLIENT_NONCE);
    let frames = vec![
        (
            "main-stream, server → client: CHALLENGE",
            Message::Challenge(Challenge {
                protocol_version: PROTOCOL_VERSION,
                auth_required: true,
                server_nonce: SERVER_NONCE,
            })
            .to_frame(0),
        ),
        (
            "main-stream, client → server: HELLO",
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                client_nonce: CLIENT_NONCE,
                proof,
                implementation: "cpython".into(),
                python_version: "3.13.0".into(),
                backend: String::new(),
                client: "pyproxy 0.1.0".into(),
            })
            .to_frame(0),
        ),
        (
            "main-stream, server → client: WELCOME",
            Message::Welcome(Welcome {
                session_id: 1,
                attach_secret: SECRET,
                server_proof,
                server_version: "0.1.0".into(),
                implementation: "cpython".into(),
                python_version: "3.13.0".into(),
                backend: "subinterp".into(),
                limits: Limits {
                    max_frame: DEFAULT_MAX_FRAME,
                    max_pipelined: 1024,
                    max_line: 65536,
                    default_timeout_ms: None,
                },
            })
            .to_frame(0),
        ),
        (
            "output-stream, server → client: CHALLENGE (ignored by the client)",
            Message::Challenge(Challenge {
                protocol_version: PROTOCOL_VERSION,
                auth_required: true,
                server_nonce: [0x44; 32],
            })
            .to_frame(0),
        ),
        (
            "output-stream, client → server: ATTACH",
            Message::Attach(Attach {
                session_id: 1,
                secret: SECRET,
            })
            .to_frame(0),
        ),
        (
            "output-stream, server → client: ATTACHED",
            Message::Attached { session_id: 1 }.to_frame(0),
        ),
        (
            "main-stream, client → server: EVAL (atom 1, source)",
            Message::Eval(Eval {
                kind: AtomKind::Source,
                payload: b"print('hi')\n6 * 7".to_vec(),
                globals: None,
                locals: None,
                timeout_ms: Some(5000),
                buffers: Vec::new(),
            })
            .to_frame(1),
        ),
        (
            "output-stream, server → client: OUTPUT (atom 1, fd 1)",
            Message::Output(Output {
                fd: 1,
                data: b"hi\n".to_vec(),
            })
            .to_frame(1),
        ),
        (
            "output-stream, server → client: END_OF_OUTPUT (atom 1)",
            Message::EndOfOutput.to_frame(1),
        ),
        (
            "main-stream, server → client: RESULT (atom 1, value 42)",
            Message::Result(AtomResult {
                duration_us: 250,
                ends_output: false,
                outcome: Outcome::Value {
                    // pickle.dumps(42, protocol=5)
                    pickled: vec![0x80, 0x05, 0x4b, 0x2a, 0x2e],
                    buffers: Vec::new(),
                },
            })
            .to_frame(1),
        ),
        (
            "main-stream, client → server: CLOSE",
            Message::Close.to_frame(2),
        ),
    ];
    frames.into_iter().map(|(t, f)| (t, f.to_bytes())).collect()
}

#[test]
fn worked_example_in_the_spec_matches_the_code() {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("docs/protocol.md exists");
    let mut missing = Vec::new();
    for (title, bytes) in example() {
        let dump = hex_dump(&bytes);
        println!("### {title}\n```text\n{dump}\n```\n");
        if !spec.contains(&dump) {
            missing.push(title);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/protocol.md lacks the current hex of: {missing:?}"
    );
}

#[test]
fn kind_table_in_the_spec_follows_the_enum() {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("docs/protocol.md exists");
    let mut last = 0;
    for kind in Kind::ALL {
        let row = format!("| `0x{:02x}` | `{}` |", *kind as u8, kind.name());
        let at = spec
            .find(&row)
            .unwrap_or_else(|| panic!("kind table lacks row {row}"));
        assert!(at > last, "{row} is out of order");
        last = at;
    }
}
