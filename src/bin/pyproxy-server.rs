//! `pyproxy-server`: see `pyproxy-server --help`.

fn main() {
    eprintln!("pyproxy-server: the server is not built yet (issue 3)");
    std::process::exit(2);
}
