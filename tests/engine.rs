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

fn pickled(s: &mut TestSession, expr: &str) -> Vec<u8> {
    hex_decode(&s.run_str(&format!("import pickle, cloudpickle\n({expr}).hex()")))
}

#[test]
fn function_atom_is_called_with_no_arguments() {
    let mut s = session();
    let payload = pickled(&mut s, "cloudpickle.dumps(lambda: 6 * 7, protocol=5)");
    let rec = s.run_req(AtomRequest {
        id: 0,
        kind: AtomKind::Function,
        payload,
        globals: None,
        locals: None,
        timeout: None,
        buffers: Vec::new(),
    });
    assert_eq!(repr_of(engine(), &rec.value()), "42");
}

#[test]
fn code_atom_is_evaluated_with_globals_and_locals() {
    let mut s = session();
    let payload = pickled(&mut s, "cloudpickle.dumps(compile('x * y', '<c>', 'eval'))");
    let globals = pickled(&mut s, "pickle.dumps({'x': 6, 'y': 1})");
    let locals = pickled(&mut s, "pickle.dumps({'y': 7})");
    let rec = s.run_req(AtomRequest {
        id: 0,
        kind: AtomKind::Code,
        payload,
        globals: Some(globals),
        locals: Some(locals),
        timeout: None,
        buffers: Vec::new(),
    });
    assert_eq!(repr_of(engine(), &rec.value()), "42");
}

#[test]
fn source_globals_and_locals_apply_like_exec() {
    let mut s = session();
    let globals = pickled(&mut s, "pickle.dumps({'a': 40})");
    let locals = pickled(&mut s, "pickle.dumps({'b': 2})");
    let mut req = source(0, "c = a + b\nc");
    req.globals = Some(globals);
    req.locals = Some(locals);
    let rec = s.run_req(req);
    assert_eq!(repr_of(engine(), &rec.value()), "42");
}

#[test]
fn exception_comes_back_with_type_message_traceback_and_pickle() {
    let mut s = session();
    let rec = s.run("def inner():\n    return 1 / 0\ninner()");
    let e = rec.exception();
    assert_eq!(e.origin, FailureOrigin::Raised);
    assert_eq!(e.type_name, "builtins.ZeroDivisionError");
    assert_eq!(e.message, "division by zero");
    assert!(e.traceback.contains("in inner"), "{}", e.traceback);
    assert!(e.traceback.contains("return 1 / 0"), "{}", e.traceback);
    assert!(!e.traceback.contains("pyproxy-engine"), "{}", e.traceback);
    let back = repr_of(engine(), e.pickled.as_ref().expect("pickled"));
    assert_eq!(back, "ZeroDivisionError('division by zero')");
}

#[test]
fn unpicklable_exception_still_reports_type_and_message() {
    let mut s = session();
    let rec = s.run(
        "class Odd(Exception):\n    def __init__(self, a, b):\n        super().__init__(a)\n        self.lock = __import__('threading').Lock()\nraise Odd('x', 'y')",
    );
    let e = rec.exception();
    assert_eq!(e.type_name, "__main__.Odd");
    assert_eq!(e.message, "x");
    assert!(e.pickled.is_none());
}

#[test]
fn unpicklable_return_value_is_an_error_naming_its_type() {
    let mut s = session();
    let rec = s.run("import threading\nthreading.Lock()");
    let e = rec.exception();
    assert_eq!(e.origin, FailureOrigin::Raised);
    assert_eq!(e.type_name, "builtins.TypeError");
    assert!(e.message.contains("_thread.lock"), "{}", e.message);
    // The interpreter is fine afterwards.
    assert_eq!(repr_of(engine(), &s.run("1 + 1").value()), "2");
}

#[test]
fn system_exit_is_a_result_not_the_end_of_the_server() {
    let mut s = session();
    let e = s.run("import sys\nsys.exit(3)").exception();
    assert_eq!(e.type_name, "builtins.SystemExit");
    assert_eq!(repr_of(engine(), &s.run("2").value()), "2");
}

#[test]
fn hundred_thousand_lines_arrive_complete_and_in_order() {
    let mut s = session();
    let started = Instant::now();
    let rec = s.run("for i in range(100_000):\n    print(i)\n'done'");
    let elapsed = started.elapsed();
    let text = rec.text(1);
    let mut n = 0;
    for (i, line) in text.split_terminator('\n').enumerate() {
        assert_eq!(line, i.to_string());
        n += 1;
    }
    assert_eq!(n, 100_000);
    assert!(rec.out.iter().all(|(_, d)| d.ends_with(b"\n")));
    assert!(
        rec.out.len() < 100_000,
        "lines are batched ({} calls)",
        rec.out.len()
    );
    eprintln!("100k lines: {elapsed:?}, {} output calls", rec.out.len());
}

#[test]
fn stdout_and_stderr_are_kept_apart_and_in_order() {
    let mut s = session();
    let rec = s.run(
        "import sys\nfor i in range(1000):\n    print('o', i)\n    print('e', i, file=sys.stderr)",
    );
    let out: Vec<String> = (0..1000).map(|i| format!("o {i}\n")).collect();
    let err: Vec<String> = (0..1000).map(|i| format!("e {i}\n")).collect();
    assert_eq!(rec.text(1), out.concat());
    assert_eq!(rec.text(2), err.concat());
}

#[test]
fn long_lines_are_split_at_max_line() {
    let mut s = session();
    let max = config().max_line;
    let rec = s.run(&format!("print('x' * {}, end='|\\n')", 3 * max + 5));
    let all = rec.stream(1);
    assert_eq!(all.len(), 3 * max + 7);
    for (_, data) in &rec.out {
        for seg in data.split_inclusive(|&b| b == b'\n') {
            assert!(seg.len() <= max, "segment of {} bytes", seg.len());
        }
    }
    assert!(all.ends_with(b"x|\n"));
}

#[test]
fn final_partial_line_is_flushed_when_the_atom_ends() {
    let mut s = session();
    let rec = s.run("print('a')\nprint('partial', end='')");
    assert_eq!(rec.text(1), "a\npartial");
    let rec = s.run("print('next')");
    assert_eq!(rec.text(1), "next\n");
}

#[test]
fn undecodable_text_is_backslash_escaped() {
    let mut s = session();
    let rec = s.run("print('bad \\udcff end')");
    assert_eq!(rec.text(1), "bad \\udcff end\n");
}

#[test]
fn fifty_sessions_in_parallel_each_get_only_their_own_output() {
    let handles: Vec<_> = (0..50)
        .map(|k| {
            std::thread::spawn(move || {
                let mut s = session();
                let rec = s.run(&format!(
                    "import time\nfor i in range(200):\n    print('s{k}', i)\n    if i % 50 == 0: time.sleep(0.001)\n{k}"
                ));
                let want: String = (0..200).map(|i| format!("s{k} {i}\n")).collect();
                assert_eq!(rec.text(1), want);
                assert_eq!(repr_of(engine(), &rec.value()), k.to_string());
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn round_trips_paced_around_the_idle_spin_never_lose_an_atom() {
    // Pauses from 0 to ~150 µs around the 100 µs idle spin (config()) hit every
    // window of the hand-off to a polling executor (Shared::schedule): handed
    // over, taken from the run queue while another is handed over, handed over
    // just as polling ends. A lost session would leave its atom without a result.
    let handles: Vec<_> = (0..6u64)
        .map(|k| {
            std::thread::spawn(move || {
                let mut s = session();
                for i in 0..300u64 {
                    std::thread::sleep(Duration::from_micros((i * 37 + k * 11) % 150));
                    assert_eq!(s.run_str(&format!("str({i} + {k})")), (i + k).to_string());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn atoms_of_a_session_run_in_order() {
    let mut s = session();
    for i in 1..=200u64 {
        s.submit(source(i, &format!("print({i})\n{i}")));
    }
    let last = s.sink.wait(200, WAIT);
    assert_eq!(last.text(1), "200\n");
    assert_eq!(s.sink.result_order(), (1..=200).collect::<Vec<_>>());
}

#[test]
fn state_set_by_one_session_is_not_seen_by_the_next() {
    // Warm sessions are reused: open more sessions than the pool holds, so that
    // every interpreter has been used and reset at least once.
    let marks = "import sys, os, json, builtins, __main__\n\
                 (getattr(os, 'pyproxy_mark', None), getattr(builtins, 'pyproxy_mark', None),\n\
                  getattr(__main__, 'pyproxy_mark', None), '/pyproxy/mark' in sys.path,\n\
                  'pyproxy_mod' in sys.modules, os.environ.get('PYPROXY_MARK'), sys.getrecursionlimit())";
    let mut seen = Vec::new();
    let mut interps = std::collections::HashSet::new();
    let mut reused = false;
    for round in 0..200 {
        if reused && round >= 12 {
            break;
        }
        let mut s = session();
        let id = s.run_str(
            "try:\n    import _interpreters as m\nexcept ImportError:\n    import _xxsubinterpreters as m\n\
             str(m.get_current())",
        );
        reused |= !interps.insert(id);
        let before = repr_of(engine(), &s.run(marks).value());
        seen.push(before);
        let rec = s.run(
            "import sys, os, builtins, types, __main__\n\
             os.pyproxy_mark = 1\nbuiltins.pyproxy_mark = 2\n__main__.pyproxy_mark = 3\n\
             sys.path.append('/pyproxy/mark')\nsys.modules['pyproxy_mod'] = types.ModuleType('pyproxy_mod')\n\
             os.environ['PYPROXY_MARK'] = 'x'\nsys.setrecursionlimit(4321)\nsys.stdout = None",
        );
        assert!(rec.result.is_some());
        s.session.close();
        // Let the reset land, so that the next open most likely takes this interpreter.
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(reused, "no interpreter was reused: {interps:?}");
    for before in seen {
        assert_eq!(before, "(None, None, None, False, False, None, 1000)");
    }
}

#[test]
fn cancel_drops_a_queued_atom_with_a_cancelled_result() {
    let mut s = session();
    s.submit(source(1, "import time\ntime.sleep(0.3)\n1"));
    s.submit(source(2, "print('must not run')\n2"));
    s.submit(source(3, "3"));
    assert!(s.session.cancel(2));
    assert!(!s.session.cancel(99));
    let r2 = s.sink.wait(2, WAIT);
    assert!(r2.out.is_empty());
    assert_eq!(r2.exception().origin, FailureOrigin::Cancelled);
    s.sink.wait(3, WAIT);
    assert_eq!(s.sink.result_order(), vec![1, 2, 3]);
    assert!(!s.session.cancel(2), "finished atoms are unknown");
}

#[test]
fn cancel_interrupts_a_running_atom() {
    let mut s = session();
    s.submit(source(
        1,
        "import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.01)",
    ));
    let t0 = Instant::now();
    s.sink.wait_output(1, WAIT);
    assert!(s.session.cancel(1));
    let rec = s.sink.wait(1, WAIT);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(rec.text(1), "started\n");
    let e = rec.exception();
    assert_eq!(e.origin, FailureOrigin::Cancelled);
    assert!(e.traceback.contains("time.sleep"), "{}", e.traceback);
    // The next atom is not hit by a stale interrupt.
    assert_eq!(
        repr_of(engine(), &s.run("import time\ntime.sleep(0.05)\n7").value()),
        "7"
    );
}

#[test]
fn timeout_interrupts_and_reports_origin_timeout() {
    let mut s = session();
    let mut req = source(1, "while True:\n    pass");
    req.timeout = Some(Duration::from_millis(300));
    let t0 = Instant::now();
    let rec = s.run_req(req);
    let took = t0.elapsed();
    let e = rec.exception();
    assert_eq!(e.origin, FailureOrigin::Timeout);
    assert!(e.message.contains("timed out after 0.3 s"), "{}", e.message);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(repr_of(engine(), &s.run("8").value()), "8");
}

#[test]
fn an_atom_that_swallows_the_interrupt_is_interrupted_again() {
    let mut s = session();
    let mut req = source(
        1,
        "n = 0\nwhile True:\n    try:\n        while True: pass\n    except KeyboardInterrupt:\n        n += 1\n        if n == 2: raise",
    );
    req.timeout = Some(Duration::from_millis(200));
    let rec = s.run_req(req);
    assert_eq!(rec.exception().origin, FailureOrigin::Timeout);
}

#[test]
fn sleep_is_interrupted_at_once_other_blocking_calls_when_they_return() {
    let mut s = session();
    // time.sleep waits on the interpreter's wake pipe, which the interrupt writes to.
    let mut req = source(1, "import time\ntime.sleep(30)\n'finished sleeping'");
    req.timeout = Some(Duration::from_millis(100));
    let t0 = Instant::now();
    let rec = s.run_req(req);
    assert_eq!(rec.exception().origin, FailureOrigin::Timeout);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // The session's next atom sleeps in full: no stale wake-up cuts it short.
    let t0 = Instant::now();
    assert_eq!(
        repr_of(
            engine(),
            &s.run("import time\ntime.sleep(0.3)\n'slept'").value()
        ),
        "'slept'"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t0.elapsed()
    );
    // Documented limitation: any other blocking C call (here select) is one C call;
    // the interrupt lands when it returns.
    let mut req = source(
        3,
        "import select\nselect.select([], [], [], 1.0)\n'finished'\nwhile True: pass",
    );
    req.timeout = Some(Duration::from_millis(100));
    let t0 = Instant::now();
    let rec = s.run_req(req);
    assert_eq!(rec.exception().origin, FailureOrigin::Timeout);
    assert!(
        t0.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn closing_mid_atom_frees_the_interpreter_for_others() {
    let mut s = session();
    s.submit(source(1, "print('running', flush=True)\nwhile True: pass"));
    s.submit(source(2, "2"));
    s.sink.wait_output(1, WAIT);
    s.session.close();
    let rec = s.sink.wait(1, WAIT);
    assert!(rec.exception().message.contains("closed"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.sink.get(2).is_none(), "queued atoms are dropped silently");
    // The engine is healthy: many new sessions work.
    for _ in 0..6 {
        let mut t = session();
        assert_eq!(repr_of(engine(), &t.run("1").value()), "1");
    }
}

#[test]
fn extension_refusing_subinterpreters_names_the_fork_backend() {
    let mut s = session();
    let e = s.run("import _testsinglephase").exception();
    assert_eq!(e.type_name, "builtins.ImportError");
    assert!(e.message.contains("fork backend"), "{}", e.message);
    assert!(e.message.contains("backend=\"fork\""), "{}", e.message);
}

#[test]
fn output_of_a_thread_after_its_atom_returns_goes_to_the_next_atom() {
    let mut s = session();
    let rec = s.run(
        "import threading, time\nev = threading.Event()\n\
         def late():\n    ev.wait()\n    print('late line', flush=True)\n\
         t = threading.Thread(target=late)\nt.start()\nimport builtins\nbuiltins._pp_ev = (ev, t)",
    );
    assert_eq!(rec.text(1), "");
    let rec =
        s.run("import builtins\nev, t = builtins._pp_ev\nev.set()\nt.join()\ndel builtins._pp_ev");
    assert_eq!(rec.text(1), "late line\n");
}
