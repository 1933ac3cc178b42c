//! Shutdown with atoms running: the engine waits out the grace period,
//! interrupts what still runs (origin Shutdown), ends every sub-interpreter and
//! finalises CPython, leaving no engine thread behind. Own binary: CPython is
//! finalised at the end.

mod engine_support;

use std::time::{Duration, Instant};

use engine_support::*;
use pyproxy::engine::{Engine, EngineError};
use pyproxy::protocol::FailureOrigin;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn shutdown_interrupts_running_atoms_and_finalises() {
    let before = threads();
    let engine = Engine::start(config(), logger()).expect("engine starts");
    assert!(threads() > before);

    // One atom that finishes within the grace period, one that never would,
    // one queued behind it, and an idle session.
    let mut quick = TestSession::open(&engine, 1);
    let mut stuck = TestSession::open(&engine, 2);
    let idle = TestSession::open(&engine, 3);
    quick.submit(source(
        1,
        "import time\nprint('sleeping', flush=True)\ntime.sleep(0.3)\n'quick done'",
    ));
    stuck.submit(source(1, "print('spinning', flush=True)\nwhile True: pass"));
    stuck.submit(source(2, "'never runs'"));
    // Both running (on a loaded machine 100 ms of sleep was not always enough).
    quick.sink.wait_output(1, WAIT);
    stuck.sink.wait_output(1, WAIT);

    let t0 = Instant::now();
    engine.shutdown(Duration::from_millis(600));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "{took:?}"
    );

    let q = quick.sink.wait(1, WAIT);
    assert_eq!(unpickle_str(&q.value()), "quick done");
    let s1 = stuck.sink.wait(1, WAIT);
    assert_eq!(s1.text(1), "spinning\n");
    assert_eq!(s1.exception().origin, FailureOrigin::Shutdown);
    let s2 = stuck.sink.wait(2, WAIT);
    assert_eq!(s2.exception().origin, FailureOrigin::Shutdown);

    // Afterwards: idempotent, no sessions, atoms answered at once.
    engine.shutdown(Duration::ZERO);
    assert!(matches!(
        engine.open_session(9, Collect::new(), logger()),
        Err(EngineError::ShuttingDown)
    ));
    idle.session.submit(source(1, "1"));
    assert_eq!(
        idle.sink.wait(1, WAIT).exception().origin,
        FailureOrigin::Shutdown
    );
    drop((quick, stuck, idle));
    assert_eq!(threads(), before, "engine threads left behind");
}
