//! Memory stays bounded under session churn: 5,000 sessions opened, given an
//! atom and closed one after another in one process. Interpreters are reset and
//! reused, so RSS levels off (ending and re-creating them would leak 1.6–4.8 MB
//! per session for good). Own binary: it measures the process's RSS.
//!
//! Run alone with output: `cargo test --release --test engine_churn -- --nocapture`.

mod engine_support;

use std::time::Instant;

use engine_support::*;
use pyproxy::engine::Engine;

#[test]
fn five_thousand_sessions_rss_levels_off() {
    let mut cfg = config();
    cfg.warm_pool = 2;
    cfg.executors = 2;
    let engine = Engine::start(cfg, logger()).expect("engine starts");
    // Each session imports modules that are not in the warm snapshot, sets
    // globals on modules and builtins, prints, and leaves garbage behind.
    let atom = "import json, decimal, fractions, builtins, os\n\
                builtins.churn = [object() for _ in range(1000)]\n\
                os.churn = {i: str(i) for i in range(1000)}\n\
                print(json.dumps({'n': len(builtins.churn)}))\n\
                fractions.Fraction(1, 3) + decimal.Decimal(1).as_integer_ratio()[0]";
    let started = Instant::now();
    let mut rss = Vec::new();
    for i in 1..=5000u64 {
        let mut s = TestSession::open(&engine, i);
        let rec = s.run(atom);
        assert_eq!(rec.text(1), "{\"n\": 1000}\n");
        rec.value();
        s.session.close();
        if i % 500 == 0 {
            rss.push((i, rss_kib()));
        }
    }
    let elapsed = started.elapsed();
    for (i, kib) in &rss {
        eprintln!("after {i:>5} sessions: RSS {:.1} MiB", *kib as f64 / 1024.0);
    }
    eprintln!(
        "5000 sessions in {elapsed:.1?} ({:.2} ms per open/atom/close)",
        elapsed.as_secs_f64() * 1000.0 / 5000.0
    );
    let at = |n: u64| rss.iter().find(|(i, _)| *i == n).unwrap().1;
    let (r1000, r5000) = (at(1000), at(5000));
    // Re-creating interpreters would add 1.6–4.8 MB per session (6+ GB here).
    // Allow allocator noise (runs here moved by up to 9 MiB between samples;
    // 8 MiB of slack failed once), nothing that grows with the session count.
    assert!(
        r5000 <= r1000 + 32 * 1024,
        "RSS grew from {r1000} KiB after 1000 sessions to {r5000} KiB after 5000"
    );
    engine.shutdown(std::time::Duration::from_secs(5));
}
