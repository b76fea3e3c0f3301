//! `config.toml` with the Go daemon's key names and defaults. Unknown keys, and Go keys this
//! daemon does not support ([`UNSUPPORTED`]), are reported (so a typo or a setting that takes
//! no effect is visible in the log) but never fatal, so a Go config file works unchanged.

use std::path::Path;

use serde::Deserialize;

use crate::snapshot::check::{CheckPolicy, DEFAULT_CHECK_TIMEOUT};

/// `[blob]` and `[resolver.host."HOST".mirrors]` belong to the registry client; the daemon
/// config reads them straight into its types so there is one definition of each key.
pub use crate::remote::config::{BlobConfig, ResolverConfig};

/// Errors reading the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parse config {path}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
}

/// Go keys that are read but have no effect here, with why. Each is warned about when set.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "http_cache_type",
        "there is no cache of compressed blob data; decompressed file data is cached as \
         `filesystem_cache_type` says",
    ),
    (
        "blob.chunk_size",
        "blobs are fetched by the chunks of their TOC, not at a fixed granularity",
    ),
    (
        "directory_cache.max_lru_cache_entry",
        "there is no in-memory cache in front of the on-disk cache",
    ),
    (
        "directory_cache.sync_add",
        "fetched data is written straight to the cache file, there is no write buffer to wait for",
    ),
    (
        "directory_cache.direct",
        "there is no in-memory cache in front of the on-disk cache to bypass",
    ),
    (
        "directory_cache.fadv_dontneed",
        "cache files are read by the kernel directly (passthrough) or once per read",
    ),
    (
        "prefetch_timeout_sec",
        "prefetch runs in the background and never holds up a mount",
    ),
    (
        "prefetch_async_size",
        "prefetch runs in the background and never holds up a mount",
    ),
    (
        "debug_address",
        "Go's pprof and expvar endpoints have no equivalent here; metrics are on metrics_address",
    ),
    (
        "metadata_store",
        "a layer's metadata is an in-memory inode table built from its TOC",
    ),
    (
        "fuse.entry_timeout",
        "attr_timeout covers directory entries and attributes alike",
    ),
    (
        "snapshotter.allow_invalid_mounts_on_restart",
        "a layer that cannot be re-mounted on restart is always logged and skipped",
    ),
];

/// A key of [`UNSUPPORTED`] that a config file set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub key: String,
    pub reason: &'static str,
}

/// The whole daemon configuration (Go: `service.Config` + `config.Config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where decompressed file data is cached: `""`/`"directory"` (on disk, the default) or
    /// `"memory"`.
    pub filesystem_cache_type: String,
    pub prefetch_size: i64,
    pub noprefetch: bool,
    pub no_background_fetch: bool,
    pub allow_no_verification: bool,
    pub disable_verification: bool,
    pub max_concurrency: i64,
    /// Seconds a blob resolved ahead of its mount (the layers an image lists after the one
    /// being mounted) waits to be mounted before it is dropped; 0 = Go's default, 120.
    pub resolve_result_entry_ttl_sec: i64,
    /// Keep no metrics at all (Go: nothing is registered).
    pub no_prometheus: bool,
    /// `host:port` to serve Prometheus metrics on (`/metrics`); "" = not served.
    pub metrics_address: String,
    pub blob: BlobConfig,
    pub directory_cache: DirectoryCacheConfig,
    pub fuse: FuseConfig,
    pub resolver: ResolverConfig,
    pub snapshotter: SnapshotterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            filesystem_cache_type: String::new(),
            prefetch_size: 0,
            noprefetch: false,
            no_background_fetch: false,
            allow_no_verification: false,
            disable_verification: false,
            max_concurrency: 2,
            resolve_result_entry_ttl_sec: 120,
            no_prometheus: false,
            metrics_address: String::new(),
            blob: BlobConfig::default(),
            directory_cache: DirectoryCacheConfig::default(),
            fuse: FuseConfig::default(),
            resolver: ResolverConfig::default(),
            snapshotter: SnapshotterConfig::default(),
        }
    }
}

/// `[directory_cache]`: the on-disk cache of decompressed file data.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DirectoryCacheConfig {
    /// The most cache files a layer keeps open.
    pub max_cache_fds: i64,
    /// Not a Go key: byte budget of the cache, all layers together; least recently read files
    /// no container has open are evicted past it (and fetched again when read). 0 = half the
    /// size of the file system holding the root.
    pub max_bytes: u64,
}

impl Default for DirectoryCacheConfig {
    fn default() -> Self {
        DirectoryCacheConfig {
            max_cache_fds: 10,
            max_bytes: 0,
        }
    }
}

/// `[fuse]`: kernel cache timeouts (seconds) and passthrough.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FuseConfig {
    pub attr_timeout: i64,
    pub passthrough: bool,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            attr_timeout: crate::fs::layer::DEFAULT_ATTR_TIMEOUT_SECS as i64,
            // Go's default is false; ours is on because it falls back to normal reads by itself
            // where the kernel lacks FUSE passthrough, and cached reads then skip the daemon.
            passthrough: true,
        }
    }
}

/// `[snapshotter]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SnapshotterConfig {
    /// Not a Go key: how long (seconds) Prepare/View/Mounts wait for the registry to confirm
    /// a mounted layer is reachable before answering Unavailable; 0 = the default.
    pub check_timeout_sec: u64,
    /// Not a Go key: a fully fetched layer gets a plain directory tree made of its cache files
    /// (no data copied), which new containers use instead of the FUSE mount.
    pub native_layers: bool,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            check_timeout_sec: DEFAULT_CHECK_TIMEOUT.as_secs(),
            native_layers: true,
        }
    }
}

impl Config {
    /// Parses TOML text; returns the config and the dotted paths of keys it does not know.
    /// Keys of [`UNSUPPORTED`] are not among them: each is logged here, with why it is ignored.
    pub fn parse(text: &str, path: &str) -> Result<(Config, Vec<String>), ConfigError> {
        let (cfg, unknown, unsupported) = Config::parse_keys(text, path)?;
        for u in unsupported {
            tracing::warn!(key = %u.key, reason = u.reason, config = path, "unsupported configuration key ignored");
        }
        Ok((cfg, unknown))
    }

    /// [`Config::parse`] without logging: the config, unknown keys and unsupported keys set.
    fn parse_keys(
        text: &str,
        path: &str,
    ) -> Result<(Config, Vec<String>, Vec<Unsupported>), ConfigError> {
        let mut ignored = Vec::new();
        let de = toml::Deserializer::parse(text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        let cfg =
            serde_ignored::deserialize(de, |p| ignored.push(p.to_string())).map_err(|source| {
                ConfigError::Parse {
                    path: path.into(),
                    source,
                }
            })?;
        let mut unknown = Vec::new();
        let mut unsupported = Vec::new();
        for key in ignored {
            match UNSUPPORTED.iter().find(|(k, _)| *k == key) {
                Some((_, reason)) => unsupported.push(Unsupported { key, reason }),
                None => unknown.push(key),
            }
        }
        Ok((cfg, unknown, unsupported))
    }

    /// When and how long the snapshotter checks mounted layers: `[blob] valid_interval` and
    /// `check_always` as Go reads them, bounded by `[snapshotter] check_timeout_sec`.
    pub fn check_policy(&self) -> CheckPolicy {
        CheckPolicy::from_config(
            self.blob.valid_interval,
            self.blob.check_always,
            std::time::Duration::from_secs(self.snapshotter.check_timeout_sec),
        )
    }

    /// Loads `path`; a missing file gives the defaults only when `missing_ok` (the default path).
    pub fn load(path: &Path, missing_ok: bool) -> Result<(Config, Vec<String>), ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &path.display().to_string()),
            Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => {
                Ok((Config::default(), Vec::new()))
            }
            Err(source) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_keys_and_defaults() {
        let text = r#"
            prefetch_size = 1024
            noprefetch = true
            no_such_key = 1
            [blob]
            max_retries = 2
            [fuse]
            attr_timeout = 5
            [resolver.host."docker.io".mirrors]
            [[resolver.host."exam.ple".mirrors]]
            host = "mirror.local"
            insecure = true
            [directory_cache]
            bogus = true
        "#;
        // `[resolver.host."docker.io".mirrors]` as a table is not a mirror list: use the array form.
        let text = text.replace("[resolver.host.\"docker.io\".mirrors]\n", "");
        let (c, mut unknown) = Config::parse(&text, "t").unwrap();
        unknown.sort();
        assert_eq!(c.prefetch_size, 1024);
        assert!(c.noprefetch);
        assert_eq!(c.blob.max_retries, 2);
        assert_eq!(
            c.blob.fetching_timeout_sec, 300,
            "unset keys keep Go's defaults"
        );
        assert_eq!(c.fuse.attr_timeout, 5);
        assert_eq!(c.resolver.host["exam.ple"].mirrors[0].host, "mirror.local");
        assert!(c.resolver.host["exam.ple"].mirrors[0].insecure);
        assert_eq!(
            unknown,
            vec![
                "directory_cache.bogus".to_string(),
                "no_such_key".to_string()
            ]
        );
    }

    #[test]
    fn check_policy_keys() {
        let (c, unknown) = Config::parse("", "t").unwrap();
        assert!(unknown.is_empty());
        assert_eq!(c.check_policy(), CheckPolicy::default());
        let text = "[blob]\nvalid_interval = 0\n[snapshotter]\ncheck_timeout_sec = 2\n";
        let (c, unknown) = Config::parse(text, "t").unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        let p = c.check_policy();
        assert_eq!(
            p.valid_interval,
            std::time::Duration::from_secs(60),
            "0 means Go's default"
        );
        assert_eq!(p.timeout, std::time::Duration::from_secs(2));
        let (c, _) =
            Config::parse("[blob]\nvalid_interval = 10\ncheck_always = true\n", "t").unwrap();
        assert_eq!(c.check_policy().valid_interval, std::time::Duration::ZERO);
    }

    #[test]
    fn missing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope.toml");
        let (c, unknown) = Config::load(&p, true).unwrap();
        assert!(unknown.is_empty());
        assert_eq!(c.max_concurrency, Config::default().max_concurrency);
        assert_eq!(c.directory_cache.max_bytes, 0);
        assert!(Config::load(&p, false).is_err());
    }

    /// The shipped `config.toml` sets only keys that take effect, each to its default.
    #[test]
    fn shipped_config_is_all_known_keys_at_their_defaults() {
        let text = include_str!("../../config/config.toml");
        let (c, unknown, unsupported) = Config::parse_keys(text, "config.toml").unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert!(unsupported.is_empty(), "{unsupported:?}");
        assert_eq!(format!("{c:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn directory_cache_keys() {
        let text = "[directory_cache]\nmax_cache_fds = 3\nmax_bytes = 10737418240\n";
        let (c, unknown) = Config::parse(text, "t").unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(c.directory_cache.max_cache_fds, 3);
        assert_eq!(c.directory_cache.max_bytes, 10 << 30);
        assert_eq!(Config::default().directory_cache.max_bytes, 0);
        assert!(Config::parse("[directory_cache]\nmax_bytes = -1\n", "t").is_err());
    }

    /// Go's key for how long resolved blobs are kept is honoured: it bounds how long a blob
    /// resolved ahead of its mount is held.
    #[test]
    fn resolve_result_entry_ttl_is_a_supported_go_key() {
        let (c, unknown, unsupported) =
            Config::parse_keys("resolve_result_entry_ttl_sec = 30\n", "t").unwrap();
        assert!(unknown.is_empty() && unsupported.is_empty());
        assert_eq!(c.resolve_result_entry_ttl_sec, 30);
        assert_eq!(Config::default().resolve_result_entry_ttl_sec, 120);
    }

    /// A Go config setting keys we do not support still loads; each such key is reported as
    /// unsupported (with a reason), not as unknown, and takes no effect.
    #[test]
    fn unsupported_go_keys_are_reported_not_fatal() {
        let text = r#"
            http_cache_type = "memory"
            filesystem_cache_type = "memory"
            prefetch_timeout_sec = 5
            prefetch_async_size = 1
            debug_address = "127.0.0.1:8235"
            metadata_store = "db"
            [blob]
            chunk_size = 100000
            force_single_range_mode = true
            max_retries = 3
            [directory_cache]
            max_lru_cache_entry = 5
            sync_add = true
            direct = true
            fadv_dontneed = true
            max_cache_fds = 4
            typo = 1
            [fuse]
            entry_timeout = 3
            [snapshotter]
            allow_invalid_mounts_on_restart = true
        "#;
        let (c, unknown, unsupported) = Config::parse_keys(text, "t").unwrap();
        assert_eq!(unknown, ["directory_cache.typo"]);
        let mut keys: Vec<&str> = unsupported.iter().map(|u| u.key.as_str()).collect();
        keys.sort();
        let mut all: Vec<&str> = UNSUPPORTED.iter().map(|(k, _)| *k).collect();
        all.sort();
        assert_eq!(keys, all, "every unsupported key is recognised");
        assert!(unsupported.iter().all(|u| !u.reason.is_empty()));
        assert_eq!(c.filesystem_cache_type, "memory");
        assert_eq!(c.blob.max_retries, 3);
        assert!(c.blob.force_single_range_mode);
        assert_eq!(c.directory_cache.max_cache_fds, 4);
        // `parse` logs the unsupported keys and returns only the unknown ones.
        let (_, unknown) = Config::parse(text, "t").unwrap();
        assert_eq!(unknown, ["directory_cache.typo"]);
    }
}
