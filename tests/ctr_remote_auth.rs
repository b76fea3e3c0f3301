//! `rpull`'s registry side ([`RemoteFetcher`] over `remote::RegistryClient`) against a real
//! `docker-registry`: `--user` and docker-config credentials for a basic-auth registry, and a
//! whole-blob stream that ends in an error when the bytes do not match the digest.

mod remote_support;

use anyhow::{ensure, Result};
use futures_util::StreamExt;
use remote_support::{
    pseudo_random, write_docker_config, write_htpasswd, Action, Fault, Proxy, Pusher, Registry,
};
use stargz::CtrError as Error;
use stargz::Reference;
use stargz::{Descriptor, Index, Manifest};
use stargz::{Fetcher, RegistryOptions, RemoteFetcher};

const USER: &str = "dave";
const PASSWORD: &str = "ctr-Basic-Pa55-77f1";

/// Walks the image like `rpull` does: index → linux/amd64 manifest → config → layer stream.
/// Returns the layer bytes.
async fn pull_layer(fetcher: &RemoteFetcher) -> Result<Vec<u8>, Error> {
    let (top, bytes) = fetcher.resolve().await?;
    let index: Index = serde_json::from_slice(&bytes)?;
    assert!(
        top.media_type.ends_with("index.v1+json"),
        "{}",
        top.media_type
    );
    let chosen = index
        .manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.architecture == "amd64")
        })
        .cloned()
        .ok_or_else(|| Error::NotFound("amd64".into()))?;
    let manifest: Manifest = serde_json::from_slice(&fetcher.fetch_small(&chosen).await?)?;
    let config = fetcher.fetch_small(&manifest.config).await?;
    assert!(String::from_utf8_lossy(&config).contains("amd64"));
    let layer: &Descriptor = &manifest.layers[0];
    let mut stream = fetcher.fetch_stream(layer).await?;
    let mut out = Vec::new();
    while let Some(piece) = stream.next().await {
        out.extend_from_slice(&piece?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_flag_and_docker_config_authenticate_rpull() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let reg = Registry::start(Some(&write_htpasswd(tmp.path(), USER, PASSWORD)?))?;
    let mut pusher = Pusher::new(&reg.base());
    pusher.basic = Some((USER.into(), PASSWORD.into()));
    let data = pseudo_random(3 << 20, 5);
    pusher.image("auth/img", "v1", data.clone()).await?;
    let reference: Reference = format!("{}/auth/img:v1", reg.addr).parse()?;

    // No credentials anywhere: refused.
    let empty = tempfile::tempdir()?;
    std::env::set_var("DOCKER_CONFIG", empty.path());
    let anon = RemoteFetcher::new(reference.clone(), &RegistryOptions::default())?;
    let err = pull_layer(&anon)
        .await
        .expect_err("anonymous pull of a protected image");
    ensure!(
        !err.to_string().contains(PASSWORD),
        "password in error: {err}"
    );

    // `--user USER:PASS`.
    let opts = RegistryOptions {
        user: Some(format!("{USER}:{PASSWORD}")),
        ..Default::default()
    };
    let with_user = RemoteFetcher::new(reference.clone(), &opts)?;
    ensure!(
        pull_layer(&with_user).await? == data,
        "layer bytes differ (--user)"
    );

    // `$DOCKER_CONFIG/config.json` `auths`, as `docker login` writes it.
    let docker = tempfile::tempdir()?;
    write_docker_config(docker.path(), &reg.addr, USER, PASSWORD)?;
    std::env::set_var("DOCKER_CONFIG", docker.path());
    let from_config = RemoteFetcher::new(reference, &RegistryOptions::default())?;
    ensure!(
        pull_layer(&from_config).await? == data,
        "layer bytes differ (docker config)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_layer_stream_ends_in_digest_error() -> Result<()> {
    let reg = Registry::start(None)?;
    let data = pseudo_random(1 << 20, 9);
    let (layer_digest, _) = Pusher::new(&reg.base())
        .image("bad/img", "v1", data)
        .await?;
    let corrupt_path = format!("/blobs/{layer_digest}");
    let front = Proxy::start(
        &reg.addr,
        std::sync::Arc::new(move |r: &remote_support::ProxyRequest| {
            Action::Forward(if r.path.ends_with(&corrupt_path) {
                Fault::Corrupt(0.5)
            } else {
                Fault::None
            })
        }),
    )
    .await?;
    let reference = format!("{}/bad/img:v1", front.addr).parse()?;
    let fetcher = RemoteFetcher::new(reference, &RegistryOptions::default())?;
    match pull_layer(&fetcher).await {
        Err(Error::Remote(stargz::RemoteError::DigestMismatch { expected, .. })) => {
            ensure!(expected == layer_digest, "mismatch reported for {expected}");
        }
        other => anyhow::bail!("expected a digest mismatch, got {other:?}"),
    }
    Ok(())
}
