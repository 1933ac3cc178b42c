//! Moves what an atom prints from its interpreter's pipes to the session's sink.
//!
//! Each executor thread has a companion *pump* thread. While the executor runs
//! an atom, the pump `poll(2)`s that interpreter's stdout and stderr pipes,
//! splits what it reads into lines and hands them to the sink in batches, so a
//! long atom's output streams while it runs and a client that reads slowly
//! stalls the atom whose output it is (the pipe fills and its `print` blocks).
//!
//! The executor does not wait for its pump at either end of an atom. At the
//! start it only puts the atom in the slot they share; the pump, which wakes at
//! least every millisecond while atoms come and go, picks it up from there (and
//! is woken explicitly only after sleeping through 50 ms without atoms: by the
//! attach, or earlier by `expect_atom` when a session opens). When
//! the atom returns (having flushed `sys.stdout`/`stderr`), everything it
//! wrote is already in the pipes, which are non-blocking: the executor takes
//! the atom out of the slot and reads both pipes until they are empty itself,
//! delivering the rest including a final partial line. The slot's lock orders
//! the two readers (a batch the pump is delivering completes first), so every
//! byte is delivered before the atom's `finish`, in order. The executor starts the
//! session's next atom only after the result, so no byte can be attributed to
//! the wrong atom — except bytes written by threads the atom started and left
//! running: those written before the drain belong to this atom, later ones to
//! the session's next atom (they wait in the pipe until then).
//!
//! Lines longer than `max_line` are delivered in pieces of `max_line` bytes;
//! such a piece, and an atom's final partial line, is the last thing in its
//! `output` call and carries no `\n` (no byte is ever added or dropped).

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use super::Sink;

/// Largest batch handed to one `sink.output` call (plus at most one line).
const BATCH: usize = 256 * 1024;

/// Splits a byte stream into lines and pieces, collecting `output` batches.
pub(crate) struct Splitter {
    max_line: usize,
    /// Bytes of an unfinished line; always shorter than `max_line`.
    partial: Vec<u8>,
    /// The batch being built.
    batch: Vec<u8>,
    /// Batches ready to deliver.
    ready: Vec<Vec<u8>>,
}

impl Splitter {
    pub(crate) fn new(max_line: usize) -> Splitter {
        Splitter {
            max_line: max_line.max(1),
            partial: Vec::new(),
            batch: Vec::new(),
            ready: Vec::new(),
        }
    }

    fn cut(&mut self) {
        if !self.batch.is_empty() {
            self.ready.push(std::mem::take(&mut self.batch));
        }
    }

    /// Adds one complete unit: a line ending in `\n` (`whole`) or a piece.
    fn unit(&mut self, data: &[u8], whole: bool) {
        if self.batch.len() + data.len() > BATCH {
            self.cut();
        }
        self.batch.extend_from_slice(data);
        if !whole {
            self.cut();
        }
    }

    /// Feeds bytes read from the pipe.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = self.max_line - self.partial.len();
            let newline = data.iter().take(room).position(|&b| b == b'\n');
            match newline {
                Some(i) => {
                    let (line, rest) = data.split_at(i + 1);
                    if self.partial.is_empty() {
                        self.unit(line, true);
                    } else {
                        let mut full = std::mem::take(&mut self.partial);
                        full.extend_from_slice(line);
                        self.unit(&full, true);
                    }
                    data = rest;
                }
                None if data.len() < room => {
                    self.partial.extend_from_slice(data);
                    data = &[];
                }
                None => {
                    // `room` bytes without a newline complete a max_line piece.
                    let (piece, rest) = data.split_at(room);
                    let mut full = std::mem::take(&mut self.partial);
                    full.extend_from_slice(piece);
                    self.unit(&full, false);
                    data = rest;
                }
            }
        }
    }

    /// At the atom's end: the final partial line becomes a unit.
    pub(crate) fn finish(&mut self) {
        if !self.partial.is_empty() {
            let p = std::mem::take(&mut self.partial);
            self.unit(&p, false);
        }
        self.cut();
    }

    /// Batches to deliver; completes the current batch first.
    pub(crate) fn take(&mut self) -> Vec<Vec<u8>> {
        self.cut();
        std::mem::take(&mut self.ready)
    }
}

/// How long the pump waits before looking at its slot again while atoms come
/// and go: an atom attached without waking the pump is noticed within this
/// time (its output streams from then on; before, it waits in the pipe).
const POLL_TICK: libc::c_int = 1;
/// How long an atom's pipes are left to fill after a wake-up read `got`
/// bytes from them, by this pump and by the fork backend's session thread:
/// 1 ms after a read of less than 32 KiB. A print loop then costs one wake-up
/// of the reader (and one OUTPUT frame, one wake-up of the writer and of the
/// client) per millisecond instead of per line: in W3 those hand-offs took
/// the CPU time the client's other threads wait for (W6). A line after a
/// quiet spell is still read at once; a writer that fills 32 KiB per
/// millisecond never waits (its reads are large).
pub(crate) fn rest_after(got: usize) -> Option<std::time::Duration> {
    (got > 0 && got < 32 * 1024).then_some(std::time::Duration::from_millis(1))
}
/// After this long without an atom the pump sleeps until an attach wakes it.
const IDLE_SLEEP: std::time::Duration = std::time::Duration::from_millis(50);

/// What the executor and its pump share.
struct Slot {
    cur: Option<Attached>,
    /// The pump sleeps with no timeout: the next attach must wake it.
    sleeping: bool,
    /// Set by `expect_atom`: the pump counts its idle time from now.
    expect: bool,
    stop: bool,
}

/// Handle to one pump thread, owned by its executor.
pub(crate) struct Pump {
    slot: Arc<Mutex<Slot>>,
    wake_w: OwnedFd,
    thread: Option<JoinHandle<()>>,
    max_line: usize,
    /// `finish`'s read buffer, kept: zeroing a fresh one per atom was ~2.5 %
    /// of an executor's time in W2.
    scratch: RefCell<Vec<u8>>,
}

fn lock(m: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pump {
    pub(crate) fn start(name: String, max_line: usize) -> std::io::Result<Pump> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two fds on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh fds, ours.
        let (wake_r, wake_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let slot = Arc::new(Mutex::new(Slot {
            cur: None,
            sleeping: false,
            expect: false,
            stop: false,
        }));
        let theirs = slot.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || pump_loop(theirs, wake_r))?;
        Ok(Pump {
            slot,
            wake_w,
            thread: Some(thread),
            max_line,
            scratch: RefCell::new(vec![0u8; 16 * 1024]),
        })
    }

    fn wake(&self) {
        // SAFETY: a one-byte write to our pipe; EAGAIN (full) means already woken.
        unsafe { libc::write(self.wake_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    /// Makes the pipes `fds` (stdout, stderr) `atom`'s output. Wakes the pump
    /// only if it sleeps without a timeout (no atom for a while).
    pub(crate) fn attach(&self, atom: u64, sink: Sink, fds: [RawFd; 2]) {
        let mut slot = lock(&self.slot);
        slot.cur = Some(Attached {
            atom,
            sink,
            fds,
            split: [Splitter::new(self.max_line), Splitter::new(self.max_line)],
        });
        let wake = std::mem::take(&mut slot.sleeping);
        drop(slot);
        if wake {
            self.wake();
        }
    }

    /// Wakes a sleeping pump to tick as it does between atoms, because an
    /// atom is on its way (a session opened): the wake-up then happens off
    /// that atom's path, and its `attach` finds the pump awake.
    pub(crate) fn expect_atom(&self) {
        let mut slot = lock(&self.slot);
        slot.expect = true;
        let wake = std::mem::take(&mut slot.sleeping);
        drop(slot);
        if wake {
            self.wake();
        }
    }

    /// On the executor, after the atom returned: reads both pipes until they
    /// are empty and delivers everything, including a final partial line. The
    /// pump, if it is delivering a batch of this atom, finishes that first.
    pub(crate) fn finish(&self) {
        let Some(mut a) = lock(&self.slot).cur.take() else {
            return;
        };
        let mut buf = self.scratch.borrow_mut();
        for i in 0..2 {
            a.read(i, &mut buf, true);
            a.split[i].finish();
            a.deliver(i);
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        lock(&self.slot).stop = true;
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Attached {
    atom: u64,
    sink: Sink,
    fds: [RawFd; 2],
    split: [Splitter; 2],
}

impl Attached {
    /// Reads what `fd_index`'s pipe holds (up to about a batch, or everything if
    /// `all`); returns how many bytes it read.
    fn read(&mut self, i: usize, buf: &mut [u8], all: bool) -> usize {
        let mut got = 0;
        loop {
            // SAFETY: reading into our buffer from a non-blocking fd.
            let n = unsafe { libc::read(self.fds[i], buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                self.split[i].feed(&buf[..n as usize]);
                got += n as usize;
                if !all && got >= BATCH {
                    return got;
                }
                continue;
            }
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return got;
        }
    }

    fn deliver(&mut self, i: usize) {
        for batch in self.split[i].take() {
            self.sink.output(self.atom, (i + 1) as u8, batch);
        }
    }
}

fn pump_loop(slot: Arc<Mutex<Slot>>, wake_r: OwnedFd) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_atom = Instant::now();
    loop {
        let (fds, sink) = {
            let mut s = lock(&slot);
            if s.stop {
                return;
            }
            if std::mem::take(&mut s.expect) {
                last_atom = Instant::now();
            }
            match &s.cur {
                Some(a) => {
                    last_atom = Instant::now();
                    (Some(a.fds), Some(a.sink.clone()))
                }
                None => {
                    s.sleeping = last_atom.elapsed() >= IDLE_SLEEP;
                    (None, None)
                }
            }
        };
        let mut pfds = [
            libc::pollfd {
                fd: wake_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fds.map_or(-1, |f| f[0]),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fds.map_or(-1, |f| f[1]),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = if fds.is_none() && last_atom.elapsed() >= IDLE_SLEEP {
            -1
        } else {
            POLL_TICK
        };
        // SAFETY: polling our array of three pollfds (fd -1 entries are ignored).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 3, timeout) };
        // Awake while an atom runs (a tick, or its output): the results its
        // session's earlier atoms left held (`SessionSink::finish_with_more`)
        // wait no longer.
        if let Some(sink) = sink {
            sink.flush();
        }
        if n <= 0 {
            continue; // the tick, or EINTR
        }
        if pfds[0].revents != 0 {
            let mut sink = [0u8; 64];
            // SAFETY: draining our wake pipe.
            while unsafe { libc::read(wake_r.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) }
                > 0
            {}
        }
        if pfds[1].revents == 0 && pfds[2].revents == 0 {
            continue;
        }
        // The executor may have finished that atom and attached another since
        // the poll: read only if these are still the attached atom's pipes, so
        // its `finish` (which takes the slot first) sees every byte in order.
        let mut got = 0;
        let mut s = lock(&slot);
        if let Some(a) = s.cur.as_mut().filter(|a| Some(a.fds) == fds) {
            for i in 0..2 {
                if pfds[i + 1].revents != 0 {
                    got += a.read(i, &mut buf, false);
                    a.deliver(i);
                }
            }
        }
        drop(s);
        if let Some(rest) = rest_after(got) {
            std::thread::sleep(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max_line: usize, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = Splitter::new(max_line);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c);
            out.extend(s.take());
        }
        s.finish();
        out.extend(s.take());
        out
    }

    #[test]
    fn lines_across_chunks_are_joined() {
        let out = run(100, &[b"ab", b"c\nde", b"f\n"]);
        assert_eq!(out.concat(), b"abc\ndef\n");
        assert!(out.iter().all(|b| b.ends_with(b"\n")));
    }

    #[test]
    fn final_partial_line_is_flushed_without_newline() {
        let out = run(100, &[b"one\ntwo"]);
        assert_eq!(out, vec![b"one\n".to_vec(), b"two".to_vec()]);
    }

    #[test]
    fn long_lines_are_split_into_max_line_pieces() {
        let line: Vec<u8> = (0..25)
            .map(|i| b'a' + (i % 26) as u8)
            .chain([b'\n'])
            .collect();
        let out = run(10, &[&line[..7], &line[7..]]);
        assert_eq!(out.concat(), line);
        for batch in &out {
            for seg in batch.split_inclusive(|&b| b == b'\n') {
                assert!(seg.len() <= 10, "segment {seg:?}");
            }
        }
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn a_newline_exactly_at_max_line_is_one_line() {
        let out = run(4, &[b"abc\nabcd"]);
        assert_eq!(out, vec![b"abc\nabcd".to_vec()]);
    }

    #[test]
    fn batches_are_bounded() {
        let data: Vec<u8> = std::iter::repeat_n(b"0123456789\n".as_slice(), 100_000)
            .flatten()
            .copied()
            .collect();
        let out = run(1000, &[&data]);
        assert_eq!(out.concat(), data);
        assert!(out.iter().all(|b| b.len() <= BATCH));
        assert!(out.len() > 1);
    }

    /// Records what the pump delivers.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<u8>>);

    impl crate::engine::SessionSink for Recorder {
        fn output(&self, _atom: u64, _fd: u8, lines: Vec<u8>) {
            self.0.lock().unwrap().extend(lines);
        }
        fn finish(&self, _atom: u64, _result: crate::protocol::AtomResult) {}
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two fds on success; they are ours.
        unsafe {
            assert_eq!(
                libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK),
                0
            );
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        }
    }

    fn write(fd: &OwnedFd, data: &[u8]) {
        // SAFETY: a write from our buffer to our pipe.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(n, data.len() as isize);
    }

    /// Waits up to 5 s for the recorder to hold `want`.
    fn delivered(rec: &Recorder, want: &[u8]) -> bool {
        let until = Instant::now() + std::time::Duration::from_secs(5);
        while Instant::now() < until {
            if rec.0.lock().unwrap().as_slice() == want {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        false
    }

    /// An idle pump (asleep without a timeout), told an atom is coming or not,
    /// streams that atom's lines while it runs — the first at once, and the
    /// one after a burst once the pipe has had its millisecond to fill.
    #[test]
    fn a_pump_asleep_streams_the_next_atoms_lines_while_it_runs() {
        for expect in [true, false] {
            let pump = Pump::start("test-pump".into(), 1 << 20).unwrap();
            std::thread::sleep(IDLE_SLEEP + std::time::Duration::from_millis(20));
            assert!(
                lock(&pump.slot).sleeping,
                "the pump sleeps after 50 ms idle"
            );
            if expect {
                pump.expect_atom();
                std::thread::sleep(std::time::Duration::from_millis(10));
                // Awake and ticking, so the attach below need not wake it.
                assert!(!lock(&pump.slot).sleeping);
            }
            let rec = Arc::new(Recorder::default());
            let (out_r, out_w) = pipe();
            let (err_r, _err_w) = pipe();
            pump.attach(1, rec.clone(), [out_r.as_raw_fd(), err_r.as_raw_fd()]);
            write(&out_w, b"first\n");
            assert!(delivered(&rec, b"first\n"), "expect_atom: {expect}");
            let burst: Vec<u8> = (0..500)
                .flat_map(|i| format!("{i}\n").into_bytes())
                .collect();
            write(&out_w, &burst);
            write(&out_w, b"last\n");
            let want = [b"first\n".as_slice(), &burst, b"last\n"].concat();
            assert!(delivered(&rec, &want), "expect_atom: {expect}");
            pump.finish();
        }
    }
}
