//! Reader of `multipart/byteranges` bodies (RFC 9110 §14.6), the answer to a range request that
//! names several ranges. Sans-IO: body pieces go in as they arrive and each part's payload comes
//! out with its blob offset; nothing is buffered but one line of a part's head.
//!
//! The body comes from the registry and may be hostile: every line, every part's head and the
//! text between parts are bounded, and each part must say where it lies in the blob
//! (`Content-Range`, within the blob's size) before any of its bytes are passed on.

use super::body::parse_content_range;
use super::RemoteError;

/// Longest line read in a part's head (RFC 2046 caps a boundary at 70 characters).
const MAX_LINE: usize = 1024;
/// Most bytes of one part's head, and of whatever comes between two parts.
const MAX_HEAD: usize = 4096;

/// The boundary of a `multipart/byteranges` Content-Type, or `None` for any other type.
pub(crate) fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        (1..=70).contains(&v.len()).then(|| v.to_owned())
    })
}

/// A `multipart/byteranges` body being read.
pub(crate) struct Parts {
    /// `--` and the boundary: the line that opens each part.
    delimiter: Vec<u8>,
    blob_size: u64,
    state: State,
    line: Vec<u8>,
    /// Bytes of the current part's head (or of the text before it) so far.
    head: usize,
    range: Option<(u64, u64)>,
}

enum State {
    /// Looking for the next delimiter line.
    Between,
    /// Reading a part's header lines.
    Head,
    /// Passing a part's payload on: blob offset of the next byte, end of the part.
    Payload { pos: u64, end: u64 },
    /// The closing delimiter was read; anything after it is not looked at.
    Closed,
}

impl Parts {
    pub(crate) fn new(boundary: &str, blob_size: u64) -> Self {
        Parts {
            delimiter: [b"--", boundary.as_bytes()].concat(),
            blob_size,
            state: State::Between,
            line: Vec::new(),
            head: 0,
            range: None,
        }
    }

    /// True once the closing delimiter was read.
    pub(crate) fn closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Reads the next piece of the body, handing each run of payload bytes to
    /// `payload(blob_offset, bytes)` in body order.
    pub(crate) fn feed(
        &mut self,
        mut buf: &[u8],
        mut payload: impl FnMut(u64, &[u8]) -> Result<(), RemoteError>,
    ) -> Result<(), RemoteError> {
        while !buf.is_empty() {
            match &mut self.state {
                State::Closed => return Ok(()),
                State::Payload { pos, end } => {
                    let n = usize::try_from(*end - *pos)
                        .unwrap_or(usize::MAX)
                        .min(buf.len());
                    let at = *pos;
                    *pos += n as u64;
                    if *pos == *end {
                        self.state = State::Between;
                        self.head = 0;
                    }
                    payload(at, &buf[..n])?;
                    buf = &buf[n..];
                }
                State::Between | State::Head => {
                    let newline = buf.iter().position(|&b| b == b'\n');
                    let take = newline.map_or(buf.len(), |i| i + 1);
                    self.head += take;
                    if self.line.len() + take > MAX_LINE || self.head > MAX_HEAD {
                        return Err(protocol(
                            "a multipart range response's part head is too long",
                        ));
                    }
                    self.line.extend_from_slice(&buf[..take]);
                    buf = &buf[take..];
                    if newline.is_some() {
                        let line = std::mem::take(&mut self.line);
                        self.end_line(trim_line_end(&line))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, line: &[u8]) -> Result<(), RemoteError> {
        match self.state {
            State::Between => {
                if let Some(rest) = line.strip_prefix(self.delimiter.as_slice()) {
                    if rest.starts_with(b"--") {
                        self.state = State::Closed;
                    } else if rest.iter().all(|b| matches!(b, b' ' | b'\t')) {
                        self.state = State::Head;
                        self.head = 0;
                        self.range = None;
                    }
                }
                // Anything else is the preamble or the blank line ending a payload.
                Ok(())
            }
            State::Head if line.is_empty() => {
                let (start, end) = self.range.take().ok_or_else(|| {
                    protocol("a multipart range response has a part without Content-Range")
                })?;
                self.state = State::Payload { pos: start, end };
                Ok(())
            }
            State::Head => {
                let Some((name, value)) = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.split_once(':'))
                else {
                    return Err(protocol(
                        "a multipart range response has a malformed part header",
                    ));
                };
                if name.trim().eq_ignore_ascii_case("content-range") {
                    let (start, end, total) = parse_content_range(value).ok_or_else(|| {
                        protocol("a multipart range response has an invalid Content-Range")
                    })?;
                    if total.is_some_and(|t| t != self.blob_size) || end > self.blob_size {
                        return Err(protocol(
                            "a multipart range response has a part outside the blob",
                        ));
                    }
                    self.range = Some((start, end));
                }
                Ok(())
            }
            State::Payload { .. } | State::Closed => Ok(()),
        }
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn protocol(what: &str) -> RemoteError {
    RemoteError::Protocol(what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(u64, &[u8])], size: u64) -> Vec<u8> {
        let mut b = b"preamble\r\n".to_vec();
        for (start, data) in parts {
            b.extend_from_slice(b"\r\n--XyZ\r\nContent-Type: application/octet-stream\r\n");
            let end = start + data.len() as u64 - 1;
            b.extend_from_slice(
                format!("Content-Range: bytes {start}-{end}/{size}\r\n\r\n").as_bytes(),
            );
            b.extend_from_slice(data);
        }
        b.extend_from_slice(b"\r\n--XyZ--\r\nepilogue");
        b
    }

    /// Runs of payload bytes read, with their offsets.
    type Read = Vec<(u64, Vec<u8>)>;

    fn read(body: &[u8], piece: usize, size: u64) -> Result<(Read, bool), RemoteError> {
        let mut p = Parts::new("XyZ", size);
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        for c in body.chunks(piece) {
            p.feed(c, |at, bytes| {
                match out.last_mut() {
                    Some((s, v)) if *s + v.len() as u64 == at => v.extend_from_slice(bytes),
                    _ => out.push((at, bytes.to_vec())),
                }
                Ok(())
            })?;
        }
        Ok((out, p.closed()))
    }

    #[test]
    fn finds_the_boundary_of_byteranges_only() {
        assert_eq!(
            boundary("multipart/byteranges; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary("Multipart/ByteRanges;charset=x; BOUNDARY=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(boundary("multipart/mixed; boundary=abc"), None);
        assert_eq!(boundary("application/octet-stream"), None);
        assert_eq!(boundary("multipart/byteranges"), None);
        assert_eq!(
            boundary(&format!(
                "multipart/byteranges; boundary={}",
                "b".repeat(71)
            )),
            None
        );
    }

    #[test]
    fn parts_come_out_with_their_offsets_whatever_the_piece_size() {
        let b = body(&[(3, b"hello\r\n--XyZ"), (100, b"world")], 200);
        for piece in [1, 2, 7, 64, b.len()] {
            let (out, closed) = read(&b, piece, 200).unwrap();
            assert_eq!(
                out,
                vec![(3, b"hello\r\n--XyZ".to_vec()), (100, b"world".to_vec())],
                "piece {piece}"
            );
            assert!(closed);
        }
    }

    #[test]
    fn hostile_bodies_are_clear_errors() {
        // A part outside the blob, or of another blob.
        assert!(read(&body(&[(190, &[0; 20])], 200), 8, 200).is_err());
        assert!(read(&body(&[(0, &[0; 20])], 300), 8, 200).is_err());
        // A part that does not say where it lies.
        let no_range = b"--XyZ\r\nContent-Type: x\r\n\r\ndata\r\n--XyZ--\r\n";
        assert!(read(no_range, 4, 200).is_err());
        // Endless heads and endless text between parts.
        let mut long = b"--XyZ\r\n".to_vec();
        long.extend(std::iter::repeat_n(b"X-A: b\r\n", 1000).flatten());
        assert!(read(&long, 100, 200).is_err());
        assert!(read(&vec![b'a'; 5000], 100, 200).is_err());
        assert!(read(
            &std::iter::repeat_n(b"\r\n", 3000)
                .flatten()
                .copied()
                .collect::<Vec<_>>(),
            100,
            200
        )
        .is_err());
        // A truncated body is not closed.
        let b = body(&[(0, b"abc")], 200);
        let (_, closed) = read(&b[..b.len() - 14], 5, 200).unwrap();
        assert!(!closed);
    }
}
