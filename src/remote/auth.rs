//! Credentials and registry auth challenges.
//!
//! Secrets live in [`Secret`], whose `Debug`/`Display` print `<redacted>`, so a credential can
//! not reach a log line or an error message by accident. Errors in this module name the host and
//! the helper, never a username or secret.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use super::RemoteError;

/// A string that must never be printed (password, token).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for building a request header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Username and password (or identity token) for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub secret: Secret,
}

/// Looks credentials up in a docker `config.json` the way the docker CLI does:
/// `credHelpers[host]`, then `credsStore`, then `auths[host].auth` (base64 `user:pass`).
///
/// The file is read on every lookup (lookups happen only when a registry asks for auth), so
/// credentials changed on disk are picked up without a restart.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    path: PathBuf,
    /// `PATH` used to find `docker-credential-*` helpers; `None` = the process's `PATH`.
    helper_path: Option<std::ffi::OsString>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DockerConfigFile {
    auths: HashMap<String, AuthEntry>,
    #[serde(rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

#[derive(Deserialize)]
struct HelperOutput {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `http://h:5000/x` → `h:5000`.
fn normalize_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// The names a registry host may be filed under in `config.json`.
fn host_aliases(host: &str) -> Vec<&str> {
    match host {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => {
            vec![
                "https://index.docker.io/v1/",
                "index.docker.io",
                "docker.io",
                "registry-1.docker.io",
            ]
        }
        h => vec![h],
    }
}

impl DockerConfig {
    /// `dir/config.json`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        DockerConfig {
            path: dir.as_ref().join("config.json"),
            helper_path: None,
        }
    }

    /// Searches credential helpers in `path` (a `PATH`-style list) instead of `$PATH`.
    pub fn with_helper_path(mut self, path: impl Into<std::ffi::OsString>) -> Self {
        self.helper_path = Some(path.into());
        self
    }

    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
    pub fn from_env() -> Option<Self> {
        if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
            return Some(Self::in_dir(d));
        }
        std::env::var_os("HOME").map(|h| Self::in_dir(Path::new(&h).join(".docker")))
    }

    /// Credentials for `host` (as written in the reference), `None` when there are none.
    pub async fn lookup(&self, host: &str) -> Result<Option<Credentials>, RemoteError> {
        let text = match tokio::fs::read(&self.path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(RemoteError::Credentials(format!(
                    "reading {}: {e}",
                    self.path.display()
                )))
            }
        };
        let file: DockerConfigFile = serde_json::from_slice(&text).map_err(|e| {
            // serde_json errors carry a position, not the content.
            RemoteError::Credentials(format!("parsing {}: {e}", self.path.display()))
        })?;
        let aliases = host_aliases(host);
        for a in &aliases {
            if let Some(helper) = file.cred_helpers.get(*a) {
                return run_helper(helper, a, self.helper_path.as_deref()).await;
            }
        }
        for (key, entry) in &file.auths {
            if aliases.contains(&key.as_str()) || aliases.contains(&normalize_host(key)) {
                if let Some(c) = entry.credentials(host)? {
                    return Ok(Some(c));
                }
            }
        }
        if let Some(store) = &file.creds_store {
            return run_helper(store, aliases[0], self.helper_path.as_deref()).await;
        }
        Ok(None)
    }
}

impl AuthEntry {
    fn credentials(&self, host: &str) -> Result<Option<Credentials>, RemoteError> {
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| RemoteError::Credentials(format!("auth for {host} is not base64")))?;
            let raw = String::from_utf8(raw)
                .map_err(|_| RemoteError::Credentials(format!("auth for {host} is not UTF-8")))?;
            let (user, pass) = raw
                .split_once(':')
                .ok_or_else(|| RemoteError::Credentials(format!("auth for {host} has no ':'")))?;
            return Ok(Some(Credentials {
                username: user.to_owned(),
                secret: Secret::new(pass),
            }));
        }
        if let Some(tok) = &self.identitytoken {
            return Ok(Some(Credentials {
                username: "<token>".into(),
                secret: Secret::new(tok.clone()),
            }));
        }
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => Ok(Some(Credentials {
                username: u.clone(),
                secret: Secret::new(p.clone()),
            })),
            _ => Ok(None),
        }
    }
}

/// Runs `docker-credential-<helper> get` with the server URL on stdin.
async fn run_helper(
    helper: &str,
    server: &str,
    path: Option<&std::ffi::OsStr>,
) -> Result<Option<Credentials>, RemoteError> {
    use tokio::io::AsyncWriteExt;
    if helper.is_empty() || helper.contains('/') {
        return Err(RemoteError::Credentials(format!(
            "invalid credential helper name {helper:?}"
        )));
    }
    let program = format!("docker-credential-{helper}");
    let mut cmd = tokio::process::Command::new(&program);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let mut child = cmd
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RemoteError::Credentials(format!("running {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .await
            .map_err(|e| RemoteError::Credentials(format!("writing to {program}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| RemoteError::Credentials(format!("running {program}: {e}")))?;
    if !out.status.success() {
        // "credentials not found in native keychain" is a miss, not an error; its output is not
        // echoed since helpers may print sensitive context.
        tracing::debug!(helper = %program, server = %server, status = %out.status, "credential helper found nothing");
        return Ok(None);
    }
    let h: HelperOutput = serde_json::from_slice(&out.stdout)
        .map_err(|_| RemoteError::Credentials(format!("{program} printed invalid JSON")))?;
    Ok(Some(Credentials {
        username: h.username,
        secret: Secret::new(h.secret),
    }))
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `k="v", k2=v2` → map; quoted values may contain commas.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), val.trim().to_owned());
    }
    out
}

/// Drops the user-info and query of a URL (presigned blob URLs carry signatures there), and
/// clips it: a registry picks the URLs it redirects to.
pub fn redact_url(url: &str) -> String {
    crate::untrusted::clip(&redact_unclipped(url))
}

fn redact_unclipped(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            let had_query = u.query().is_some();
            u.set_query(None);
            u.set_fragment(None);
            if had_query {
                format!("{u}?<redacted>")
            } else {
                u.to_string()
            }
        }
        Err(_) => "<unparseable url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.io/token",service="registry.io",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.io/token".into(),
                service: Some("registry.io".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Credentials {
            username: "u".into(),
            secret: Secret::new("hunter2"),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(
            redact_url("https://u:p@h/x?sig=abc"),
            "https://h/x?<redacted>"
        );
    }

    #[tokio::test]
    async fn reads_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"127.0.0.1:5000":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let cfg = DockerConfig::in_dir(dir.path());
        let c = cfg.lookup("docker.io").await.unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.secret.expose()),
            ("alice", "s3cret")
        );
        assert!(cfg.lookup("127.0.0.1:5000").await.unwrap().is_some());
        assert!(cfg.lookup("other:1").await.unwrap().is_none());
        let missing = DockerConfig::in_dir(dir.path().join("nope"));
        assert!(missing.lookup("x").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn runs_credential_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-testhelper");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread host\necho \"{\\\"ServerURL\\\":\\\"$host\\\",\\\"Username\\\":\\\"bob\\\",\\\"Secret\\\":\\\"pw-$host\\\"}\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"credHelpers":{"reg.example:1":"testhelper"}}"#,
        )
        .unwrap();
        let c = DockerConfig::in_dir(dir.path())
            .with_helper_path(dir.path())
            .lookup("reg.example:1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.secret.expose()),
            ("bob", "pw-reg.example:1")
        );
    }
}
