//! Image references: `[host[:port]/]repository[:tag][@digest]`, with Docker Hub defaults.

use std::fmt;
use std::str::FromStr;

use super::RemoteError;

/// The registry name Docker Hub references use, and the host its API is served from.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host as written (with port), `docker.io` when omitted.
    pub host: String,
    /// Repository path, `library/` prefixed for single-name Docker Hub images.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    /// The host the distribution API is served from (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.host == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.host
        }
    }

    /// What to ask the manifests endpoint for: the digest when pinned, else the tag.
    pub fn object(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

fn looks_like_host(s: &str) -> bool {
    s.contains('.')
        || s.contains(':')
        || s == "localhost"
        || s.chars().any(|c| c.is_ascii_uppercase())
}

/// `algorithm:hex`, as the OCI spec spells a digest (a URL path segment, so nothing else).
pub(crate) fn valid_digest(d: &str) -> bool {
    match d.split_once(':') {
        Some((alg, hex)) => {
            !alg.is_empty()
                && !hex.is_empty()
                && alg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        }
        None => false,
    }
}

impl FromStr for Reference {
    type Err = RemoteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RemoteError::InvalidReference(s.to_owned());
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !valid_digest(d) {
                    return Err(bad());
                }
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_owned()),
            ),
            None => (rest, None),
        };
        let (host, repository) = match name.split_once('/') {
            Some((h, r)) if looks_like_host(h) => (h.to_owned(), r.to_owned()),
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let repository = if host == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| {
                        ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch)
                    })
            });
        let tag_ok = tag.as_deref().is_none_or(|t| {
            !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        });
        if host.is_empty() || !repo_ok || !tag_ok {
            return Err(bad());
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Reference {
            host,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        s.parse().unwrap()
    }

    #[test]
    fn parses_references() {
        let r = p("ubuntu");
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/ubuntu", Some("latest"))
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = p("127.0.0.1:5000/foo/bar:v1");
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "foo/bar", Some("v1"))
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = p(&format!("localhost:5000/x@{d}"));
        assert_eq!(
            (r.tag.as_deref(), r.digest.as_deref()),
            (None, Some(d.as_str()))
        );
        assert_eq!(r.object(), d);
        let r = p(&format!("ghcr.io/o/x:t@{d}"));
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.to_string(), format!("ghcr.io/o/x:t@{d}"));
        let r = p("user/img:1.0");
        assert_eq!(
            (r.host.as_str(), r.repository.as_str()),
            ("docker.io", "user/img")
        );
        let r = p("localhost/img");
        assert_eq!(
            (r.host.as_str(), r.repository.as_str()),
            ("localhost", "img")
        );
    }

    #[test]
    fn rejects_bad_references() {
        for s in [
            "",
            "UPPER/x:y/",
            "x@sha256:zz",
            "x@nope",
            "a//b",
            "x:",
            "host:5000/",
        ] {
            assert!(s.parse::<Reference>().is_err(), "{s:?}");
        }
    }
}
