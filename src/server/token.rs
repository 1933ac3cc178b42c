//! The server's token: where it comes from and the file that tells local
//! clients a generated one. The file is the only place a generated token is
//! ever written, readable by this user alone, and removed at a clean shutdown.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::auth;

use super::config::TokenSource;
use super::error::ServerError;

/// The token secret. `Debug` never shows it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(s: impl Into<String>) -> Token {
        Token(s.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// `$PYPROXY_HOME`, or `~/.pyproxy`.
pub fn pyproxy_home() -> PathBuf {
    if let Some(h) = std::env::var_os("PYPROXY_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".pyproxy")
}

/// `$PYPROXY_HOME/tokens/<port>`: where a generated token is written for local clients.
pub fn token_path(home: &Path, port: u16) -> PathBuf {
    home.join("tokens").join(port.to_string())
}

/// Resolves the token (no file is written here). `None` means auth is off.
pub fn resolve(source: &TokenSource) -> Result<Option<Token>, ServerError> {
    let token = match source {
        TokenSource::Disabled => return Ok(None),
        TokenSource::File(path) => {
            let text = fs::read_to_string(path).map_err(|e| ServerError::TokenFile {
                path: path.clone(),
                source: e,
            })?;
            text.trim().to_owned()
        }
        TokenSource::Env => std::env::var("PYPROXY_TOKEN")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        TokenSource::Random => auth::random_token().map_err(ServerError::Io)?,
    };
    if token.is_empty() {
        return Err(ServerError::Config(match source {
            TokenSource::File(p) => format!("token file {} is empty", p.display()),
            _ => "PYPROXY_TOKEN is set but empty".into(),
        }));
    }
    Ok(Some(Token(token)))
}

/// A token file this process wrote; removed by [`TokenFile::remove`] at a clean shutdown.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    /// Writes `token` to `path`, creating the parent directory with mode 0700
    /// and the file with mode 0600. A stale file from an earlier server on the
    /// same port is replaced, never reused with its old permissions.
    pub fn write(path: PathBuf, token: &Token) -> Result<TokenFile, ServerError> {
        let wrap = |e: io::Error| ServerError::TokenFile {
            path: path.clone(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(wrap)?;
            // `recursive` leaves an existing directory's mode alone; tighten it.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(wrap)?;
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(wrap(e)),
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(wrap)?;
        f.write_all(token.0.as_bytes()).map_err(wrap)?;
        f.write_all(b"\n").map_err(wrap)?;
        f.sync_all().map_err(wrap)?;
        Ok(TokenFile { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file. A file already gone is not an error.
    pub fn remove(self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_home(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pyproxy-token-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn token_file_is_private_and_removed() {
        let home = temp_home("perm");
        let path = token_path(&home, 4242);
        assert!(path.ends_with("tokens/4242"));
        let tok = Token::new("abc123");
        let f = TokenFile::write(path.clone(), &tok).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(fs::read_to_string(&path).unwrap(), "abc123\n");
        f.remove().unwrap();
        assert!(!path.exists());
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn a_stale_world_readable_file_is_replaced() {
        let home = temp_home("stale");
        let path = token_path(&home, 1);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let f = TokenFile::write(path.clone(), &Token::new("new")).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "new\n");
        f.remove().unwrap();
        fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn token_file_source_is_trimmed_and_must_not_be_empty() {
        let home = temp_home("src");
        fs::create_dir_all(&home).unwrap();
        let p = home.join("tok");
        fs::write(&p, "  s3cret \n").unwrap();
        let t = resolve(&TokenSource::File(p.clone())).unwrap().unwrap();
        assert_eq!(t.as_bytes(), b"s3cret");
        fs::write(&p, "\n").unwrap();
        assert!(resolve(&TokenSource::File(p)).is_err());
        assert!(resolve(&TokenSource::Disabled).unwrap().is_none());
        let r = resolve(&TokenSource::Random).unwrap().unwrap();
        assert_eq!(r.as_bytes().len(), 64);
        assert_eq!(format!("{r:?}"), "Token(<redacted>)");
        fs::remove_dir_all(&home).unwrap();
    }
}
