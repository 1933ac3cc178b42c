//! The sub-interpreter engine through its public API, with a collecting sink.
//! CPython can be initialised once per process, so every test here shares one
//! engine (never shut down: `tests/engine_shutdown.rs` covers that) and opens
//! sessions of its own.

mod engine_support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use engine_support::*;
use pyproxy::engine::{AtomRequest, Engine};
use pyproxy::protocol::{AtomKind, FailureOrigin};

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::start(config(), logger()).expect("engine starts"))
}

static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn session() -> TestSession {
    TestSession::open(
        engine(),
        NEXT_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    )
}

#[test]
fn reports_version_and_implementation() {
    let e = engine();
    assert!(
        e.python_version().starts_with("3.1"),
        "{}",
        e.python_version()
    );
    assert_eq!(e.implementation(), "cpython");
}

#[test]
fn expression_source_returns_its_value() {
    let mut s = session();
    let rec = s.run("6 * 7");
    assert_eq!(repr_of(engine(), &rec.value()), "42");
}

#[test]
fn statements_return_the_last_expression_like_a_notebook() {
    let mut s = session();
    let rec = s.run("x = 20\ndef f(y):\n    return x + y\nf(22)");
    assert_eq!(repr_of(engine(), &rec.value()), "42");
    let rec = s.run("x = 1\ny = 2");
    assert_eq!(repr_of(engine(), &rec.value()), "None");
}

#[test]
fn each_atom_gets_a_fresh_namespace() {
    let mut s = session();
    s.run("leftover = 1");
    let rec = s.run("'leftover' in globals()");
    assert_eq!(repr_of(engine(), &rec.value()), "False");
}

#[test]
fn venv_site_packages_are_importable() {
    let mut s = session();
    let prefix = s.run_str("import sys, cloudpickle\nsys.prefix");
    assert_eq!(prefix, venv().display().to_string());
}

#[test]
fn print_reaches_the_sink_before_end_and_result() {
    let mut s = session();
    let rec = s.run("print('hello')\nimport sys\nprint('oops', file=sys.stderr)\n5");
    assert_eq!(rec.text(1), "hello\n");
    assert_eq!(rec.text(2), "oops\n");
    assert_eq!(repr_of(engine(), &rec.value()), "5");
}
