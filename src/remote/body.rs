//! Bounded reads of response bodies. Whoever runs a registry (or the token endpoint it names)
//! chooses what we receive, so every body is streamed against a byte limit and a stall timeout
//! and its Content-Length is never trusted: an endless or trickling body ends in an error, not
//! in an out-of-memory kill or a frozen caller.

use std::time::Duration;

use reqwest::Response;
use serde::Deserialize;

use super::auth::redact_url;
use super::RemoteError;
use crate::untrusted;

/// Image manifests and indexes: the limit registries and containerd commonly apply.
pub(crate) const MAX_MANIFEST: u64 = 4 << 20;
/// Image configs: registries set no limit and long histories make them larger than manifests.
pub(crate) const MAX_CONFIG: u64 = 16 << 20;
/// Token responses: a JWT and a few fields, a few KiB in practice.
pub(crate) const MAX_TOKEN: u64 = 1 << 20;
/// How much of an error body is read for its message.
pub(crate) const MAX_ERROR_BODY: usize = 4 << 10;

/// Counts the bytes of a streamed body against a limit.
pub(crate) struct ByteBudget {
    limit: u64,
    seen: u64,
}

impl ByteBudget {
    pub(crate) fn new(limit: u64) -> Self {
        ByteBudget { limit, seen: 0 }
    }

    /// Accounts `n` more bytes; [`RemoteError::BodyTooLarge`] (naming `what()`) once past the limit.
    pub(crate) fn spend(
        &mut self,
        n: usize,
        what: impl FnOnce() -> String,
    ) -> Result<(), RemoteError> {
        self.seen = self.seen.saturating_add(n as u64);
        if self.seen > self.limit {
            return Err(RemoteError::BodyTooLarge {
                what: what(),
                limit: self.limit,
            });
        }
        Ok(())
    }
}

/// Parses a `Content-Range` value, `bytes a-b/total` (`total` may be `*`), into
/// `(a, b + 1, total)`; `None` for anything else, including `b < a`.
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
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

/// Reads the whole body of `resp` into memory: [`RemoteError::BodyTooLarge`] as soon as it
/// passes `limit` bytes (or declares more), [`RemoteError::Stalled`] when no piece arrives
/// within `stall`. `what` names the object in the error ("manifest", "token response").
pub(crate) async fn read_limited(
    mut resp: Response,
    limit: u64,
    what: &str,
    stall: Duration,
) -> Result<Vec<u8>, RemoteError> {
    let url = resp.url().to_string();
    let name = || format!("{what} from {}", redact_url(&url));
    if resp.content_length().is_some_and(|l| l > limit) {
        return Err(RemoteError::BodyTooLarge {
            what: name(),
            limit,
        });
    }
    let mut budget = ByteBudget::new(limit);
    let mut out = Vec::new();
    loop {
        let piece = match tokio::time::timeout(stall, resp.chunk()).await {
            Err(_) => return Err(RemoteError::Stalled(stall)),
            Ok(Err(e)) => return Err(RemoteError::body(&url, e)),
            Ok(Ok(None)) => return Ok(out),
            Ok(Ok(Some(p))) => p,
        };
        budget.spend(piece.len(), name)?;
        out.extend_from_slice(&piece);
    }
}

/// [`RemoteError::Status`] for a failed response, with what its body says. Reads at most
/// [`MAX_ERROR_BODY`] bytes, all within one `stall` period; the rest is never read (dropping
/// the response closes the connection).
pub(crate) async fn status_error(resp: Response, url: &str, stall: Duration) -> RemoteError {
    let status = resp.status().as_u16();
    RemoteError::Status {
        url: redact_url(url),
        status,
        detail: error_detail(resp, stall).await,
    }
}

/// A one-line, clipped message from the start of an error body; empty when there is none.
pub(crate) async fn error_detail(mut resp: Response, stall: Duration) -> String {
    let deadline = tokio::time::Instant::now() + stall;
    let mut buf = Vec::new();
    while buf.len() < MAX_ERROR_BODY {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(p))) => {
                let take = p.len().min(MAX_ERROR_BODY - buf.len());
                buf.extend_from_slice(&p[..take]);
            }
            // End, broken body or deadline: say what arrived.
            _ => break,
        }
    }
    describe(&buf)
}

/// The `code: message` pairs of an OCI error document, else the text itself; control
/// characters become spaces so a body can not forge log lines.
fn describe(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Doc {
        errors: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let text = match serde_json::from_slice::<Doc>(body) {
        Ok(doc) if !doc.errors.is_empty() => doc
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    untrusted::clip(one_line.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tonic::codegen::http;

    #[test]
    fn parses_content_range() {
        assert_eq!(parse_content_range("bytes 0-1/2"), Some((0, 2, Some(2))));
        assert_eq!(parse_content_range(" bytes 5-9/*"), Some((5, 10, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("bytes 0-18446744073709551615/1"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes 0-1"), None);
    }

    /// A response whose body is `piece` repeated forever; `sent` counts the bytes handed out.
    fn endless(piece: &'static [u8], sent: Arc<AtomicU64>, status: u16) -> Response {
        let stream = futures_util::stream::repeat_with(move || {
            sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
            Ok::<_, std::io::Error>(Bytes::from_static(piece))
        });
        let mut r = http::Response::new(reqwest::Body::wrap_stream(stream));
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        Response::from(r)
    }

    fn fixed(body: &'static [u8], status: u16) -> Response {
        let mut r = http::Response::new(reqwest::Body::from(body));
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        Response::from(r)
    }

    #[tokio::test]
    async fn endless_body_stops_at_the_limit() {
        let sent = Arc::new(AtomicU64::new(0));
        let resp = endless(&[b'{'; 1000], sent.clone(), 200);
        let err = read_limited(resp, 10_000, "token response", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RemoteError::BodyTooLarge { limit: 10_000, .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("token response from "), "{err}");
        // One piece past the limit, never more.
        assert!(sent.load(Ordering::Relaxed) <= 11_000);
    }

    #[tokio::test]
    async fn body_within_the_limit_is_read_whole() {
        let body = read_limited(
            fixed(b"0123456789", 200),
            10,
            "manifest",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(body, b"0123456789");
        let err = read_limited(
            fixed(b"0123456789x", 200),
            10,
            "manifest",
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RemoteError::BodyTooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn stalled_body_times_out() {
        let stream = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        let resp = Response::from(http::Response::new(reqwest::Body::wrap_stream(stream)));
        let t = std::time::Instant::now();
        let err = read_limited(resp, 10, "manifest", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, RemoteError::Stalled(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn error_body_is_a_clipped_prefix() {
        let sent = Arc::new(AtomicU64::new(0));
        let err = status_error(
            endless(b"AAAA\n", sent.clone(), 503),
            "http://h/v2/x?sig=s",
            Duration::from_secs(5),
        )
        .await;
        let RemoteError::Status {
            status,
            detail,
            url,
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!((*status, url.as_str()), (503, "http://h/v2/x?<redacted>"));
        assert!(detail.len() < untrusted::MAX_SHOWN + 64, "{detail}");
        assert!(
            detail.starts_with("AAAA AAAA") && !detail.contains('\n'),
            "{detail}"
        );
        assert!(sent.load(Ordering::Relaxed) <= MAX_ERROR_BODY as u64 + 5);
        assert!(err.to_string().contains("answered HTTP 503: AAAA"), "{err}");
    }

    #[tokio::test]
    async fn error_body_names_oci_errors() {
        let body = br#"{"errors":[{"code":"DENIED","message":"no\naccess","detail":{}}]}"#;
        let err = status_error(fixed(body, 403), "http://h/", Duration::from_secs(5)).await;
        assert_eq!(
            err.to_string(),
            "http://h/ answered HTTP 403: DENIED: no access"
        );
        let err = status_error(fixed(b"", 500), "http://h/", Duration::from_secs(5)).await;
        assert_eq!(err.to_string(), "http://h/ answered HTTP 500");
    }
}
