//! Puts libpython's directory in the server's rpath, so `pyproxy-server` starts
//! without `LD_LIBRARY_PATH`. Only the `server` feature embeds Python; the
//! protocol-only build (the client's) links nothing of Python through us.

fn main() {
    #[cfg(feature = "server")]
    pyo3_build_config::add_libpython_rpath_link_args();
}
