//! The first exchange on every new connection, as a state machine that needs
//! no socket: the server sends `CHALLENGE`, the peer answers with `HELLO`
//! (a main-stream) or `ATTACH` (an output-stream). A `HELLO` is checked here —
//! protocol version, backend, token proof in constant time — and a refusal
//! carries the `ERROR` to send and a reason for the log that holds no secret.
//! Checking an `ATTACH` needs the session table, so that is the registry's.

use std::io::{Read, Write};

use crate::protocol::{
    auth, Attach, Challenge, ErrorCode, ErrorMsg, Frame, FrameReader, FrameWriter, Hello, Kind,
    Limits, Message, Welcome, NONCE_LEN, PROTOCOL_VERSION,
};

use super::token::Token;

/// Largest frame accepted before the peer has proven anything: HELLO and
/// ATTACH are a few hundred bytes, so a stranger cannot make us buffer more.
pub const PRE_AUTH_MAX_FRAME: u32 = 16 * 1024;

/// The backend name this server announces and accepts.
pub const BACKEND: &str = "subinterp";

/// What the first frame turned out to be.
#[derive(Debug)]
pub enum FirstFrame {
    /// A main-stream whose HELLO passed every check.
    Hello(Hello),
    /// An output-stream asking to attach (not yet checked).
    Attach(Attach),
}

/// Why a connection was refused: the `ERROR` to send and a line for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    /// Sent to the peer; never contains a secret.
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    pub fn to_frame(&self) -> Frame {
        Message::Error(ErrorMsg {
            code: self.code,
            message: self.message.clone(),
        })
        .to_frame(0)
    }
}

/// Backend names a client may ask for, known to this version of PyProxy.
pub const KNOWN_BACKENDS: [&str; 2] = ["subinterp", "fork"];

/// One connection's side of the handshake, holding its fresh nonce.
pub struct Challenger {
    token: Option<Token>,
    nonce: [u8; NONCE_LEN],
    /// The backends this server runs, the default first.
    backends: Vec<String>,
}

impl Challenger {
    /// A challenger with a nonce fresh from the OS, so no recorded HELLO verifies twice.
    pub fn new(token: Option<Token>) -> std::io::Result<Challenger> {
        Ok(Challenger {
            token,
            nonce: auth::random_nonce()?,
            backends: vec![BACKEND.to_owned()],
        })
    }

    pub fn with_nonce(token: Option<Token>, nonce: [u8; NONCE_LEN]) -> Challenger {
        Challenger {
            token,
            nonce,
            backends: vec![BACKEND.to_owned()],
        }
    }

    /// The backends this server runs, the default first (not empty).
    pub fn with_backends(mut self, names: &[&str]) -> Challenger {
        if !names.is_empty() {
            self.backends = names.iter().map(|n| (*n).to_owned()).collect();
        }
        self
    }

    /// The backend a checked HELLO's `backend` field selects.
    pub fn backend_for<'a>(&'a self, requested: &'a str) -> &'a str {
        if requested.is_empty() {
            &self.backends[0]
        } else {
            requested
        }
    }

    pub fn auth_required(&self) -> bool {
        self.token.is_some()
    }

    pub fn challenge(&self) -> Frame {
        Message::Challenge(Challenge {
            protocol_version: PROTOCOL_VERSION,
            auth_required: self.auth_required(),
            server_nonce: self.nonce,
        })
        .to_frame(0)
    }

    /// Classifies and checks the peer's first frame.
    pub fn classify(&self, frame: &Frame) -> Result<FirstFrame, Refusal> {
        if !matches!(frame.kind, Kind::Hello | Kind::Attach) {
            return Err(Refusal::new(
                ErrorCode::UnexpectedMessage,
                format!(
                    "expected HELLO or ATTACH as the first frame, got {}",
                    frame.kind
                ),
            ));
        }
        let msg = Message::decode(frame)
            .map_err(|e| Refusal::new(ErrorCode::BadFrame, format!("bad {}: {e}", frame.kind)))?;
        match msg {
            Message::Hello(h) => self.check_hello(h).map(FirstFrame::Hello),
            Message::Attach(a) => Ok(FirstFrame::Attach(a)),
            _ => unreachable!("kind checked above"),
        }
    }

    fn check_hello(&self, h: Hello) -> Result<Hello, Refusal> {
        if h.protocol_version != PROTOCOL_VERSION {
            return Err(Refusal::new(
                ErrorCode::VersionMismatch,
                format!(
                    "client speaks protocol version {}, this server speaks {}",
                    h.protocol_version, PROTOCOL_VERSION
                ),
            ));
        }
        let requested = h.backend.as_str();
        if !requested.is_empty() && !self.backends.iter().any(|b| b == requested) {
            let runs = self
                .backends
                .iter()
                .map(|b| format!("`{b}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let message = if KNOWN_BACKENDS.contains(&requested) {
                format!("the `{requested}` backend is not available on this server; it runs {runs}")
            } else {
                format!("unknown backend `{requested}`; this server runs {runs}")
            };
            return Err(Refusal::new(ErrorCode::UnsupportedBackend, message));
        }
        if let Some(token) = &self.token {
            if !auth::verify_client_proof(token.as_bytes(), &self.nonce, &h.client_nonce, &h.proof)
            {
                return Err(Refusal::new(
                    ErrorCode::AuthFailed,
                    "authentication failed: the client's token does not match the server's",
                ));
            }
        }
        Ok(h)
    }

    /// The `WELCOME` for a checked HELLO.
    pub fn welcome(
        &self,
        hello: &Hello,
        session_id: u64,
        attach_secret: [u8; NONCE_LEN],
        engine: (&str, &str),
        limits: Limits,
    ) -> Frame {
        let server_proof = match &self.token {
            Some(t) => auth::server_proof(t.as_bytes(), &self.nonce, &hello.client_nonce),
            None => [0u8; NONCE_LEN],
        };
        Message::Welcome(Welcome {
            session_id,
            attach_secret,
            server_proof,
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            implementation: engine.0.to_owned(),
            python_version: engine.1.to_owned(),
            backend: self.backend_for(&hello.backend).to_owned(),
            limits,
        })
        .to_frame(0)
    }
}

/// How the first exchange ended when it did not produce a [`FirstFrame`].
#[derive(Debug)]
pub enum HandshakeError {
    /// The peer broke a rule; the `ERROR` frame was sent (best effort).
    Refused(Refusal),
    /// The stream failed or ended (including the handshake deadline).
    Io(crate::protocol::Error),
}

/// Reads the peer's first frame (after `challenger`'s CHALLENGE was sent) and
/// classifies it. On a refusal the ERROR frame is written and flushed before
/// returning.
pub fn read_first<R: Read, W: Write>(
    challenger: &Challenger,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<FirstFrame, HandshakeError> {
    let frame = match reader.read_frame() {
        Ok(f) => f,
        Err(e @ crate::protocol::Error::Io(_))
        | Err(e @ crate::protocol::Error::ConnectionClosed) => return Err(HandshakeError::Io(e)),
        Err(e @ crate::protocol::Error::Truncated { .. }) => return Err(HandshakeError::Io(e)),
        Err(e) => {
            let r = Refusal::new(ErrorCode::BadFrame, e.to_string());
            let _ = writer
                .write_frame(&r.to_frame())
                .and_then(|()| writer.flush());
            return Err(HandshakeError::Refused(r));
        }
    };
    challenger.classify(&frame).map_err(|r| {
        let _ = writer
            .write_frame(&r.to_frame())
            .and_then(|()| writer.flush());
        HandshakeError::Refused(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const NONCE: [u8; 32] = [5; 32];

    fn hello(token: &[u8], server_nonce: &[u8; 32]) -> Hello {
        let client_nonce = [9u8; 32];
        Hello {
            protocol_version: PROTOCOL_VERSION,
            client_nonce,
            proof: auth::client_proof(token, server_nonce, &client_nonce),
            implementation: "cpython".into(),
            python_version: "3.13.0".into(),
            backend: String::new(),
            client: "test".into(),
        }
    }

    fn run(ch: &Challenger, input: Vec<Frame>) -> (Result<FirstFrame, HandshakeError>, Vec<Frame>) {
        let mut bytes = Vec::new();
        for f in input {
            bytes.extend(f.to_bytes());
        }
        let mut r = FrameReader::new(Cursor::new(bytes), PRE_AUTH_MAX_FRAME);
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(&ch.challenge()).unwrap();
        let out = read_first(ch, &mut r, &mut w);
        let mut rr = FrameReader::new(Cursor::new(w.into_inner()), u32::MAX);
        let mut sent = Vec::new();
        while let Ok(f) = rr.read_frame() {
            sent.push(f);
        }
        (out, sent)
    }

    fn sent_error(sent: &[Frame]) -> ErrorMsg {
        match Message::decode(sent.last().unwrap()).unwrap() {
            Message::Error(e) => e,
            other => panic!("expected ERROR, got {other:?}"),
        }
    }

    #[test]
    fn a_good_hello_is_accepted_and_the_welcome_proves_the_token() {
        let ch = Challenger::with_nonce(Some(Token::new("tok")), NONCE);
        let h = hello(b"tok", &NONCE);
        let (out, sent) = run(&ch, vec![Message::Hello(h.clone()).to_frame(0)]);
        let Ok(FirstFrame::Hello(got)) = out else {
            panic!("refused: {out:?}")
        };
        assert_eq!(got, h);
        match Message::decode(&sent[0]).unwrap() {
            Message::Challenge(c) => {
                assert!(c.auth_required);
                assert_eq!(c.server_nonce, NONCE);
            }
            other => panic!("{other:?}"),
        }
        let limits = Limits {
            max_frame: 1 << 20,
            max_pipelined: 8,
            max_line: 100,
            default_timeout_ms: None,
        };
        let w = ch.welcome(&got, 3, [1; 32], ("cpython", "3.13.0"), limits);
        let Message::Welcome(w) = Message::decode(&w).unwrap() else {
            panic!()
        };
        assert!(auth::verify_server_proof(
            b"tok",
            &NONCE,
            &h.client_nonce,
            &w.server_proof
        ));
        assert_eq!(w.backend, "subinterp");
    }

    #[test]
    fn a_wrong_token_is_refused_with_auth_failed() {
        let ch = Challenger::with_nonce(Some(Token::new("tok")), NONCE);
        let (out, sent) = run(
            &ch,
            vec![Message::Hello(hello(b"nope", &NONCE)).to_frame(0)],
        );
        assert!(
            matches!(out, Err(HandshakeError::Refused(ref r)) if r.code == ErrorCode::AuthFailed)
        );
        let e = sent_error(&sent);
        assert_eq!(e.code, ErrorCode::AuthFailed);
        assert!(!e.message.contains("tok\""), "no secret in the message");
    }

    #[test]
    fn a_hello_replayed_against_a_new_challenge_is_refused() {
        // The HELLO was valid for an earlier nonce; this connection has another.
        let old = hello(b"tok", &[1; 32]);
        let ch = Challenger::with_nonce(Some(Token::new("tok")), NONCE);
        let (out, _) = run(&ch, vec![Message::Hello(old).to_frame(0)]);
        assert!(
            matches!(out, Err(HandshakeError::Refused(ref r)) if r.code == ErrorCode::AuthFailed)
        );
    }

    #[test]
    fn without_auth_any_proof_passes_and_the_welcome_proof_is_zero() {
        let ch = Challenger::with_nonce(None, NONCE);
        let mut h = hello(b"x", &NONCE);
        h.proof = [0; 32];
        let (out, sent) = run(&ch, vec![Message::Hello(h.clone()).to_frame(0)]);
        assert!(matches!(out, Ok(FirstFrame::Hello(_))));
        let Message::Challenge(c) = Message::decode(&sent[0]).unwrap() else {
            panic!()
        };
        assert!(!c.auth_required);
        let limits = Limits {
            max_frame: 1,
            max_pipelined: 1,
            max_line: 1,
            default_timeout_ms: Some(5),
        };
        let Message::Welcome(w) =
            Message::decode(&ch.welcome(&h, 1, [0; 32], ("a", "b"), limits)).unwrap()
        else {
            panic!()
        };
        assert_eq!(w.server_proof, [0; 32]);
    }

    #[test]
    fn the_backend_is_chosen_per_session_among_those_the_server_runs() {
        let ch = Challenger::with_nonce(None, NONCE).with_backends(&["fork", "subinterp"]);
        let limits = Limits {
            max_frame: 1,
            max_pipelined: 1,
            max_line: 1,
            default_timeout_ms: None,
        };
        for (asked, runs) in [("", "fork"), ("fork", "fork"), ("subinterp", "subinterp")] {
            let mut h = hello(b"x", &NONCE);
            h.backend = asked.into();
            let (out, _) = run(&ch, vec![Message::Hello(h.clone()).to_frame(0)]);
            assert!(matches!(out, Ok(FirstFrame::Hello(_))), "{asked}");
            let Message::Welcome(w) =
                Message::decode(&ch.welcome(&h, 1, [0; 32], ("a", "b"), limits.clone())).unwrap()
            else {
                panic!()
            };
            assert_eq!(w.backend, runs);
        }
        let mut h = hello(b"x", &NONCE);
        h.backend = "threads".into();
        let (out, _) = run(&ch, vec![Message::Hello(h).to_frame(0)]);
        assert!(
            matches!(out, Err(HandshakeError::Refused(ref r)) if r.code == ErrorCode::UnsupportedBackend
                && r.message.contains("`threads`") && r.message.contains("`fork`, `subinterp`")),
        );
    }

    #[test]
    fn version_backend_and_kind_are_checked() {
        let ch = Challenger::with_nonce(Some(Token::new("tok")), NONCE);
        let mut h = hello(b"tok", &NONCE);
        h.protocol_version = 99;
        let (out, _) = run(&ch, vec![Message::Hello(h).to_frame(0)]);
        assert!(
            matches!(out, Err(HandshakeError::Refused(ref r)) if r.code == ErrorCode::VersionMismatch && r.message.contains("99"))
        );

        let mut h = hello(b"tok", &NONCE);
        h.backend = "fork".into();
        let (out, _) = run(&ch, vec![Message::Hello(h).to_frame(0)]);
        assert!(
            matches!(out, Err(HandshakeError::Refused(ref r)) if r.code == ErrorCode::UnsupportedBackend && r.message.contains("not available"))
        );

        let (out, sent) = run(&ch, vec![Message::Close.to_frame(0)]);
        assert!(
            matches!(out, Err(HandshakeError::Refused(ref r)) if r.code == ErrorCode::UnexpectedMessage)
        );
        assert_eq!(sent_error(&sent).code, ErrorCode::UnexpectedMessage);
    }

    #[test]
    fn garbage_and_oversized_first_frames_are_bad_frames() {
        let ch = Challenger::with_nonce(Some(Token::new("tok")), NONCE);
        // A HELLO with a truncated payload.
        let (out, _) = run(&ch, vec![Frame::new(Kind::Hello, 0, vec![0, 1, 2])]);
        assert!(
            matches!(out, Err(HandshakeError::Refused(ref r)) if r.code == ErrorCode::BadFrame)
        );
        // A length prefix beyond the pre-auth limit is refused before allocation.
        let big = Frame::new(Kind::Hello, 0, vec![0; PRE_AUTH_MAX_FRAME as usize]);
        let (out, sent) = run(&ch, vec![big]);
        assert!(
            matches!(out, Err(HandshakeError::Refused(ref r)) if r.code == ErrorCode::BadFrame)
        );
        assert_eq!(sent_error(&sent).code, ErrorCode::BadFrame);
        // A clean close before any frame is a peer leaving, not a refusal.
        let (out, _) = run(&ch, vec![]);
        assert!(matches!(out, Err(HandshakeError::Io(ref e)) if e.is_disconnect()));
    }

    #[test]
    fn attach_is_passed_on_unchecked() {
        let ch = Challenger::with_nonce(Some(Token::new("tok")), NONCE);
        let a = Attach {
            session_id: 4,
            secret: [7; 32],
        };
        let (out, sent) = run(&ch, vec![Message::Attach(a.clone()).to_frame(0)]);
        assert!(matches!(out, Ok(FirstFrame::Attach(ref got)) if *got == a));
        assert_eq!(sent.len(), 1, "only the CHALLENGE was sent");
    }
}
