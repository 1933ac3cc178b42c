//! The token proof: HMAC-SHA256 challenge–response, so the token itself never
//! crosses the wire and a recorded handshake cannot be replayed (the server's
//! nonce is fresh for every connection).
//!
//! ```text
//! client proof = HMAC-SHA256(token, "pyproxy-hello-v1"   || server_nonce || client_nonce)
//! server proof = HMAC-SHA256(token, "pyproxy-welcome-v1" || server_nonce || client_nonce)
//! ```

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::message::NONCE_LEN;

type HmacSha256 = Hmac<Sha256>;

const CLIENT_LABEL: &[u8] = b"pyproxy-hello-v1";
const SERVER_LABEL: &[u8] = b"pyproxy-welcome-v1";

fn mac(
    token: &[u8],
    label: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(token).expect("HMAC accepts keys of any length");
    m.update(label);
    m.update(server_nonce);
    m.update(client_nonce);
    m
}

/// The proof a client sends in `HELLO`.
pub fn client_proof(
    token: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
) -> [u8; NONCE_LEN] {
    mac(token, CLIENT_LABEL, server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// The proof a server sends in `WELCOME`.
pub fn server_proof(
    token: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
) -> [u8; NONCE_LEN] {
    mac(token, SERVER_LABEL, server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a client's proof in constant time.
pub fn verify_client_proof(
    token: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
    proof: &[u8; NONCE_LEN],
) -> bool {
    mac(token, CLIENT_LABEL, server_nonce, client_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Checks a server's proof in constant time.
pub fn verify_server_proof(
    token: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
    proof: &[u8; NONCE_LEN],
) -> bool {
    mac(token, SERVER_LABEL, server_nonce, client_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Compares two secrets without leaking where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 bytes from the operating system's CSPRNG.
pub fn random_nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut out = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut out).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(out)
}

/// A fresh token: 32 random bytes as 64 lowercase hex characters.
pub fn random_token() -> std::io::Result<String> {
    Ok(random_nonce()?.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_token_and_nonces() {
        let (s, c) = ([1u8; 32], [2u8; 32]);
        let p = client_proof(b"token", &s, &c);
        assert!(verify_client_proof(b"token", &s, &c, &p));
        assert!(!verify_client_proof(b"tokem", &s, &c, &p));
        assert!(
            !verify_client_proof(b"token", &[3u8; 32], &c, &p),
            "a replay against a new nonce fails"
        );
        assert!(
            !verify_server_proof(b"token", &s, &c, &p),
            "client and server proofs differ"
        );
        let sp = server_proof(b"token", &s, &c);
        assert!(verify_server_proof(b"token", &s, &c, &sp));
    }

    #[test]
    fn known_vector() {
        // Pinned so the spec's worked example and other implementations can check against it.
        let p = client_proof(b"example-token", &[0x11; 32], &[0x22; 32]);
        // Computed independently with Python's hmac module.
        let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "41eb27c1efc83c491ba2287b5976688456bcc762fe31da2682d2eeb30066ca4a"
        );
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(constant_time_eq(a.as_bytes(), a.as_bytes()));
        assert!(!constant_time_eq(a.as_bytes(), b.as_bytes()));
    }
}
