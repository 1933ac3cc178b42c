//! The physical floors PyProxy's benchmark compares against: what one round trip
//! and one bulk transfer cost over loopback TCP with nothing but the kernel in
//! the way. `bench/run.py` runs this binary and divides PyProxy's figures by its.
//!
//! Modes (each prints one JSON object on stdout):
//! - `pingpong rtt [--iters N] [--size BYTES]`: a client thread sends `size` bytes and
//!   waits for the same `size` bytes back, `iters` times, over one TCP_NODELAY loopback
//!   connection to an echo thread; reports the p50/p99/mean round trip in µs.
//! - `pingpong bw [--bytes N] [--reps R] [--chunk BYTES]`: one thread writes `bytes`
//!   bytes, the other reads them all and answers one byte; reports MB/s (10^6 bytes/s)
//!   of the best and the median of `reps` transfers. With `--message`, each transfer is
//!   one `bytes`-long write from one buffer into one buffer of that size on the other
//!   side (both allocated and touched once, before the first transfer), as one large
//!   payload moves, instead of `chunk`-sized pieces that stay in the CPU caches.
//! - `pingpong open [--iters N] [--pause MS]`: after `pause` ms of idleness, connects
//!   two TCP_NODELAY loopback connections to a listener and makes one round trip of
//!   13 bytes on the first (an accept thread answers); reports the median and p90 in
//!   ms. The least a session of two streams and one no-op costs on this machine
//!   after the same idle pause as W5 (no handshake, no thread started per connection).
//!
//! Server and client run as two threads of one process, pinned to nothing, as
//! PyProxy's client and server are two processes on the same two cores.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Instant;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, got {v:?}"))
        })
        .unwrap_or(default)
}

fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let client = TcpStream::connect(addr).expect("connect loopback");
    let (server, _) = listener.accept().expect("accept");
    client.set_nodelay(true).expect("nodelay");
    server.set_nodelay(true).expect("nodelay");
    (client, server)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn rtt(args: &[String]) {
    let iters: usize = arg(args, "--iters", 20_000);
    let size: usize = arg(args, "--size", 13);
    let warmup = iters / 10 + 1;
    let (mut client, mut server) = pair();
    let echo = thread::spawn(move || {
        let mut buf = vec![0u8; size];
        for _ in 0..iters + warmup {
            server.read_exact(&mut buf).expect("echo read");
            server.write_all(&buf).expect("echo write");
        }
    });
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + warmup {
        let t = Instant::now();
        client.write_all(&msg).expect("write");
        client.read_exact(&mut back).expect("read");
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    echo.join().expect("echo thread");
    times.sort_by(|a, b| a.total_cmp(b));
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "{{\"mode\":\"rtt\",\"iters\":{iters},\"size\":{size},\"p50_us\":{:.2},\"p99_us\":{:.2},\"mean_us\":{mean:.2}}}",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
}

fn bw(args: &[String]) {
    let bytes: usize = arg(args, "--bytes", 64 << 20);
    let reps: usize = arg(args, "--reps", 5);
    let message = args.iter().any(|a| a == "--message");
    let chunk: usize = if message {
        bytes
    } else {
        arg(args, "--chunk", 1 << 20)
    };
    let (mut client, mut server) = pair();
    let sink = thread::spawn(move || {
        let mut buf = vec![1u8; chunk];
        for _ in 0..reps {
            let mut left = bytes;
            while left > 0 {
                let n = server.read(&mut buf[..chunk.min(left)]).expect("sink read");
                assert!(n > 0, "sender closed early");
                left -= n;
            }
            server.write_all(&[1]).expect("ack");
        }
    });
    let data = vec![0x5au8; chunk];
    let mut rates = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = chunk.min(left);
            client.write_all(&data[..n]).expect("write");
            left -= n;
        }
        let mut ack = [0u8; 1];
        client.read_exact(&mut ack).expect("ack");
        rates.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    sink.join().expect("sink thread");
    rates.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"mode\":\"bw\",\"bytes\":{bytes},\"reps\":{reps},\"chunk\":{chunk},\"message\":{message},\"median_mb_s\":{:.1},\"best_mb_s\":{:.1}}}",
        percentile(&rates, 0.5),
        rates[rates.len() - 1]
    );
}

fn open(args: &[String]) {
    let iters: usize = arg(args, "--iters", 20);
    let pause: u64 = arg(args, "--pause", 50);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let server = thread::spawn(move || {
        for _ in 0..iters {
            let (mut first, _) = listener.accept().expect("accept");
            let (_second, _) = listener.accept().expect("accept");
            first.set_nodelay(true).expect("nodelay");
            let mut buf = [0u8; 13];
            first.read_exact(&mut buf).expect("server read");
            first.write_all(&buf).expect("server write");
        }
    });
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        thread::sleep(std::time::Duration::from_millis(pause));
        let t = Instant::now();
        let mut first = TcpStream::connect(addr).expect("connect loopback");
        first.set_nodelay(true).expect("nodelay");
        let second = TcpStream::connect(addr).expect("connect loopback");
        second.set_nodelay(true).expect("nodelay");
        let mut buf = [7u8; 13];
        first.write_all(&buf).expect("write");
        first.read_exact(&mut buf).expect("read");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    server.join().expect("server thread");
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"mode\":\"open\",\"iters\":{iters},\"pause_ms\":{pause},\"p50_ms\":{:.3},\"p90_ms\":{:.3}}}",
        percentile(&times, 0.5),
        percentile(&times, 0.9)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("rtt") => rtt(&args),
        Some("bw") => bw(&args),
        Some("open") => open(&args),
        _ => {
            eprintln!(
                "usage: pingpong rtt [--iters N] [--size BYTES] \
                 | bw [--bytes N] [--reps R] [--chunk BYTES | --message] \
                 | open [--iters N] [--pause MS]"
            );
            std::process::exit(2);
        }
    }
}
