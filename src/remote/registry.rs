//! The OCI distribution client: endpoints (mirrors, then origin), auth, retries, resolve, and
//! small-object fetches. Large blob data goes through [`super::Blob`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;

use super::auth::{parse_challenge, redact_url, Challenge, Credentials, DockerConfig, Secret};
use super::body::{self, parse_content_range, MAX_CONFIG, MAX_MANIFEST, MAX_TOKEN};
use super::config::ClientConfig;
use super::reference::Reference;
use super::RemoteError;
use crate::oci::{
    sha256_digest, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST,
};

/// Redirects followed per request (Go's and reqwest's default).
const MAX_REDIRECTS: usize = 10;

/// One place a repository can be reached: a mirror or the origin registry.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// `scheme://host[:port]`.
    pub base: String,
    /// The host credentials are looked up for.
    pub cred_host: String,
    pub timeout: Duration,
    /// Extra headers (mirror `header` config); values are never logged.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub mirror: bool,
}

/// What a registry said to use for auth, cached per endpoint and scope.
#[derive(Clone)]
enum Auth {
    Basic(Credentials),
    Bearer { token: Secret, expires: Instant },
}

/// What a request may carry only to the origin (scheme, host, port) it was first sent to:
/// credentials and mirror `header`s. A redirect elsewhere (blob storage, a CDN, whatever a
/// hostile registry names) gets neither, as Go's client does for Authorization.
#[derive(Default)]
struct OriginOnly<'a> {
    headers: &'a [(HeaderName, HeaderValue)],
    auth: Option<Auth>,
}

impl OriginOnly<'_> {
    fn apply(&self, mut rb: RequestBuilder) -> RequestBuilder {
        for (k, v) in self.headers {
            rb = rb.header(k, v);
        }
        match &self.auth {
            Some(Auth::Basic(c)) => rb.basic_auth(&c.username, Some(c.secret.expose())),
            Some(Auth::Bearer { token, .. }) => rb.bearer_auth(token.expose()),
            None => rb,
        }
    }
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A manifest or index exactly as the registry served it (see [`RegistryClient::fetch_manifest`]).
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub media_type: String,
    /// `sha256:` of [`RawManifest::raw`].
    pub digest: String,
    pub raw: Vec<u8>,
}

/// Where a blob's bytes are served and how big it is (see [`RegistryClient::locate_blob`]).
#[derive(Debug, Clone)]
pub(crate) struct BlobLocation {
    pub endpoint: Endpoint,
    /// Final URL after redirects.
    pub url: String,
    /// The URL is on another host (blob storage): request it without registry auth.
    pub redirected: bool,
    pub size: u64,
}

/// The last bytes of a blob, fetched by the probe that located it
/// ([`RegistryClient::locate_blob_with_tail`]).
#[derive(Debug)]
pub(crate) struct BlobTail {
    /// Where `bytes` start in the blob.
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// The most bytes a probe brings back with the blob's location.
pub(crate) const MAX_TAIL: u64 = 1 << 20;

/// A registry client shared by every blob of every layer (cheap to clone).
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: ClientConfig,
    docker: Option<DockerConfig>,
    /// `"<base>|<scope>"` → auth to send.
    auth: Mutex<HashMap<String, Auth>>,
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    matches!(h, "localhost" | "127.0.0.1" | "[::1]" | "::1") || h.ends_with(".localhost")
}

fn retryable_status(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || (s.is_server_error() && s != StatusCode::NOT_IMPLEMENTED)
}

impl RegistryClient {
    pub fn new(config: ClientConfig) -> Result<Self, RemoteError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Followed by hand in `send_following`, which decides what a hop may carry.
            .redirect(reqwest::redirect::Policy::none())
            .danger_accept_invalid_certs(config.skip_tls_verify)
            .user_agent(concat!("stargz-snapshotter-rs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RemoteError::Http {
                url: String::new(),
                source: e.without_url(),
            })?;
        let docker = match &config.docker_config_dir {
            Some(d) => Some(DockerConfig::in_dir(d)),
            None => DockerConfig::from_env(),
        };
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                config,
                docker,
                auth: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Replaces where credentials come from (e.g. a test's helper `PATH`).
    pub fn with_docker_config(
        config: ClientConfig,
        docker: DockerConfig,
    ) -> Result<Self, RemoteError> {
        let c = Self::new(config)?;
        let inner = Inner {
            http: c.inner.http.clone(),
            config: c.inner.config.clone(),
            docker: Some(docker),
            auth: Mutex::new(HashMap::new()),
        };
        Ok(RegistryClient {
            inner: Arc::new(inner),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Mirrors configured for the reference's host, in order, then the origin.
    pub(crate) fn endpoints(&self, reference: &Reference) -> Vec<Endpoint> {
        let cfg = &self.inner.config;
        let mut out = Vec::new();
        if let Some(h) = cfg.resolver.host.get(&reference.host) {
            for m in &h.mirrors {
                let (scheme, host) = if let Some(h) = m.host.strip_prefix("http://") {
                    ("http", h)
                } else if let Some(h) = m.host.strip_prefix("https://") {
                    ("https", h)
                } else if m.insecure || is_loopback(&m.host) {
                    ("http", m.host.as_str())
                } else {
                    ("https", m.host.as_str())
                };
                let host = host.trim_end_matches('/');
                let headers = m
                    .header
                    .iter()
                    .filter_map(|(k, v)| {
                        Some((
                            HeaderName::try_from(k.as_str()).ok()?,
                            HeaderValue::try_from(v.as_str()).ok()?,
                        ))
                    })
                    .collect();
                out.push(Endpoint {
                    base: format!("{scheme}://{host}"),
                    cred_host: host.to_owned(),
                    timeout: if m.request_timeout_sec > 0 {
                        Duration::from_secs(m.request_timeout_sec)
                    } else {
                        cfg.request_timeout
                    },
                    headers,
                    mirror: true,
                });
            }
        }
        let host = reference.api_host();
        let plain = is_loopback(host)
            || cfg
                .insecure_hosts
                .iter()
                .any(|h| h == host || h == &reference.host);
        out.push(Endpoint {
            base: format!("{}://{host}", if plain { "http" } else { "https" }),
            cred_host: reference.host.clone(),
            timeout: cfg.request_timeout,
            headers: Vec::new(),
            mirror: false,
        });
        out
    }

    fn auth_key(ep: &Endpoint, scope: &str) -> String {
        format!("{}|{scope}", ep.base)
    }

    fn cached_auth(&self, ep: &Endpoint, scope: &str) -> Option<Auth> {
        let map = self.inner.auth.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&Self::auth_key(ep, scope))? {
            Auth::Bearer { expires, .. } if *expires <= Instant::now() => None,
            a => Some(a.clone()),
        }
    }

    /// Sends one request with retries (connection errors, stalls, 5xx, 429; exponential
    /// backoff) and auth (`ep` = registry endpoint: cached auth and the mirror's headers are
    /// attached for its own origin and a 401 from it triggers one challenge/refresh; `None` = a
    /// redirected storage URL, sent without either). Any other status is returned for the
    /// caller to judge. All attempts together end within `retry_budget(timeout)`.
    pub(crate) async fn send(
        &self,
        ep: Option<&Endpoint>,
        repo: &str,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        timeout: Duration,
    ) -> Result<Response, RemoteError> {
        let budget = self.inner.config.blob.retry_budget(timeout);
        match tokio::time::timeout(
            budget,
            self.send_retrying(ep, repo, method, url, headers, timeout),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(RemoteError::TimedOut {
                what: format!("request to {}", redact_url(url)),
                after: budget,
            }),
        }
    }

    async fn send_retrying(
        &self,
        ep: Option<&Endpoint>,
        repo: &str,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        timeout: Duration,
    ) -> Result<Response, RemoteError> {
        let blob = &self.inner.config.blob;
        let scope = format!("repository:{repo}:pull");
        let mut refreshed = false;
        let mut attempt = 0;
        loop {
            let private = match ep {
                Some(ep) => OriginOnly {
                    headers: &ep.headers,
                    auth: self.cached_auth(ep, &scope),
                },
                None => OriginOnly::default(),
            };
            let result = self
                .send_following(&method, url, headers, timeout, &private)
                .await;
            let retry = match &result {
                // A 401 from a redirect target is not the registry asking for credentials.
                Ok((r, left)) if r.status() == StatusCode::UNAUTHORIZED && !refreshed && !left => {
                    if let Some(ep) = ep {
                        refreshed = true;
                        self.authenticate(ep, &scope, r.headers()).await?;
                        continue;
                    }
                    false
                }
                Ok((r, _)) => retryable_status(r.status()),
                Err(RemoteError::Http { source: e, .. }) => {
                    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
                }
                Err(RemoteError::Stalled(_)) => true,
                Err(_) => false,
            };
            if retry && attempt < blob.max_retries {
                let wait = blob.backoff(attempt);
                tracing::debug!(url = %redact_url(url), attempt, wait_ms = wait.as_millis() as u64, status = ?result.as_ref().ok().map(|(r, _)| r.status().as_u16()), "retrying registry request");
                attempt += 1;
                tokio::time::sleep(wait).await;
                continue;
            }
            return result.map(|(r, _)| r);
        }
    }

    /// One attempt: sends `url`, following up to [`MAX_REDIRECTS`] redirects. `private` goes
    /// only to hops on the first URL's origin; once a hop leaves it, no later hop gets it.
    /// Each hop's response headers must arrive within the stall timeout. Returns the final
    /// response and whether it came from another origin.
    async fn send_following(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        timeout: Duration,
        private: &OriginOnly<'_>,
    ) -> Result<(Response, bool), RemoteError> {
        let first = Url::parse(url)
            .map_err(|_| RemoteError::Protocol(format!("invalid URL {}", redact_url(url))))?;
        let stall = self.inner.config.blob.stall_timeout();
        let mut current = first.clone();
        let mut method = method.clone();
        let mut left = false;
        for _ in 0..=MAX_REDIRECTS {
            let mut rb = self
                .inner
                .http
                .request(method.clone(), current.clone())
                .headers(headers.clone())
                .timeout(timeout);
            if !left {
                rb = private.apply(rb);
            }
            let resp = match tokio::time::timeout(stall, rb.send()).await {
                Err(_) => {
                    tracing::debug!(url = %redact_url(current.as_str()), wait_ms = stall.as_millis() as u64, "no response headers in time");
                    return Err(RemoteError::Stalled(stall));
                }
                Ok(r) => r.map_err(|e| RemoteError::http(current.as_str(), e))?,
            };
            let status = resp.status();
            let redirect = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
            let Some(location) = resp.headers().get(LOCATION).filter(|_| redirect) else {
                return Ok((resp, left));
            };
            let next = location
                .to_str()
                .ok()
                .and_then(|l| current.join(l).ok())
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    RemoteError::Protocol(format!(
                        "{} redirected to an invalid Location",
                        redact_url(current.as_str())
                    ))
                })?;
            if !same_origin(&next, &first) {
                left = true;
            }
            if status == StatusCode::SEE_OTHER && method != Method::HEAD {
                method = Method::GET;
            }
            tracing::debug!(from = %redact_url(current.as_str()), to = %redact_url(next.as_str()), status = status.as_u16(), credentials = !left, "following redirect");
            current = next;
        }
        Err(RemoteError::Protocol(format!(
            "more than {MAX_REDIRECTS} redirects from {}",
            redact_url(url)
        )))
    }

    /// Answers a 401: learns the scheme from `WWW-Authenticate`, fetches a bearer token when
    /// asked (with credentials if any), and caches what to send next time.
    async fn authenticate(
        &self,
        ep: &Endpoint,
        scope: &str,
        headers: &HeaderMap,
    ) -> Result<(), RemoteError> {
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_challenge)
            .ok_or_else(|| RemoteError::Unauthorized {
                host: ep.cred_host.clone(),
                reason: "401 without a usable WWW-Authenticate challenge".into(),
            })?;
        let creds = match (
            self.inner.config.credentials.get(&ep.cred_host),
            &self.inner.docker,
        ) {
            (Some(c), _) => Some(c.clone()),
            (None, Some(d)) => d.lookup(&ep.cred_host).await?,
            (None, None) => None,
        };
        let auth = match challenge {
            Challenge::Basic => Auth::Basic(creds.ok_or_else(|| RemoteError::Unauthorized {
                host: ep.cred_host.clone(),
                reason: "basic auth requested and no credentials configured".into(),
            })?),
            Challenge::Bearer {
                realm,
                service,
                scope: their_scope,
            } => {
                self.fetch_token(
                    ep,
                    &realm,
                    service.as_deref(),
                    scope,
                    their_scope.as_deref(),
                    creds.as_ref(),
                )
                .await?
            }
        };
        tracing::debug!(host = %ep.cred_host, scope = %scope, "registry auth refreshed");
        self.inner
            .auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Self::auth_key(ep, scope), auth);
        Ok(())
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        their_scope: Option<&str>,
        creds: Option<&Credentials>,
    ) -> Result<Auth, RemoteError> {
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let mut url = reqwest::Url::parse(realm).map_err(|_| RemoteError::Unauthorized {
            host: ep.cred_host.clone(),
            reason: "token realm is not a URL".into(),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
            if let Some(s) = their_scope.filter(|s| *s != scope) {
                q.append_pair("scope", s);
            }
        }
        // The realm is the registry's choice: the credentials go to it (as Docker's clients
        // do) but not on to where it redirects, and its answer is bounded like any body.
        let private = OriginOnly {
            headers: &[],
            auth: creds.cloned().map(Auth::Basic),
        };
        let timeout = self.inner.config.request_timeout;
        let stall = self.inner.config.blob.stall_timeout();
        let (resp, _) = self
            .send_following(
                &Method::GET,
                url.as_str(),
                &HeaderMap::new(),
                timeout,
                &private,
            )
            .await?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let detail = body::error_detail(resp, stall).await;
            return Err(RemoteError::Unauthorized {
                host: ep.cred_host.clone(),
                reason: format!(
                    "token endpoint {} answered {status}{}",
                    redact_url(url.as_str()),
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                ),
            });
        }
        let raw = body::read_limited(resp, MAX_TOKEN, "token response", stall).await?;
        let body: TokenResponse =
            serde_json::from_slice(&raw).map_err(|_| RemoteError::Unauthorized {
                host: ep.cred_host.clone(),
                reason: "token endpoint sent invalid JSON".into(),
            })?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| RemoteError::Unauthorized {
                host: ep.cred_host.clone(),
                reason: "token endpoint sent no token".into(),
            })?;
        // Refresh a little before the registry would reject it.
        let ttl = body.expires_in.unwrap_or(60).max(10);
        Ok(Auth::Bearer {
            token: Secret::new(token),
            expires: Instant::now() + Duration::from_secs(ttl - ttl / 10),
        })
    }

    /// GETs a small object (manifest, config) from the first endpoint that has it, refusing
    /// more than `limit` bytes (`what` names it in that error).
    async fn get_small(
        &self,
        reference: &Reference,
        path: &str,
        accept: Option<&str>,
        limit: u64,
        what: &str,
    ) -> Result<(Vec<u8>, Option<String>), RemoteError> {
        let stall = self.inner.config.blob.stall_timeout();
        let mut headers = HeaderMap::new();
        if let Some(a) = accept {
            headers.insert(
                ACCEPT,
                HeaderValue::from_str(a).map_err(|_| RemoteError::Protocol("bad accept".into()))?,
            );
        }
        let mut last = None;
        for ep in self.endpoints(reference) {
            let url = format!("{}/v2/{}/{path}", ep.base, reference.repository);
            let result = async {
                let resp = self
                    .send(
                        Some(&ep),
                        &reference.repository,
                        Method::GET,
                        &url,
                        &headers,
                        ep.timeout,
                    )
                    .await?;
                if !resp.status().is_success() {
                    return Err(body::status_error(resp, &url, stall).await);
                }
                let ct = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(crate::untrusted::clip);
                let body = body::read_limited(resp, limit, what, stall).await?;
                Ok((body, ct))
            }
            .await;
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::debug!(endpoint = %ep.base, mirror = ep.mirror, error = %crate::untrusted::chain(&e), "endpoint failed, trying next");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RemoteError::NotFound(reference.to_string())))
    }

    /// Fetches one manifest or index as served, without picking a platform: `object` is a tag
    /// or digest. Clients that store content (`ctr-remote rpull`) need the exact bytes of
    /// every level. A digest `object` (or a pinned reference) is verified.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
        object: &str,
    ) -> Result<RawManifest, RemoteError> {
        let accept = [
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_LIST,
            MEDIA_OCI_MANIFEST,
            MEDIA_DOCKER_MANIFEST,
        ]
        .join(", ");
        let (raw, ct) = self
            .get_small(
                reference,
                &format!("manifests/{object}"),
                Some(&accept),
                MAX_MANIFEST,
                "manifest",
            )
            .await?;
        let digest = sha256_digest(&raw);
        let pinned = if object.contains(':') {
            Some(object)
        } else {
            reference.digest.as_deref()
        };
        check_pinned(pinned, &digest)?;
        Ok(RawManifest {
            media_type: media_type(&raw, ct.as_deref()),
            digest,
            raw,
        })
    }

    /// Fetches a small blob (an image config) whole and checks its digest.
    pub async fn fetch_blob_bytes(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<Vec<u8>, RemoteError> {
        let (raw, _) = self
            .get_small(
                reference,
                &format!("blobs/{digest}"),
                None,
                MAX_CONFIG,
                "blob",
            )
            .await?;
        check_pinned(Some(digest), &sha256_digest(&raw))?;
        Ok(raw)
    }

    /// Learns a blob's size and final URL with a `Range: bytes=0-1` GET (following redirects to
    /// blob storage), trying mirrors first. Each endpoint gets its request timeout for the whole
    /// probe, retries included, so a stalled mirror can not keep the origin from being tried and
    /// the whole call ends within the sum of those timeouts.
    pub(crate) async fn locate_blob(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<BlobLocation, RemoteError> {
        self.locate_blob_with_tail(reference, digest, 0)
            .await
            .map(|(loc, _)| loc)
    }

    /// Locates the blob (its size and final URL, mirrors first) with one small ranged GET. With
    /// `tail` > 0 (at most [`MAX_TAIL`]) the probe asks for the blob's last `tail` bytes
    /// (`Range: bytes=-N`), which tell the size just as well and usually hold an eStargz
    /// layer's footer and TOC: the layer then mounts in one round trip instead of three. A
    /// registry that does not answer a suffix range with exactly that (or refuses it with 416)
    /// gets the plain two-byte probe; any other failure is the answer (a registry that is down
    /// or stalled is not asked twice).
    pub(crate) async fn locate_blob_with_tail(
        &self,
        reference: &Reference,
        digest: &str,
        tail: u64,
    ) -> Result<(BlobLocation, Option<BlobTail>), RemoteError> {
        let tail = tail.min(MAX_TAIL);
        if tail > 0 {
            match self.locate_once(reference, digest, tail).await {
                Err(e @ (RemoteError::Protocol(_) | RemoteError::Status { status: 416, .. })) => {
                    tracing::debug!(digest = %digest, error = %crate::untrusted::chain(&e), "suffix-range probe not understood; probing plainly");
                }
                found => return found,
            }
        }
        self.locate_once(reference, digest, 0).await
    }

    async fn locate_once(
        &self,
        reference: &Reference,
        digest: &str,
        tail: u64,
    ) -> Result<(BlobLocation, Option<BlobTail>), RemoteError> {
        let mut headers = HeaderMap::new();
        let range = match tail {
            0 => HeaderValue::from_static("bytes=0-1"),
            n => HeaderValue::from_str(&format!("bytes=-{n}"))
                .map_err(|_| RemoteError::Protocol("bad range".into()))?,
        };
        headers.insert(RANGE, range);
        let mut last = None;
        for ep in self.endpoints(reference) {
            let url = format!("{}/v2/{}/blobs/{digest}", ep.base, reference.repository);
            let probe = tokio::time::timeout(
                ep.timeout,
                self.probe(&ep, &reference.repository, &url, &headers, tail),
            );
            let result = probe.await.unwrap_or_else(|_| {
                Err(RemoteError::TimedOut {
                    what: format!("probing blob at {}", redact_url(&url)),
                    after: ep.timeout,
                })
            });
            match result {
                Ok(loc) => return Ok(loc),
                Err(e) => {
                    tracing::debug!(endpoint = %ep.base, mirror = ep.mirror, digest = %digest, error = %crate::untrusted::chain(&e), "blob not reachable here");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RemoteError::NotFound(digest.to_owned())))
    }

    /// One probe at one endpoint; with `tail` > 0 the request is a suffix range and its body,
    /// when it is exactly the blob's last bytes and at most `tail` of them, comes back too.
    async fn probe(
        &self,
        ep: &Endpoint,
        repo: &str,
        url: &str,
        headers: &HeaderMap,
        tail: u64,
    ) -> Result<(BlobLocation, Option<BlobTail>), RemoteError> {
        let resp = self
            .send(Some(ep), repo, Method::GET, url, headers, ep.timeout)
            .await?;
        let mut tail_range = None;
        let size = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let (start, end, total) = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .and_then(|(a, b, t)| Some((a, b, t?)))
                    .ok_or_else(|| {
                        RemoteError::Protocol("206 without a total in Content-Range".into())
                    })?;
                if tail > 0 {
                    if end != total || end - start > tail {
                        return Err(RemoteError::Protocol(format!(
                            "asked for the last {tail} bytes, got {start}-{end} of {total}"
                        )));
                    }
                    tail_range = Some(start);
                }
                total
            }
            // The whole blob is on its way: take its size, not its bytes.
            StatusCode::OK if tail == 0 => resp
                .content_length()
                .ok_or_else(|| RemoteError::Protocol("200 without Content-Length".into()))?,
            StatusCode::OK => {
                return Err(RemoteError::Protocol(
                    "a suffix range was answered with the whole blob".into(),
                ))
            }
            _ => {
                return Err(
                    body::status_error(resp, url, self.inner.config.blob.stall_timeout()).await,
                )
            }
        };
        let final_url = resp.url().clone();
        let orig = reqwest::Url::parse(url).map_err(|_| RemoteError::Protocol("bad url".into()))?;
        let redirected = final_url.host_str() != orig.host_str()
            || final_url.port_or_known_default() != orig.port_or_known_default()
            || final_url.scheme() != orig.scheme();
        let tail = match tail_range {
            Some(offset) => {
                let bytes = body::read_limited(
                    resp,
                    tail,
                    "blob tail",
                    self.inner.config.blob.stall_timeout(),
                )
                .await?;
                if offset + bytes.len() as u64 != size {
                    return Err(RemoteError::Protocol(format!(
                        "blob tail: {} bytes from {offset} of {size}",
                        bytes.len()
                    )));
                }
                Some(BlobTail { offset, bytes })
            }
            None => {
                // Dropping the response closes the connection if the server sent more than asked.
                drop(resp);
                None
            }
        };
        let location = BlobLocation {
            endpoint: ep.clone(),
            url: final_url.to_string(),
            redirected,
            size,
        };
        Ok((location, tail))
    }
}

fn check_pinned(want: Option<&str>, got: &str) -> Result<(), RemoteError> {
    match want {
        Some(w) if w.starts_with("sha256:") && w != got => Err(RemoteError::DigestMismatch {
            expected: w.to_owned(),
            actual: got.to_owned(),
        }),
        _ => Ok(()),
    }
}

fn media_type(raw: &[u8], content_type: Option<&str>) -> String {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Option<Probe> = serde_json::from_slice(raw).ok();
    if let Some(mt) = probe.as_ref().and_then(|p| p.media_type.clone()) {
        return mt;
    }
    if probe.as_ref().is_some_and(|p| p.manifests.is_some()) {
        return MEDIA_OCI_INDEX.to_owned();
    }
    content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim().to_owned())
        .unwrap_or_else(|| MEDIA_OCI_MANIFEST.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::config::{HostConfig, MirrorConfig};

    #[test]
    fn endpoints_put_mirrors_first_and_pick_schemes() {
        let mut cfg = ClientConfig::default();
        cfg.resolver.host.insert(
            "docker.io".into(),
            HostConfig {
                mirrors: vec![
                    MirrorConfig {
                        host: "m1.local".into(),
                        insecure: true,
                        ..Default::default()
                    },
                    MirrorConfig {
                        host: "m2.local".into(),
                        request_timeout_sec: 3,
                        ..Default::default()
                    },
                ],
            },
        );
        let c = RegistryClient::new(cfg).unwrap();
        let eps = c.endpoints(&"alpine".parse().unwrap());
        let bases: Vec<_> = eps.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "http://m1.local",
                "https://m2.local",
                "https://registry-1.docker.io"
            ]
        );
        assert_eq!(eps[1].timeout, Duration::from_secs(3));
        let eps = c.endpoints(&"localhost:5000/a".parse().unwrap());
        assert_eq!(eps[0].base, "http://localhost:5000");
        let eps = c.endpoints(&"127.0.0.1:5000/a".parse().unwrap());
        assert_eq!(eps[0].base, "http://127.0.0.1:5000");
    }

    #[test]
    fn origin_is_scheme_host_and_port() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(same_origin(
            &u("http://h/v2/x"),
            &u("http://h:80/other?q=1")
        ));
        assert!(same_origin(&u("https://h/a"), &u("https://h:443/b")));
        assert!(!same_origin(&u("https://h/a"), &u("http://h/a")));
        assert!(!same_origin(&u("http://h:5000/a"), &u("http://h:5001/a")));
        assert!(!same_origin(&u("http://h/a"), &u("http://h.evil/a")));
    }
}
