//! The registry client and blob reader against a real `docker-registry` on loopback.

mod remote_support;

use std::sync::Arc;

use anyhow::Result;
use remote_support::{
    pseudo_random, verify_cache_dir, write_docker_config, write_htpasswd, Pusher, Registry,
};
use stargz::cache::{BlobCache, DirectoryCache, MemoryCache};
use stargz::remote::{
    Blob, BlobConfig, ClientConfig, HostConfig, MirrorConfig, Reference, RegistryClient,
    RemoteError,
};

fn client(blob: BlobConfig) -> RegistryClient {
    let cfg = ClientConfig {
        blob,
        docker_config_dir: Some("/nonexistent-docker-config".into()),
        ..Default::default()
    };
    RegistryClient::new(cfg).unwrap()
}

fn small_chunks() -> BlobConfig {
    BlobConfig {
        chunk_size: 1000,
        min_wait_msec: 1,
        max_wait_msec: 20,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolves_index_and_reads_ranges_through_dir_cache() -> Result<()> {
    let reg = Registry::start(None)?;
    let data = pseudo_random(123_457, 1);
    let (layer, mdigest) = Pusher::new(&reg.base())
        .image("test/app", "v1", data.clone())
        .await?;
    let c = client(small_chunks());
    let r: Reference = format!("{}/test/app:v1", reg.addr).parse()?;
    let resolved = c.resolve(&r).await?;
    assert_eq!(
        resolved.digest, mdigest,
        "linux/amd64 picked from the index"
    );
    assert_eq!(resolved.manifest.layers[0].digest, layer);
    let config = c
        .fetch_blob_bytes(&r, &resolved.manifest.config.digest)
        .await?;
    assert!(config.starts_with(b"{\"architecture\""));

    let dir = tempfile::tempdir()?;
    let cache = Arc::new(DirectoryCache::open(dir.path(), Default::default())?);
    let blob = Blob::open(&c, &resolved.reference, &layer, cache.clone()).await?;
    assert_eq!(blob.size(), data.len() as u64);
    // Leave holes so the next read needs several separate ranges (a multi-range request).
    let mut buf = vec![0u8; 10];
    for off in [0u64, 2500, 5200, 9999] {
        assert_eq!(blob.read_at(&mut buf, off).await?, 10);
        assert_eq!(buf, data[off as usize..off as usize + 10]);
    }
    let mut big = vec![0u8; 12_345];
    assert_eq!(blob.read_at(&mut big, 700).await?, big.len());
    assert_eq!(big, data[700..700 + big.len()]);
    // Tail and past-the-end reads.
    let mut tail = vec![0u8; 100];
    assert_eq!(blob.read_at(&mut tail, data.len() as u64 - 7).await?, 7);
    assert_eq!(&tail[..7], &data[data.len() - 7..]);
    assert_eq!(blob.read_at(&mut tail, data.len() as u64).await?, 0);
    // Random reads.
    let mut x = 7u64;
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % data.len() as u64;
        let len = ((x >> 8) % 5000) as usize + 1;
        let mut b = vec![0u8; len];
        let n = blob.read_at(&mut b, off).await?;
        let want = &data[off as usize..(off as usize + len).min(data.len())];
        assert_eq!(&b[..n], want);
    }
    let hex = layer.trim_start_matches("sha256:");
    let entries = verify_cache_dir(dir.path(), &data, hex)?;
    assert!(entries > 0);
    assert_eq!(
        cache.usage(),
        entries as u64 * 1000
            - (1000 - data.len() as u64 % 1000)
                * u64::from(blob.is_cached(data.len() as u64 - 1..data.len() as u64))
    );
    assert!(blob.free_cache()? > 0);
    assert_eq!(cache.usage(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fetch_range_into_and_single_range_mode() -> Result<()> {
    let reg = Registry::start(None)?;
    let data = pseudo_random(300_001, 2);
    let (layer, _) = Pusher::new(&reg.base())
        .image("x/y", "t", data.clone())
        .await?;
    let r: Reference = format!("{}/x/y:t", reg.addr).parse()?;
    for single in [false, true] {
        let c = client(BlobConfig {
            force_single_range_mode: single,
            ..small_chunks()
        });
        let cache = Arc::new(MemoryCache::new());
        let blob = Blob::open(&c, &r, &layer, cache.clone()).await?;
        blob.prefetch(&[0..5000, 10_000..10_001, 250_000..300_001])
            .await?;
        assert!(
            blob.is_cached(0..5000)
                && blob.is_cached(10_000..10_001)
                && blob.is_cached(250_000..300_001)
        );
        assert!(!blob.is_cached(5000..6000));
        assert_eq!(cache.usage(), 5000 + 1000 + 50_001);
        let mut sink = Vec::new();
        let n = blob.fetch_range_into(123..200_123, &mut sink).await?;
        assert_eq!(n, 200_000);
        assert_eq!(sink, data[123..200_123]);
        assert_eq!(
            cache.usage(),
            5000 + 1000 + 50_001,
            "fetch_range_into does not cache"
        );
        assert!(matches!(
            blob.fetch_range_into(0..300_002, &mut sink).await,
            Err(RemoteError::OutOfRange { .. })
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_adapter_reads_from_plain_threads() -> Result<()> {
    let reg = Registry::start(None)?;
    let data = pseudo_random(50_000, 3);
    let (layer, _) = Pusher::new(&reg.base())
        .image("s/a", "t", data.clone())
        .await?;
    let r: Reference = format!("{}/s/a:t", reg.addr).parse()?;
    let blob = Blob::open(
        &client(small_chunks()),
        &r,
        &layer,
        Arc::new(MemoryCache::new()),
    )
    .await?;
    let sync = blob.sync(tokio::runtime::Handle::current());
    let data = Arc::new(data);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let sync = sync.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let off = (i * 977 + t * 3001) % 49_000;
                    let mut b = [0u8; 900];
                    let n = stargz::estargz::ReadAt::read_at(&sync, &mut b, off).unwrap();
                    assert_eq!(&b[..n], &data[off as usize..off as usize + n]);
                }
            })
        })
        .collect();
    for t in threads {
        tokio::task::spawn_blocking(move || t.join())
            .await?
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_tried_before_the_origin() -> Result<()> {
    let reg = Registry::start(None)?;
    let data = pseudo_random(4000, 4);
    let (layer, _) = Pusher::new(&reg.base())
        .image("m/i", "t", data.clone())
        .await?;
    // The origin is a closed port: everything must come from the mirror. A dead first mirror
    // is skipped.
    let dead = remote_support::free_port()?;
    let origin = format!("127.0.0.1:{}", remote_support::free_port()?);
    let mut cfg = ClientConfig {
        blob: small_chunks(),
        docker_config_dir: Some("/nonexistent".into()),
        ..Default::default()
    };
    cfg.blob.max_retries = 0;
    cfg.resolver.host.insert(
        origin.clone(),
        HostConfig {
            mirrors: vec![
                MirrorConfig {
                    host: format!("127.0.0.1:{dead}"),
                    insecure: true,
                    ..Default::default()
                },
                MirrorConfig {
                    host: reg.addr.clone(),
                    insecure: true,
                    request_timeout_sec: 5,
                    ..Default::default()
                },
            ],
        },
    );
    let c = RegistryClient::new(cfg)?;
    let r: Reference = format!("{origin}/m/i:t").parse()?;
    let resolved = c.resolve(&r).await?;
    assert_eq!(resolved.manifest.layers[0].digest, layer);
    let blob = Blob::open(&c, &r, &layer, Arc::new(MemoryCache::new())).await?;
    let mut b = vec![0; 4000];
    assert_eq!(blob.read_at(&mut b, 0).await?, 4000);
    assert_eq!(b, data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_docker_config() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let password = "b4sic-P4ss-9f2e";
    let htpasswd = write_htpasswd(tmp.path(), "alice", password)?;
    let reg = Registry::start(Some(&htpasswd))?;
    let mut pusher = Pusher::new(&reg.base());
    pusher.basic = Some(("alice".into(), password.into()));
    let data = pseudo_random(20_000, 5);
    let (layer, _) = pusher.image("private/img", "v1", data.clone()).await?;
    let r: Reference = format!("{}/private/img:v1", reg.addr).parse()?;

    // Without credentials: a clear authorization error.
    let err = client(small_chunks()).resolve(&r).await.unwrap_err();
    assert!(matches!(err, RemoteError::Unauthorized { .. }), "{err}");

    let docker_dir = tmp.path().join("docker");
    std::fs::create_dir(&docker_dir)?;
    write_docker_config(&docker_dir, &reg.addr, "alice", password)?;
    let c = RegistryClient::new(ClientConfig {
        blob: small_chunks(),
        docker_config_dir: Some(docker_dir.clone()),
        ..Default::default()
    })?;
    let resolved = c.resolve(&r).await?;
    let blob = Blob::open(
        &c,
        &r,
        &resolved.manifest.layers[0].digest,
        Arc::new(MemoryCache::new()),
    )
    .await?;
    assert_eq!(blob.digest(), layer);
    let mut b = vec![0; 20_000];
    assert_eq!(blob.read_at(&mut b, 0).await?, 20_000);
    assert_eq!(b, data);

    // Wrong password: the error says so without echoing it.
    write_docker_config(&docker_dir, &reg.addr, "alice", "wrong-Secret-77")?;
    let c = RegistryClient::new(ClientConfig {
        docker_config_dir: Some(docker_dir),
        ..Default::default()
    })?;
    let err = c.resolve(&r).await.unwrap_err().to_string();
    assert!(
        !err.contains("wrong-Secret-77") && !err.contains(password),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_dies_mid_use_falls_back_to_the_origin() -> Result<()> {
    use remote_support::{Action, Fault, Proxy};
    let reg = Registry::start(None)?;
    let data = pseudo_random(50_000, 6);
    let (layer, _) = Pusher::new(&reg.base())
        .image("m/d", "t", data.clone())
        .await?;
    let mirror = Proxy::start(
        &reg.addr,
        Arc::new(|_: &remote_support::ProxyRequest| Action::Forward(Fault::None)),
    )
    .await?;
    let mut cfg = ClientConfig {
        blob: BlobConfig {
            max_retries: 1,
            ..small_chunks()
        },
        docker_config_dir: Some("/nonexistent".into()),
        ..Default::default()
    };
    cfg.resolver.host.insert(
        reg.addr.clone(),
        HostConfig {
            mirrors: vec![MirrorConfig {
                host: mirror.addr.clone(),
                insecure: true,
                ..Default::default()
            }],
        },
    );
    let c = RegistryClient::new(cfg)?;
    let r: Reference = format!("{}/m/d:t", reg.addr).parse()?;
    let blob = Blob::open(&c, &r, &layer, Arc::new(MemoryCache::new())).await?;
    let mut b = vec![0u8; 10_000];
    assert_eq!(blob.read_at(&mut b, 0).await?, 10_000);
    drop(mirror);
    assert_eq!(blob.read_at(&mut b, 30_000).await?, 10_000);
    assert_eq!(b, data[30_000..40_000]);
    Ok(())
}
