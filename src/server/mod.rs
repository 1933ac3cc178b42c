//! The network layer: listener, handshake, sessions, output-stream, logs.
