//! Where `rpull` gets manifests and blobs from: the [`Fetcher`] seam and a small
//! registry (distribution API v2) implementation of it.
//!
//! The crate's full registry client lives in `crate::remote` (lazy ranges, retries, mirrors);
//! `rpull` only needs "resolve a reference" and "stream a whole blob", so it talks through
//! this trait and tests can feed it content obtained by any means.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{ACCEPT, WWW_AUTHENTICATE};
use reqwest::StatusCode;

use super::oci::{
    sha256_digest, Descriptor, MT_DOCKER_MANIFEST, MT_DOCKER_MANIFEST_LIST, MT_OCI_INDEX,
    MT_OCI_MANIFEST,
};
use super::Error;

pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

/// Read access to one image repository.
pub trait Fetcher: Send + Sync {
    /// Resolves the reference to its top descriptor (manifest or index) and its bytes.
    fn resolve(&self) -> impl Future<Output = Result<(Descriptor, Bytes), Error>> + Send;
    /// Fetches a small blob or manifest whole (digest-verified).
    fn fetch_small(&self, desc: &Descriptor) -> impl Future<Output = Result<Bytes, Error>> + Send;
    /// Streams a blob; the content store verifies digest and size on commit.
    fn fetch_stream(&self, desc: &Descriptor) -> impl Future<Output = Result<BlobStream, Error>> + Send;
}

/// A parsed image reference `[host[:port]/]repo[:tag][@digest]`, normalised like Docker's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub host: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidArgument(format!("invalid image reference {s:?}"));
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) if d.contains(':') => (r, Some(d.to_string())),
            Some(_) => return Err(bad()),
            None => (s, None),
        };
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_string())),
            _ => (rest, None),
        };
        if name.is_empty() || name.ends_with('/') || name.contains("//") {
            return Err(bad());
        }
        let (host, repository) = match name.split_once('/') {
            Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => {
                (h.to_string(), r.to_string())
            }
            Some(_) => ("docker.io".to_string(), name.to_string()),
            None => ("docker.io".to_string(), format!("library/{name}")),
        };
        if repository.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(bad());
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".into()) } else { tag };
        Ok(Self { host, repository, tag, digest })
    }

    /// What to ask the manifests endpoint for: the digest if pinned, else the tag.
    fn object(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// `docker.io` is served from `registry-1.docker.io`.
    fn api_host(&self) -> &str {
        if self.host == "docker.io" { "registry-1.docker.io" } else { &self.host }
    }

    /// containerd's default resolver speaks plain HTTP to localhost without being asked.
    fn is_localhost(&self) -> bool {
        let h = self.host.rsplit_once(':').map(|(h, _)| h).unwrap_or(&self.host);
        matches!(h, "localhost" | "127.0.0.1" | "[::1]")
    }
}

/// Options mirroring `ctr`'s registry flags.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    pub plain_http: bool,
    pub skip_verify: bool,
    /// `user[:password]`; never logged.
    pub user: Option<String>,
}

/// Fetches from a registry over the distribution API, with anonymous or basic credentials
/// and bearer-token challenges.
pub struct RegistryFetcher {
    reference: Reference,
    base: String,
    http: reqwest::Client,
    creds: Option<(String, Option<String>)>,
    token: Mutex<Option<String>>,
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

impl RegistryFetcher {
    pub fn new(reference: Reference, opts: &RegistryOptions) -> Result<Self, Error> {
        let scheme = if opts.plain_http || reference.is_localhost() { "http" } else { "https" };
        let base = format!("{scheme}://{}/v2/{}", reference.api_host(), reference.repository);
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(opts.skip_verify)
            .build()
            .map_err(Error::Http)?;
        let creds = opts.user.as_ref().map(|u| match u.split_once(':') {
            Some((user, pass)) => (user.to_string(), Some(pass.to_string())),
            None => (u.clone(), None),
        });
        Ok(Self { reference, base, http, creds, token: Mutex::new(None) })
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// GET with the current token; on 401 answers the challenge once and retries.
    async fn get(&self, url: &str, accept: Option<&str>) -> Result<reqwest::Response, Error> {
        let resp = self.send(url, accept).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return check(resp, url);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.authorize(&challenge).await?;
        check(self.send(url, accept).await?, url)
    }

    async fn send(&self, url: &str, accept: Option<&str>) -> Result<reqwest::Response, Error> {
        let mut req = self.http.get(url);
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        let token = self.token.lock().map(|t| t.clone()).unwrap_or(None);
        req = match (token, &self.creds) {
            (Some(t), _) => req.bearer_auth(t),
            (None, Some((u, p))) => req.basic_auth(u, p.as_ref()),
            (None, None) => req,
        };
        req.send().await.map_err(Error::Http)
    }

    /// Fetches a bearer token for a `Bearer realm=…,service=…,scope=…` challenge.
    async fn authorize(&self, challenge: &str) -> Result<(), Error> {
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            // Basic challenges are answered by `send` already; nothing more to try.
            return Err(Error::Registry(format!("unauthorized (challenge {challenge:?})")));
        };
        let field = |name: &str| {
            params.split(',').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_string())
            })
        };
        let realm = field("realm").ok_or_else(|| Error::Registry("bearer challenge without realm".into()))?;
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(s) = field("service") {
            query.push(("service", s));
        }
        query.push(("scope", field("scope").unwrap_or_else(|| {
            format!("repository:{}:pull", self.reference.repository)
        })));
        let url = reqwest::Url::parse_with_params(&realm, &query)
            .map_err(|e| Error::Registry(format!("bad token realm {realm:?}: {e}")))?;
        let mut req = self.http.get(url);
        if let Some((u, p)) = &self.creds {
            req = req.basic_auth(u, p.as_ref());
        }
        let resp = check(req.send().await.map_err(Error::Http)?, &realm)?;
        let body: serde_json::Value = resp.json().await.map_err(Error::Http)?;
        let token = body["token"]
            .as_str()
            .or_else(|| body["access_token"].as_str())
            .ok_or_else(|| Error::Registry("token response without token".into()))?;
        if let Ok(mut t) = self.token.lock() {
            *t = Some(token.to_string());
        }
        Ok(())
    }

    fn blob_url(&self, desc: &Descriptor) -> String {
        let kind = if is_manifest_type(&desc.media_type) { "manifests" } else { "blobs" };
        format!("{}/{kind}/{}", self.base, desc.digest)
    }
}

fn is_manifest_type(mt: &str) -> bool {
    matches!(mt, MT_OCI_MANIFEST | MT_OCI_INDEX | MT_DOCKER_MANIFEST | MT_DOCKER_MANIFEST_LIST)
}

fn check(resp: reqwest::Response, url: &str) -> Result<reqwest::Response, Error> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(Error::Registry(format!("GET {url}: {}", resp.status())))
    }
}

fn verify(desc: &Descriptor, data: &[u8]) -> Result<(), Error> {
    let got = sha256_digest(data);
    if got != desc.digest || data.len() as i64 != desc.size {
        return Err(Error::DigestMismatch { expected: desc.digest.clone(), got });
    }
    Ok(())
}

impl Fetcher for RegistryFetcher {
    async fn resolve(&self) -> Result<(Descriptor, Bytes), Error> {
        let url = format!("{}/manifests/{}", self.base, self.reference.object());
        let resp = self.get(&url, Some(MANIFEST_ACCEPT)).await?;
        let header_mt = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let body = resp.bytes().await.map_err(Error::Http)?;
        let digest = sha256_digest(&body);
        if let Some(pinned) = &self.reference.digest {
            if *pinned != digest {
                return Err(Error::DigestMismatch { expected: pinned.clone(), got: digest });
            }
        }
        // Prefer the mediaType inside the document; registries may answer with a generic type.
        let inner_mt = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_string));
        let media_type = inner_mt
            .or(header_mt)
            .ok_or_else(|| Error::Registry(format!("{url}: manifest without media type")))?;
        let desc = Descriptor {
            media_type,
            digest,
            size: body.len() as i64,
            urls: vec![],
            annotations: Default::default(),
            platform: None,
        };
        Ok((desc, body))
    }

    async fn fetch_small(&self, desc: &Descriptor) -> Result<Bytes, Error> {
        let url = self.blob_url(desc);
        let body = self.get(&url, Some(MANIFEST_ACCEPT)).await?.bytes().await.map_err(Error::Http)?;
        verify(desc, &body)?;
        Ok(body)
    }

    async fn fetch_stream(&self, desc: &Descriptor) -> Result<BlobStream, Error> {
        let url = self.blob_url(desc);
        let resp = self.get(&url, None).await?;
        Ok(Box::pin(resp.bytes_stream().map(|r| r.map_err(Error::Http))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references_like_docker() {
        let r = Reference::parse("127.0.0.1:5000/demo/py:esgz").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "demo/py", Some("esgz"))
        );
        assert!(r.is_localhost());
        let r = Reference::parse("ubuntu").unwrap();
        assert_eq!((r.host.as_str(), r.repository.as_str()), ("docker.io", "library/ubuntu"));
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = Reference::parse("ghcr.io/a/b@sha256:abcd").unwrap();
        assert_eq!((r.tag.as_deref(), r.digest.as_deref()), (None, Some("sha256:abcd")));
        assert_eq!(r.object(), "sha256:abcd");
        let r = Reference::parse("localhost:5000/x:1@sha256:ab").unwrap();
        assert_eq!((r.tag.as_deref(), r.object()), (Some("1"), "sha256:ab"));
        assert!(Reference::parse("Foo/Bar").is_err());
        assert!(Reference::parse("a@nodigest").is_err());
        assert!(Reference::parse("").is_err());
    }
}
