//! Helpers for the `remote` integration tests: a `docker-registry` on loopback, an OCI push
//! client, a tiny HTTP/1.1 proxy core for fault injection and auth fronts, and log capture.
//! (Kept here until the shared `tests/common` harness lands; small on purpose.)
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `docker-registry` process serving a temp dir; killed on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry; `htpasswd` = path of a bcrypt htpasswd file to require basic auth.
    pub fn start(htpasswd: Option<&Path>) -> Result<Registry> {
        which("docker-registry")?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let auth = match htpasswd {
            Some(p) => format!(
                "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                p.display()
            ),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n  secret: testsecret\n{auth}",
            dir.path().join("data").display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, config)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry")?;
        let reg = Registry {
            child,
            addr,
            _dir: dir,
        };
        reg.wait_ready()?;
        Ok(reg)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("docker-registry did not start on {}", self.addr)
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn which(tool: &str) -> Result<()> {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("{tool} is not installed (run `make deps`)");
    }
    Ok(())
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Pushes with the OCI distribution API (POST upload, PUT ?digest=).
pub struct Pusher {
    pub base: String,
    pub http: reqwest::Client,
    pub basic: Option<(String, String)>,
}

impl Pusher {
    pub fn new(base: &str) -> Self {
        Pusher {
            base: base.to_owned(),
            http: reqwest::Client::new(),
            basic: None,
        }
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.basic {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }

    pub async fn blob(&self, repo: &str, data: Vec<u8>) -> Result<String> {
        let digest = sha256(&data);
        let resp = self
            .auth(
                self.http
                    .post(format!("{}/v2/{repo}/blobs/uploads/", self.base)),
            )
            .send()
            .await?;
        if resp.status() != 202 {
            bail!("upload start: {}", resp.status());
        }
        let loc = resp
            .headers()
            .get("location")
            .context("no Location")?
            .to_str()?
            .to_owned();
        let url = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let resp = self
            .auth(self.http.put(format!("{url}{sep}digest={digest}")))
            .header("content-type", "application/octet-stream")
            .body(data)
            .send()
            .await?;
        if resp.status() != 201 {
            bail!("upload finish: {}", resp.status());
        }
        Ok(digest)
    }

    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<String> {
        let resp = self
            .auth(
                self.http
                    .put(format!("{}/v2/{repo}/manifests/{reference}", self.base)),
            )
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await?;
        if resp.status() != 201 {
            bail!(
                "manifest put: {} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(sha256(body))
    }

    /// Pushes a one-layer image (and an index naming it for linux/amd64 plus a bogus arm64
    /// entry) tagged `tag`; returns (layer digest, image manifest digest).
    pub async fn image(&self, repo: &str, tag: &str, layer: Vec<u8>) -> Result<(String, String)> {
        let layer_size = layer.len();
        let layer_digest = self.blob(repo, layer).await?;
        let mut entries = Vec::new();
        let mut amd64 = String::new();
        // arm64 first, so picking linux/amd64 is a real choice.
        for arch in ["arm64", "amd64"] {
            let config = format!(r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#).into_bytes();
            let config_size = config.len();
            let config_digest = self.blob(repo, config).await?;
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size,
                            "annotations": {"containerd.io/snapshot/stargz/toc.digest": "sha256:00"}}],
            });
            let mbytes = serde_json::to_vec(&manifest)?;
            let mdigest = self
                .manifest(
                    repo,
                    &sha256(&mbytes),
                    "application/vnd.oci.image.manifest.v1+json",
                    &mbytes,
                )
                .await?;
            entries.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
                "size": mbytes.len(), "platform": {"os": "linux", "architecture": arch}}));
            amd64 = mdigest;
        }
        let mdigest = amd64;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        });
        let ibytes = serde_json::to_vec(&index)?;
        self.manifest(
            repo,
            tag,
            "application/vnd.oci.image.index.v1+json",
            &ibytes,
        )
        .await?;
        Ok((layer_digest, mdigest))
    }
}

/// A bcrypt htpasswd file with one user, for `auth: htpasswd`.
pub fn write_htpasswd(dir: &Path, user: &str, pass: &str) -> Result<PathBuf> {
    let hash = bcrypt::hash(pass, 5)?;
    let p = dir.join("htpasswd");
    std::fs::write(&p, format!("{user}:{hash}\n"))?;
    Ok(p)
}

/// A docker config dir whose `config.json` holds `auths[host]`.
pub fn write_docker_config(dir: &Path, host: &str, user: &str, pass: &str) -> Result<()> {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&serde_json::json!({"auths": {host: {"auth": auth}}}))?,
    )?;
    Ok(())
}

/// Everything logged (at TRACE) while the guard lives, for grepping secrets.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs a global TRACE subscriber writing into the capture (call once per test binary).
    pub fn install() -> LogCapture {
        let cap = LogCapture::default();
        let writer = cap.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _ = tracing::subscriber::set_global_default(sub);
        cap
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `blob`'s bytes of `range`, streamed through `fetch_range_into` (the daemon's read path);
/// checks the byte count it returns against what the sink saw.
pub async fn fetch(
    blob: &stargz::Blob,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>, stargz::RemoteError> {
    let mut out = Vec::new();
    let n = blob.fetch_range_into(range, &mut out).await?;
    assert_eq!(n, out.len() as u64, "returned count is what the sink saw");
    Ok(out)
}

/// The image manifest `r` names, as a client pulling for linux/amd64 finds it: the tag's
/// manifest, or the linux/amd64 entry's when the tag is an index. The registry client leaves
/// picking a platform to its callers (`ctr-remote`), so the tests do it here.
#[derive(Debug)]
pub struct Resolved {
    /// Digest of the image manifest (not of the index it was picked from).
    pub digest: String,
    pub manifest: stargz::Manifest,
}

pub async fn resolve(
    c: &stargz::RegistryClient,
    r: &stargz::Reference,
) -> Result<Resolved, stargz::RemoteError> {
    let top = c.fetch_manifest(r, r.object()).await?;
    let mut digest = top.digest;
    let mut raw = top.raw;
    if let Ok(index) = serde_json::from_slice::<stargz::Index>(&raw) {
        if !index.manifests.is_empty() {
            let chosen = index
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .expect("a linux/amd64 manifest in the index");
            let m = c.fetch_manifest(r, &chosen.digest).await?;
            digest = m.digest;
            raw = m.raw;
        }
    }
    let manifest = serde_json::from_slice(&raw).expect("an image manifest");
    Ok(Resolved { digest, manifest })
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct ProxyRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl ProxyRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the proxy does with a request.
pub enum Action {
    /// Forward upstream, then apply the fault to the response.
    Forward(Fault),
    /// Answer directly.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// Send this fraction of the body, then reset the connection (RST).
    Reset(f64),
    /// Declare the full length, send this fraction, close cleanly.
    Truncate(f64),
    /// Replace the answer with this status.
    Status(u16),
    /// Flip one byte of the body at this fraction of its length.
    Corrupt(f64),
    /// Send this fraction, then stall for the duration, then close.
    Stall(f64, Duration),
    /// Ignore the Range header: answer 200 with the whole blob.
    FullBody,
    /// Read the request, never answer (a registry stalled before its response headers).
    Silent,
}

pub type Policy = Arc<dyn Fn(&ProxyRequest) -> Action + Send + Sync>;

/// An HTTP/1.1 proxy on loopback in front of `upstream` (`host:port`), one request per
/// connection. Stops when dropped.
pub struct Proxy {
    pub addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(upstream: &str, policy: Policy) -> Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let upstream = upstream.to_owned();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (upstream, policy, http) = (upstream.clone(), policy.clone(), http.clone());
                tokio::spawn(async move {
                    let _ = serve(sock, &upstream, policy, http).await;
                });
            }
        });
        Ok(Proxy { addr, task })
    }
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    upstream: &str,
    policy: Policy,
    http: reqwest::Client,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut byte).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&byte[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("/").to_owned();
    let headers: Vec<(String, String)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    let req = ProxyRequest {
        method,
        path,
        headers,
    };
    let action = policy(&req);
    if matches!(action, Action::Forward(Fault::Silent)) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return Ok(());
    }
    let (status, mut out_headers, mut body, fault) = match action {
        Action::Respond {
            status,
            headers,
            body,
        } => (status, headers, body, Fault::None),
        Action::Forward(fault) => {
            let method = reqwest::Method::from_bytes(req.method.as_bytes())?;
            let mut rb = http.request(method, format!("http://{upstream}{}", req.path));
            for (k, v) in &req.headers {
                let lk = k.to_ascii_lowercase();
                if lk == "range" && fault == Fault::FullBody {
                    continue;
                }
                if ["range", "accept", "authorization"].contains(&lk.as_str()) {
                    rb = rb.header(k.as_str(), v.as_str());
                }
            }
            let resp = rb.send().await?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .filter(|(k, _)| {
                    !["content-length", "transfer-encoding", "connection"].contains(&k.as_str())
                })
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            let body = resp.bytes().await?.to_vec();
            (status, headers, body, fault)
        }
    };
    let mut status = status;
    if let Fault::Status(s) = fault {
        status = s;
        out_headers.clear();
        body = b"injected".to_vec();
    }
    if let Fault::Corrupt(f) = fault {
        if !body.is_empty() {
            let i = ((body.len() as f64 * f) as usize).min(body.len() - 1);
            body[i] ^= 0x5a;
        }
    }
    let mut resp = format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in &out_headers {
        resp.push_str(&format!("{k}: {v}\r\n"));
    }
    resp.push_str("\r\n");
    sock.write_all(resp.as_bytes()).await?;
    let cut = |f: f64| ((body.len() as f64 * f) as usize).min(body.len());
    match fault {
        Fault::Reset(f) => {
            sock.write_all(&body[..cut(f)]).await?;
            sock.flush().await?;
            sock.set_zero_linger()?;
            drop(sock);
        }
        Fault::Truncate(f) => {
            sock.write_all(&body[..cut(f)]).await?;
            sock.shutdown().await?;
        }
        Fault::Stall(f, d) => {
            sock.write_all(&body[..cut(f)]).await?;
            sock.flush().await?;
            tokio::time::sleep(d).await;
        }
        _ => {
            sock.write_all(&body).await?;
            sock.shutdown().await?;
        }
    }
    Ok(())
}

/// What a [`Hostile`] server does with one request.
pub enum Reply {
    /// A normal answer with a Content-Length.
    Fixed {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// `prefix`, then `piece` over and over (no Content-Length, until `cap` bytes or the
    /// client goes away).
    Endless {
        status: u16,
        headers: Vec<(String, String)>,
        prefix: Vec<u8>,
        piece: Vec<u8>,
        cap: u64,
    },
    /// Declares `len` bytes, then sends one byte every `every`.
    Trickle {
        status: u16,
        headers: Vec<(String, String)>,
        len: u64,
        every: Duration,
    },
    /// Reads the request and never answers (holds the connection open).
    Silent,
}

pub type HostilePolicy = Arc<dyn Fn(&ProxyRequest) -> Reply + Send + Sync>;

/// A raw HTTP/1.1 server on loopback playing a hostile registry: records every request and
/// counts the body bytes it managed to write. Stops accepting when dropped.
pub struct Hostile {
    pub addr: String,
    pub seen: Arc<Mutex<Vec<ProxyRequest>>>,
    pub sent: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hostile {
    pub async fn start(policy: HostilePolicy) -> Result<Hostile> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s2, n2) = (seen.clone(), sent.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (policy, seen, sent) = (policy.clone(), s2.clone(), n2.clone());
                tokio::spawn(async move {
                    let _ = hostile_serve(sock, policy, seen, sent).await;
                });
            }
        });
        Ok(Hostile {
            addr,
            seen,
            sent,
            task,
        })
    }

    pub fn requests(&self) -> Vec<ProxyRequest> {
        self.seen.lock().unwrap().clone()
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn hostile_serve(
    mut sock: tokio::net::TcpStream,
    policy: HostilePolicy,
    seen: Arc<Mutex<Vec<ProxyRequest>>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> Result<()> {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut byte).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&byte[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("/").to_owned();
    let headers: Vec<(String, String)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    let req = ProxyRequest {
        method,
        path,
        headers,
    };
    seen.lock().unwrap().push(req.clone());
    let head = |status: u16, headers: &[(String, String)], len: Option<u64>| {
        let mut h = format!("HTTP/1.1 {status} X\r\nconnection: close\r\n");
        if let Some(l) = len {
            h.push_str(&format!("content-length: {l}\r\n"));
        }
        for (k, v) in headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str("\r\n");
        h
    };
    match policy(&req) {
        Reply::Fixed {
            status,
            headers,
            body,
        } => {
            sock.write_all(head(status, &headers, Some(body.len() as u64)).as_bytes())
                .await?;
            sock.write_all(&body).await?;
            sent.fetch_add(body.len() as u64, Ordering::SeqCst);
            sock.shutdown().await?;
        }
        Reply::Endless {
            status,
            headers,
            prefix,
            piece,
            cap,
        } => {
            sock.write_all(head(status, &headers, None).as_bytes())
                .await?;
            sock.write_all(&prefix).await?;
            let mut n = prefix.len() as u64;
            while n < cap && !piece.is_empty() {
                sock.write_all(&piece).await?;
                n += piece.len() as u64;
                sent.fetch_add(piece.len() as u64, Ordering::SeqCst);
            }
            sock.shutdown().await?;
        }
        Reply::Trickle {
            status,
            headers,
            len,
            every,
        } => {
            sock.write_all(head(status, &headers, Some(len)).as_bytes())
                .await?;
            for _ in 0..len {
                sock.write_all(b"x").await?;
                sock.flush().await?;
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(every).await;
            }
        }
        Reply::Silent => tokio::time::sleep(Duration::from_secs(3600)).await,
    }
    Ok(())
}
