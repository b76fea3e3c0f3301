//! Helpers for strings that come from a registry or an image: whoever publishes an image
//! writes them, so they are bounded before they reach an error message or a log line.

/// Longest piece of an untrusted string kept in an error or log line.
pub const MAX_SHOWN: usize = 256;

/// `s` cut to at most [`MAX_SHOWN`] bytes (on a char boundary), with how much was dropped.
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_SHOWN {
        return s.to_owned();
    }
    let mut end = MAX_SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &s[..end], s.len() - end)
}

/// Lossy UTF-8 of untrusted bytes, clipped like [`clip`].
pub fn clip_bytes(b: &[u8]) -> String {
    clip(&String::from_utf8_lossy(&b[..b.len().min(MAX_SHOWN * 4)]))
}
