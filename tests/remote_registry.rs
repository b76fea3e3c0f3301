//! The registry client and the streamed blob reader against a real `docker-registry` on
//! loopback.

mod remote_support;

use std::sync::Arc;

use anyhow::Result;
use remote_support::{
    fetch, pseudo_random, resolve, write_docker_config, write_htpasswd, Pusher, Registry,
};
use stargz::{
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

/// `data` pushed as the one layer of `repo:v1` to `reg`, opened as a blob.
async fn pushed_blob(reg: &Registry, repo: &str, data: &[u8]) -> Result<Blob> {
    let (layer, _) = Pusher::new(&reg.base())
        .image(repo, "v1", data.to_vec())
        .await?;
    let r: Reference = format!("{}/{repo}:v1", reg.addr).parse()?;
    Ok(Blob::open(&client(quick_retries()), &r, &layer).await?)
}

fn quick_retries() -> BlobConfig {
    BlobConfig {
        min_wait_msec: 1,
        max_wait_msec: 20,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolves_index_and_streams_ranges() -> Result<()> {
    let reg = Registry::start(None)?;
    let data = pseudo_random(123_457, 1);
    let (layer, mdigest) = Pusher::new(&reg.base())
        .image("test/app", "v1", data.clone())
        .await?;
    let c = client(quick_retries());
    let r: Reference = format!("{}/test/app:v1", reg.addr).parse()?;
    let resolved = resolve(&c, &r).await?;
    assert_eq!(
        resolved.digest, mdigest,
        "linux/amd64 picked from the index"
    );
    assert_eq!(resolved.manifest.layers[0].digest, layer);
    let config = c
        .fetch_blob_bytes(&r, &resolved.manifest.config.digest)
        .await?;
    assert!(config.starts_with(b"{\"architecture\""));

    let blob = Blob::open(&c, &r, &layer).await?;
    assert_eq!(blob.size(), data.len() as u64);
    assert_eq!(blob.digest(), layer);
    for off in [0u64, 2500, 5200, 9999] {
        assert_eq!(
            fetch(&blob, off..off + 10).await?,
            data[off as usize..off as usize + 10]
        );
    }
    assert_eq!(fetch(&blob, 700..13_045).await?, data[700..13_045]);
    // The tail, an empty range (no request needed) and the whole blob.
    let len = data.len() as u64;
    assert_eq!(fetch(&blob, len - 7..len).await?, data[data.len() - 7..]);
    assert!(fetch(&blob, len..len).await?.is_empty());
    assert!(fetch(&blob, 0..len).await? == data);
    // Random ranges.
    let mut x = 7u64;
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % len;
        let end = (off + ((x >> 8) % 5000) + 1).min(len);
        assert_eq!(
            fetch(&blob, off..end).await?,
            data[off as usize..end as usize]
        );
    }
    // Past the end, and backwards: refused before any request.
    for bad in [0..len + 1, len + 1..len + 2] {
        assert!(matches!(
            fetch(&blob, bad).await,
            Err(RemoteError::OutOfRange { .. })
        ));
    }
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 10..5;
    assert!(matches!(
        fetch(&blob, backwards).await,
        Err(RemoteError::OutOfRange { .. })
    ));
    Ok(())
}

/// `docker-registry` answers a request naming several ranges with their parts: the bytes come
/// in one request, in order, and the blob keeps asking that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_ranges_come_from_the_registry_in_one_request() -> Result<()> {
    let reg = Registry::start(None)?;
    let data = pseudo_random(200_003, 3);
    let blob = pushed_blob(&reg, "test/multi", &data).await?;
    assert!(blob.multi_range());
    let len = data.len() as u64;
    let ranges = [
        0..1,
        17..4_113,
        4_200..90_000,
        150_000..150_001,
        len - 9..len,
    ];
    let mut sink = Vec::new();
    let n = blob.fetch_ranges_into(&ranges, &mut sink).await?;
    let want: Vec<u8> = ranges
        .iter()
        .flat_map(|r| data[r.start as usize..r.end as usize].iter().copied())
        .collect();
    assert_eq!(n, want.len() as u64);
    assert!(sink == want, "the ranges' bytes, in order");
    assert!(
        blob.multi_range(),
        "the registry's multipart answer was read as such"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_verified_into_streams_the_whole_blob() -> Result<()> {
    let reg = Registry::start(None)?;
    let data = pseudo_random(300_001, 2);
    let blob = pushed_blob(&reg, "x/y", &data).await?;
    let mut sink = Vec::new();
    assert_eq!(blob.fetch_verified_into(&mut sink).await?, 300_001);
    assert!(sink == data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_adapter_streams_from_plain_threads() -> Result<()> {
    let reg = Registry::start(None)?;
    let data = pseudo_random(50_000, 3);
    let blob = pushed_blob(&reg, "s/a", &data).await?;
    let sync = blob.sync(tokio::runtime::Handle::current());
    let data = Arc::new(data);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let sync = sync.clone();
            let data = data.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let off = (i * 977 + t * 3001) % 49_000;
                    let mut b = Vec::new();
                    let n = sync.fetch_range_into(off..off + 900, &mut b).unwrap();
                    assert_eq!(n, 900);
                    assert_eq!(b, data[off as usize..off as usize + 900]);
                }
                sync.check().unwrap();
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
        blob: quick_retries(),
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
    let resolved = resolve(&c, &r).await?;
    assert_eq!(resolved.manifest.layers[0].digest, layer);
    let blob = Blob::open(&c, &r, &layer).await?;
    assert_eq!(fetch(&blob, 0..4000).await?, data);
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
    let err = resolve(&client(quick_retries()), &r).await.unwrap_err();
    assert!(matches!(err, RemoteError::Unauthorized { .. }), "{err}");

    let docker_dir = tmp.path().join("docker");
    std::fs::create_dir(&docker_dir)?;
    write_docker_config(&docker_dir, &reg.addr, "alice", password)?;
    let c = RegistryClient::new(ClientConfig {
        blob: quick_retries(),
        docker_config_dir: Some(docker_dir.clone()),
        ..Default::default()
    })?;
    let resolved = resolve(&c, &r).await?;
    let blob = Blob::open(&c, &r, &resolved.manifest.layers[0].digest).await?;
    assert_eq!(blob.digest(), layer);
    assert_eq!(fetch(&blob, 0..20_000).await?, data);

    // Wrong password: the error says so without echoing it.
    write_docker_config(&docker_dir, &reg.addr, "alice", "wrong-Secret-77")?;
    let c = RegistryClient::new(ClientConfig {
        docker_config_dir: Some(docker_dir),
        ..Default::default()
    })?;
    let err = resolve(&c, &r).await.unwrap_err().to_string();
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
            ..quick_retries()
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
    let blob = Blob::open(&c, &r, &layer).await?;
    assert_eq!(fetch(&blob, 0..10_000).await?, data[..10_000]);
    drop(mirror);
    assert_eq!(fetch(&blob, 30_000..40_000).await?, data[30_000..40_000]);
    Ok(())
}
