//! Helpers for strings that come from a registry or an image: whoever publishes an image
//! writes them, so they are bounded before they reach an error message or a log line.

/// Longest piece of an untrusted string kept in an error or log line.
pub const MAX_SHOWN: usize = 256;

/// `s` cut to at most [`MAX_SHOWN`] bytes (on a char boundary), with how much was dropped.
pub fn clip(s: &str) -> String {
    clip_to(s, MAX_SHOWN)
}

fn clip_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &s[..end], s.len() - end)
}

/// Lossy UTF-8 of untrusted bytes, clipped like [`clip`].
pub fn clip_bytes(b: &[u8]) -> String {
    clip(&String::from_utf8_lossy(&b[..b.len().min(MAX_SHOWN * 4)]))
}

/// Longest text kept of one error in a [`chain`]: our own messages hold a few clipped pieces
/// plus context, so they fit; a foreign error that quotes its input (serde, reqwest) is cut.
const MAX_LEVEL_SHOWN: usize = 4 * MAX_SHOWN;

/// Deepest cause [`chain`] prints; ours nest a handful of levels, so this only stops a
/// foreign `source()` that never ends.
const MAX_DEPTH: usize = 16;

/// `e` and each of its causes, joined with ": ", for a log line, a gRPC message or a state
/// file. Each error prints only its own layer (its cause is a `#[source]`), so this is the one
/// place a chain becomes text. It lives here because every level is clipped like [`clip`]
/// (to [`MAX_LEVEL_SHOWN`]): third-party errors quote what they failed to parse, and that
/// text comes from a registry or an image. A cause whose text its parent already ends with
/// (a foreign type that prints its source too) is skipped, so nothing is said twice.
pub fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain(e)
}

/// What [`chain`] returns: formats lazily, so `tracing` fields cost nothing when filtered out.
#[derive(Clone, Copy)]
pub struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut prev = String::new();
        let mut next = Some(self.0);
        for _ in 0..MAX_DEPTH {
            let Some(e) = next else { break };
            let text = clip_to(&e.to_string(), MAX_LEVEL_SHOWN);
            if !text.is_empty() && !prev.ends_with(&text) {
                if !prev.is_empty() {
                    f.write_str(": ")?;
                }
                f.write_str(&text)?;
            }
            if !text.is_empty() {
                prev = text;
            }
            next = e.source();
        }
        Ok(())
    }
}

impl std::fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Layer {
        #[error("fetching from the blob")]
        Own(#[source] std::io::Error),
        /// The old style: the cause both in the message and as the source.
        #[error("opening: {0}")]
        Both(#[source] Box<Layer>),
        #[error("{0}")]
        Text(String),
    }

    /// A foreign error whose `source()` is itself.
    #[derive(Debug)]
    struct Looping;

    impl std::fmt::Display for Looping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("again")
        }
    }

    impl std::error::Error for Looping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(self)
        }
    }

    #[test]
    fn chain_prints_each_cause_once() {
        let io = std::io::Error::other(Layer::Text("HTTP 500".into()));
        let e = Layer::Own(io);
        assert_eq!(e.to_string(), "fetching from the blob");
        assert_eq!(chain(&e).to_string(), "fetching from the blob: HTTP 500");
        let both = Layer::Both(Box::new(Layer::Text("short read".into())));
        assert_eq!(chain(&both).to_string(), "opening: short read");
        assert_eq!(chain(&Layer::Text("alone".into())).to_string(), "alone");
    }

    #[test]
    fn chain_clips_each_level() {
        let long = Layer::Own(std::io::Error::other(Layer::Text("A".repeat(100_000))));
        let s = chain(&long).to_string();
        assert!(s.starts_with("fetching from the blob: AAAA"), "{s}");
        assert!(s.len() < MAX_LEVEL_SHOWN + 100, "{} bytes", s.len());
        assert!(s.ends_with("more bytes)"), "{s}");
    }

    /// Every variant of ours that wraps a cause leaves it to the chain: it shows up once.
    #[test]
    fn each_wrapping_error_of_the_crate_prints_its_cause_once() {
        use crate::{ctr, estargz, fs, remote, service, snapshot};
        let io = || std::io::Error::other("CAUSE");
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(fs::FsError::Source(io())),
            Box::new(fs::FsError::Cache(io())),
            Box::new(fs::FsError::Toc(estargz::EstargzError::Io(io()))),
            Box::new(fs::FsError::Mount {
                path: "/mnt".into(),
                source: io(),
            }),
            Box::new(remote::RemoteError::Sink(io())),
            Box::new(service::ServiceError::Layers(fs::FsError::Source(
                remote::RemoteError::Sink(io()).into(),
            ))),
            Box::new(ctr::Error::Estargz(estargz::EstargzError::InputIo {
                what: "entry".into(),
                source: io(),
            })),
            Box::new(ctr::Error::Io(io())),
            Box::new(snapshot::SnapshotError::from(
                snapshot::store::StoreError::File {
                    path: "/db".into(),
                    source: io(),
                },
            )),
        ];
        for e in errors {
            let text = chain(&*e).to_string();
            assert_eq!(text.matches("CAUSE").count(), 1, "{text}");
            assert!(!e.to_string().contains("CAUSE"), "{e} prints its source");
        }
    }

    #[test]
    fn chain_ends_on_a_cause_that_never_ends() {
        assert_eq!(chain(&Looping).to_string(), "again");
    }
}
