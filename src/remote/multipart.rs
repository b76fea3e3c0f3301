//! A streaming parser for `multipart/byteranges` (RFC 9110 §14.6) responses.
//!
//! Written by hand rather than with `multer`: that crate targets `multipart/form-data` (field
//! names, content-disposition, charset decoding) and delimits parts by scanning for the boundary,
//! while byte-range parts declare their exact length in `Content-Range`. Reading exactly that many
//! bytes never scans payload, never copies it (data is handed out as slices of the input), and
//! detects truncated parts. Memory is bounded by the part-header limit.

use super::RemoteError;

/// Longest part-header block accepted (and longest preamble).
pub(crate) const MAX_HEADER: usize = 16 * 1024;

/// What the parser reports while fed.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A part with `Content-Range: bytes start-end/total` starts (`end` exclusive here).
    Part {
        start: u64,
        end: u64,
        total: Option<u64>,
    },
    /// Payload bytes of the current part at absolute blob offset `offset`.
    Data { offset: u64, data: &'a [u8] },
}

enum State {
    /// Before the first delimiter (the preamble is skipped).
    Preamble,
    /// Reading a part's header block.
    Headers,
    /// Inside a part: `next` is the blob offset of the next byte, `remaining` bytes to go.
    Data {
        next: u64,
        remaining: u64,
    },
    /// After a part: expecting `\r\n--boundary` then `\r\n` (next part) or `--` (end).
    Delimiter,
    Done,
}

/// Push parser: call [`Parser::feed`] with each body piece, then [`Parser::finish`].
pub struct Parser {
    delimiter: Vec<u8>,
    state: State,
    buf: Vec<u8>,
}

/// The `boundary` parameter of a `multipart/byteranges` content type, `None` for other types.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    let mime = parts.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// Parses `bytes a-b/total` (`total` may be `*`) into `(a, b + 1, total)`.
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    if b < a {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a, b.checked_add(1)?, total))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Parser {
    pub fn new(boundary: &str) -> Self {
        Parser {
            delimiter: format!("--{boundary}").into_bytes(),
            state: State::Preamble,
            buf: Vec::new(),
        }
    }

    /// Feeds one piece of the body; `on` receives events whose data borrows from `input`.
    pub fn feed<'a>(
        &mut self,
        mut input: &'a [u8],
        on: &mut dyn FnMut(Event<'a>) -> Result<(), RemoteError>,
    ) -> Result<(), RemoteError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Data { next, remaining } => {
                    let n = (*remaining).min(input.len() as u64) as usize;
                    let offset = *next;
                    *next += n as u64;
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        self.state = State::Delimiter;
                    }
                    on(Event::Data {
                        offset,
                        data: &input[..n],
                    })?;
                    input = &input[n..];
                }
                State::Preamble | State::Delimiter => {
                    // Buffer exactly up to the two bytes after the delimiter (byte by byte in the
                    // preamble, whose length is unknown), so nothing past it is ever buffered.
                    let strict = matches!(self.state, State::Delimiter);
                    let want = 2 + self.delimiter.len() + 2;
                    let take = if strict {
                        input.len().min(want - self.buf.len())
                    } else {
                        1
                    };
                    self.buf.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if let Some(next) = self.after_delimiter(strict)? {
                        self.state = next;
                        self.buf.clear();
                    }
                }
                State::Headers => {
                    let before = self.buf.len();
                    self.buf.extend_from_slice(input);
                    let Some(end) = find(&self.buf, b"\r\n\r\n") else {
                        if self.buf.len() > MAX_HEADER {
                            return Err(RemoteError::Protocol(
                                "multipart part headers too long".into(),
                            ));
                        }
                        input = &[];
                        continue;
                    };
                    let consumed = end + 4 - before;
                    let (start, end_excl, total) = part_range(&self.buf[..end])?;
                    self.buf.clear();
                    input = &input[consumed..];
                    self.state = State::Data {
                        next: start,
                        remaining: end_excl - start,
                    };
                    on(Event::Part {
                        start,
                        end: end_excl,
                        total,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Checks the buffered delimiter; `Some(next state)` once decided, `None` to read more.
    fn after_delimiter(&self, strict: bool) -> Result<Option<State>, RemoteError> {
        let d = self.delimiter.len();
        if strict {
            if self.buf.len() < 2 + d + 2 {
                return Ok(None);
            }
            if &self.buf[..2] != b"\r\n" || self.buf[2..2 + d] != self.delimiter[..] {
                return Err(RemoteError::Protocol(
                    "multipart part longer than its Content-Range".into(),
                ));
            }
        } else {
            let n = self.buf.len();
            if n < d + 2 || self.buf[n - 2 - d..n - 2] != self.delimiter[..] {
                if n >= MAX_HEADER {
                    return Err(RemoteError::Protocol("no multipart boundary found".into()));
                }
                return Ok(None);
            }
        }
        match &self.buf[self.buf.len() - 2..] {
            b"--" => Ok(Some(State::Done)),
            b"\r\n" => Ok(Some(State::Headers)),
            _ => Err(RemoteError::Protocol(
                "malformed multipart delimiter".into(),
            )),
        }
    }

    /// Ends the body: an error if it stopped before the closing delimiter.
    pub fn finish(&self) -> Result<(), RemoteError> {
        match self.state {
            State::Done => Ok(()),
            _ => Err(RemoteError::Truncated("multipart body ended early".into())),
        }
    }
}

fn part_range(headers: &[u8]) -> Result<(u64, u64, Option<u64>), RemoteError> {
    let text = std::str::from_utf8(headers)
        .map_err(|_| RemoteError::Protocol("multipart headers are not UTF-8".into()))?;
    for line in text.split("\r\n") {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-range") {
                return parse_content_range(v).ok_or_else(|| {
                    RemoteError::Protocol(format!(
                        "bad part Content-Range {:?}",
                        crate::untrusted::clip(v.trim())
                    ))
                });
            }
        }
    }
    Err(RemoteError::Protocol(
        "multipart part without Content-Range".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body(boundary: &str, parts: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = b"preamble\r\n".to_vec();
        for (start, data) in parts {
            out.extend_from_slice(format!("--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {}-{}/1000\r\n\r\n", start, start + data.len() as u64 - 1).as_bytes());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    type Parsed = (Vec<(u64, u64)>, Vec<(u64, Vec<u8>)>);

    /// Feeds `input` in pieces of `step` bytes; returns (parts, data bytes by offset).
    fn run(input: &[u8], step: usize) -> Result<Parsed, RemoteError> {
        let mut p = Parser::new("BOUND");
        let mut parts = Vec::new();
        let mut data: Vec<(u64, Vec<u8>)> = Vec::new();
        for piece in input.chunks(step.max(1)) {
            p.feed(piece, &mut |ev| {
                match ev {
                    Event::Part { start, end, .. } => parts.push((start, end)),
                    Event::Data { offset, data: d } => match data.last_mut() {
                        Some((o, v)) if *o + v.len() as u64 == offset => v.extend_from_slice(d),
                        _ => data.push((offset, d.to_vec())),
                    },
                }
                Ok(())
            })?;
        }
        p.finish()?;
        Ok((parts, data))
    }

    #[test]
    fn parses_parts_in_any_piece_size() {
        let input = body(
            "BOUND",
            &[
                (0, b"hello"),
                (100, b"--BOUND\r\n not a delimiter"),
                (990, b"0123456789"),
            ],
        );
        for step in 1..input.len() {
            let (parts, data) = run(&input, step).unwrap();
            assert_eq!(parts, vec![(0, 5), (100, 125), (990, 1000)]);
            assert_eq!(data[0], (0, b"hello".to_vec()));
            assert_eq!(data[1], (100, b"--BOUND\r\n not a delimiter".to_vec()));
            assert_eq!(data[2], (990, b"0123456789".to_vec()));
        }
    }

    #[test]
    fn detects_truncation_and_garbage() {
        let input = body("BOUND", &[(0, b"hello"), (10, b"world")]);
        for cut in 0..input.len() - 2 {
            assert!(run(&input[..cut], 7).is_err(), "cut at {cut}");
        }
        let mut long = body("BOUND", &[(0, b"hello")]);
        long.insert(long.len() - 12, b'x');
        assert!(run(&long, 3).is_err());
        let no_range = b"--BOUND\r\nContent-Type: x\r\n\r\nabc\r\n--BOUND--".to_vec();
        assert!(run(&no_range, 4).is_err());
    }

    #[test]
    fn parses_content_type_and_range() {
        assert_eq!(
            boundary("multipart/byteranges; boundary=abc"),
            Some("abc".into())
        );
        assert_eq!(
            boundary("Multipart/Byteranges;boundary=\"a b\""),
            Some("a b".into())
        );
        assert_eq!(boundary("application/octet-stream"), None);
        assert_eq!(parse_content_range("bytes 0-1/2"), Some((0, 2, Some(2))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 10, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
    }

    proptest! {
        #[test]
        fn random_parts_roundtrip(lens in proptest::collection::vec(1usize..300, 1..6), step in 1usize..64) {
            let mut parts = Vec::new();
            let mut off = 0u64;
            let blobs: Vec<Vec<u8>> = lens.iter().map(|l| (0..*l).map(|i| (i * 7 % 251) as u8).collect()).collect();
            for b in &blobs { parts.push((off, b.as_slice())); off += b.len() as u64 + 3; }
            let input = body("BOUND", &parts);
            let (got, data) = run(&input, step).unwrap();
            prop_assert_eq!(got.len(), parts.len());
            for ((o, b), (go, gd)) in parts.iter().zip(data.iter()) {
                prop_assert_eq!(o, go);
                prop_assert_eq!(&b.to_vec(), gd);
            }
        }
    }
}
