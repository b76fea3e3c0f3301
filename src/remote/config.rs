//! Settings of the registry client, named and defaulted like Go's `config.toml`
//! (`[blob]`, `[resolver.host."HOST".mirrors]`), so the service can deserialize them directly.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::auth::Credentials;

/// `[blob]`: how blobs are fetched.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BlobConfig {
    pub valid_interval: u64,
    pub check_always: bool,
    /// Upper bound on one HTTP request for blob data, body included. One fetch call, all its
    /// retries and waits included, is bounded by [`BlobConfig::fetch_deadline`].
    pub fetching_timeout_sec: u64,
    pub max_retries: u32,
    pub min_wait_msec: u64,
    pub max_wait_msec: u64,
    /// Not a Go key: a response whose headers do not arrive within this long, or whose body
    /// delivers no byte for this long, is treated as a dead connection (and retried).
    pub stall_timeout_msec: u64,
    /// Ranges are never asked for several in one request (a registry or proxy known to answer
    /// multi-range requests wrongly). Without it, a registry that answers one badly is asked
    /// one range at a time from then on anyway.
    pub force_single_range_mode: bool,
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            valid_interval: 60,
            check_always: false,
            fetching_timeout_sec: 300,
            max_retries: 5,
            min_wait_msec: 30,
            max_wait_msec: 300_000,
            stall_timeout_msec: 30_000,
            force_single_range_mode: false,
        }
    }
}

impl BlobConfig {
    /// Wait before retry number `attempt` (0-based): `min * 2^attempt`, capped at `max`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ms = self
            .min_wait_msec
            .saturating_mul(1u64 << attempt.min(30))
            .min(self.max_wait_msec.max(self.min_wait_msec));
        Duration::from_millis(ms)
    }

    /// The longest a registry may stay silent: while we wait for response headers, or
    /// between two pieces of a body.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.stall_timeout_msec.max(1))
    }

    /// Worst case of the retry schedule when each attempt may take `per_attempt`:
    /// `(max_retries + 1) * per_attempt` plus every backoff wait. Callers wrap a whole retried
    /// operation in it, so nested retries (a request retried inside a retried fetch, a
    /// re-resolve) can not multiply the time a hostile registry holds a caller.
    pub fn retry_budget(&self, per_attempt: Duration) -> Duration {
        let attempts = self.max_retries.saturating_add(1);
        let mut total = per_attempt.saturating_mul(attempts);
        // Past 64 retries every wait is capped at `max`: add those without looping.
        for i in 0..self.max_retries.min(64) {
            total = total.saturating_add(self.backoff(i));
        }
        let capped = self.max_retries.saturating_sub(64);
        total.saturating_add(self.backoff(64).saturating_mul(capped))
    }

    /// Bound on one blob fetch call (a streamed range, a whole-blob download), all attempts,
    /// waits and re-resolves included: [`BlobConfig::retry_budget`] of `fetching_timeout_sec`.
    pub fn fetch_deadline(&self) -> Duration {
        self.retry_budget(Duration::from_secs(self.fetching_timeout_sec.max(1)))
    }
}

/// `[resolver]`: per-registry mirrors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ResolverConfig {
    /// Keyed by registry host as written in references (`docker.io`, `ghcr.io`, `host:port`).
    pub host: HashMap<String, HostConfig>,
}

/// `[resolver.host."HOST"]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HostConfig {
    pub mirrors: Vec<MirrorConfig>,
}

/// One mirror, tried in order before the origin host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MirrorConfig {
    /// `host[:port]`, optionally with an `http://`/`https://` scheme.
    pub host: String,
    /// Plain HTTP.
    pub insecure: bool,
    /// 0 = the client default.
    pub request_timeout_sec: u64,
    /// Extra headers sent to this mirror (values are never logged).
    pub header: HashMap<String, String>,
}

/// Everything [`super::RegistryClient`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub resolver: ResolverConfig,
    pub blob: BlobConfig,
    /// Extra hosts spoken to over plain HTTP (besides `localhost`, `127.0.0.1`, `::1`).
    pub insecure_hosts: Vec<String>,
    /// Directory holding `config.json`; `None` = `$DOCKER_CONFIG`, else `$HOME/.docker`.
    pub docker_config_dir: Option<PathBuf>,
    /// Timeout of small requests (manifests, configs, token, size probe).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Accept any TLS certificate, for every host (`ctr --skip-verify`, as Go's resolver does).
    pub skip_tls_verify: bool,
    /// Credentials given on the command line (`ctr --user`), keyed by registry host as written
    /// in references; they take precedence over the docker config.
    pub credentials: HashMap<String, Credentials>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            resolver: ResolverConfig::default(),
            blob: BlobConfig::default(),
            insecure_hosts: Vec::new(),
            docker_config_dir: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            skip_tls_verify: false,
            credentials: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_toml() {
        #[derive(Deserialize)]
        struct Top {
            blob: BlobConfig,
            resolver: ResolverConfig,
        }
        let t: Top = toml::from_str(
            r#"
            [blob]
            max_retries = 2
            [[resolver.host."docker.io".mirrors]]
            host = "mirror.local:5000"
            insecure = true
            request_timeout_sec = 3
            header = { "x-a" = "b" }
            "#,
        )
        .unwrap();
        assert_eq!(t.blob.max_retries, 2);
        assert_eq!(
            t.blob.fetching_timeout_sec, 300,
            "unset keys keep Go's defaults"
        );
        let m = &t.resolver.host["docker.io"].mirrors[0];
        assert_eq!(
            (m.host.as_str(), m.insecure, m.request_timeout_sec),
            ("mirror.local:5000", true, 3)
        );
        assert_eq!(m.header["x-a"], "b");
    }

    #[test]
    fn backoff_is_exponential_and_capped() {
        let b = BlobConfig {
            min_wait_msec: 30,
            max_wait_msec: 100,
            ..Default::default()
        };
        assert_eq!(b.backoff(0), Duration::from_millis(30));
        assert_eq!(b.backoff(1), Duration::from_millis(60));
        assert_eq!(b.backoff(5), Duration::from_millis(100));
        assert_eq!(b.backoff(99), Duration::from_millis(100));
    }

    #[test]
    fn retry_budget_covers_every_attempt_and_wait() {
        let b = BlobConfig {
            max_retries: 3,
            min_wait_msec: 10,
            max_wait_msec: 25,
            fetching_timeout_sec: 2,
            ..Default::default()
        };
        // 4 attempts of 1 s, waits 10 + 20 + 25 ms.
        assert_eq!(
            b.retry_budget(Duration::from_secs(1)),
            Duration::from_millis(4055)
        );
        assert_eq!(b.fetch_deadline(), Duration::from_millis(8055));
        let none = BlobConfig {
            max_retries: 0,
            ..b.clone()
        };
        assert_eq!(
            none.retry_budget(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        // Absurd settings saturate instead of overflowing or looping for long.
        let huge = BlobConfig {
            max_retries: u32::MAX,
            max_wait_msec: u64::MAX,
            ..b
        };
        assert!(huge.fetch_deadline() >= Duration::from_secs(u32::MAX as u64));
        let d = BlobConfig::default();
        assert_eq!(d.stall_timeout(), Duration::from_secs(30));
        assert_eq!(
            d.fetch_deadline(),
            Duration::from_millis(6 * 300_000 + 30 + 60 + 120 + 240 + 480)
        );
    }
}
