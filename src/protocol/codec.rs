//! Payload fields: the primitive encodings every message is built from.
//!
//! Integers are big endian; `bytes` and `str` are a u32 length then the bytes;
//! `opt<T>` is a u8 (0 absent, 1 present) then `T`; `bool` is a u8 0 or 1;
//! `nonce` is exactly 32 bytes. Every read is bounds-checked against what is
//! left of the payload before anything is allocated.

use byteorder::{BigEndian, ByteOrder};

use super::error::{Error, Result};

/// Appends fields to a payload.
#[derive(Default)]
pub struct PayloadWriter {
    buf: Vec<u8>,
}

impl PayloadWriter {
    pub fn new() -> Self {
        PayloadWriter { buf: Vec::new() }
    }

    pub fn with_capacity(n: usize) -> Self {
        PayloadWriter {
            buf: Vec::with_capacity(n),
        }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }

    /// The head of a `buffers` field (count and lengths); the buffers' bytes
    /// follow it, written by the caller (see [`PayloadWriter::buffers`]).
    pub fn buffers_head<B: AsRef<[u8]>>(&mut self, buffers: &[B]) -> &mut Self {
        self.u32(buffers.len() as u32);
        for b in buffers {
            self.u32(b.as_ref().len() as u32);
        }
        self
    }

    /// A whole `buffers` field: head, then the buffers back to back.
    pub fn buffers<B: AsRef<[u8]>>(&mut self, buffers: &[B]) -> &mut Self {
        self.buffers_head(buffers);
        for b in buffers {
            self.rest(b.as_ref());
        }
        self
    }

    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    pub fn nonce(&mut self, v: &[u8; 32]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    pub fn opt_bytes(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(b) => self.u8(1).bytes(b),
        }
    }

    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(x) => self.u8(1).u64(x),
        }
    }

    /// Appends raw bytes that run to the end of the payload (no length prefix).
    pub fn rest(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads fields from a payload, failing with the name of the field that did not fit.
pub struct PayloadReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> PayloadReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        PayloadReader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8]> {
        let remaining = self.buf.len() - self.pos;
        if n > remaining {
            return Err(Error::PayloadTruncated {
                field,
                needed: n,
                remaining,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8> {
        Ok(self.take(1, field)?[0])
    }

    pub fn bool(&mut self, field: &'static str) -> Result<bool> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::InvalidValue {
                field,
                value: u64::from(v),
            }),
        }
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16> {
        Ok(BigEndian::read_u16(self.take(2, field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32> {
        Ok(BigEndian::read_u32(self.take(4, field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64> {
        Ok(BigEndian::read_u64(self.take(8, field)?))
    }

    pub fn bytes(&mut self, field: &'static str) -> Result<&'a [u8]> {
        let n = self.u32(field)? as usize;
        self.take(n, field)
    }

    /// Where a `bytes` field lies in the payload, for callers that take it
    /// out of an owned payload instead of copying it.
    pub fn bytes_range(&mut self, field: &'static str) -> Result<std::ops::Range<usize>> {
        let n = self.u32(field)? as usize;
        let start = self.pos;
        self.take(n, field)?;
        Ok(start..self.pos)
    }

    pub fn opt_bytes_range(
        &mut self,
        field: &'static str,
    ) -> Result<Option<std::ops::Range<usize>>> {
        if self.presence(field)? {
            self.bytes_range(field).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Where each buffer of a `buffers` field lies in the payload: a `u32`
    /// count, that many `u32` lengths, then the buffers back to back. The
    /// count is checked against the bytes left before anything is allocated,
    /// and each length against what is left after the ones before it, so the
    /// buffers together can never claim more than the payload holds.
    pub fn buffer_ranges(&mut self) -> Result<Vec<std::ops::Range<usize>>> {
        let count = self.u32("buffer_count")? as usize;
        let remaining = self.buf.len() - self.pos;
        if count > remaining / 4 {
            return Err(Error::PayloadTruncated {
                field: "buffer_lengths",
                needed: count.saturating_mul(4),
                remaining,
            });
        }
        let mut lengths = Vec::with_capacity(count);
        for _ in 0..count {
            lengths.push(self.u32("buffer_lengths")? as usize);
        }
        let mut ranges = Vec::with_capacity(count);
        for n in lengths {
            let start = self.pos;
            self.take(n, "buffers")?;
            ranges.push(start..self.pos);
        }
        Ok(ranges)
    }

    pub fn str(&mut self, field: &'static str) -> Result<&'a str> {
        std::str::from_utf8(self.bytes(field)?).map_err(|_| Error::InvalidUtf8 { field })
    }

    pub fn string(&mut self, field: &'static str) -> Result<String> {
        self.str(field).map(str::to_owned)
    }

    pub fn nonce(&mut self, field: &'static str) -> Result<[u8; 32]> {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.take(32, field)?);
        Ok(out)
    }

    fn presence(&mut self, field: &'static str) -> Result<bool> {
        self.bool(field)
    }

    pub fn opt_bytes(&mut self, field: &'static str) -> Result<Option<&'a [u8]>> {
        if self.presence(field)? {
            self.bytes(field).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn opt_u64(&mut self, field: &'static str) -> Result<Option<u64>> {
        if self.presence(field)? {
            self.u64(field).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The bytes from here to the end of the payload.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    /// Fails unless every byte was consumed.
    pub fn finish(self, kind: &'static str) -> Result<()> {
        let extra = self.buf.len() - self.pos;
        if extra == 0 {
            Ok(())
        } else {
            Err(Error::TrailingBytes { kind, extra })
        }
    }
}
