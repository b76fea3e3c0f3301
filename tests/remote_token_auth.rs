//! Bearer-token auth: a loopback front demands tokens from its own token endpoint (which wants
//! basic credentials) before forwarding to the real `docker-registry`. Credentials come from a
//! docker config through a credential helper. All logs are captured at TRACE and grepped for the
//! password, its base64 form and every token issued.

mod remote_support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Result;
use base64::Engine;
use remote_support::{
    fetch, pseudo_random, resolve, Action, Fault, LogCapture, Proxy, ProxyRequest, Pusher, Registry,
};
use stargz::{
    Blob, BlobConfig, ClientConfig, DockerConfig, Reference, RegistryClient, RemoteError,
};

const USER: &str = "carol";
const PASSWORD: &str = "t0ken-Realm-Pa55-e1c9";

#[derive(Default)]
struct TokenState {
    issued: Vec<String>,
    valid: HashSet<String>,
    token_requests: usize,
}

fn policy(realm: Arc<OnceLock<String>>, state: Arc<Mutex<TokenState>>) -> remote_support::Policy {
    Arc::new(move |r: &ProxyRequest| {
        let mut st = state.lock().unwrap();
        if r.path.starts_with("/token") {
            st.token_requests += 1;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
            );
            if r.header("authorization") != Some(want.as_str())
                || !r.path.contains("scope=repository%3Atok%2Fimg%3Apull")
            {
                return Action::Respond {
                    status: 401,
                    headers: vec![],
                    body: b"{}".to_vec(),
                };
            }
            let token = format!(
                "tk{}x{:016x}",
                st.issued.len(),
                rand_u64(st.issued.len() as u64)
            );
            st.issued.push(token.clone());
            st.valid.insert(token.clone());
            return Action::Respond {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body: serde_json::to_vec(&serde_json::json!({"token": token, "expires_in": 3600}))
                    .unwrap(),
            };
        }
        let ok = r
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| st.valid.contains(t));
        if !ok {
            return Action::Respond {
                status: 401,
                headers: vec![(
                    "www-authenticate".into(),
                    format!(
                        r#"Bearer realm="{}",service="test-registry",scope="repository:tok/img:pull""#,
                        realm.get().unwrap()
                    ),
                )],
                body: b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}".to_vec(),
            };
        }
        Action::Forward(Fault::None)
    })
}

fn rand_u64(seed: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (t ^ seed.wrapping_mul(0x9e3779b97f4a7c15)).wrapping_mul(0xbf58476d1ce4e5b9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_refresh_and_no_secret_in_logs() -> Result<()> {
    let logs = LogCapture::install();
    let reg = Registry::start(None)?;
    let data = pseudo_random(30_000, 21);
    let (layer, _) = Pusher::new(&reg.base())
        .image("tok/img", "v1", data.clone())
        .await?;

    let realm = Arc::new(OnceLock::new());
    let state = Arc::new(Mutex::new(TokenState::default()));
    let front = Proxy::start(&reg.addr, policy(realm.clone(), state.clone())).await?;
    realm.set(format!("http://{}/token", front.addr)).unwrap();

    // Credentials through a credential helper named in the docker config.
    let tmp = tempfile::tempdir()?;
    let helper = tmp.path().join("docker-credential-testhelper");
    std::fs::write(
        &helper,
        format!("#!/bin/sh\nread server\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}'\n"),
    )?;
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_vec(
            &serde_json::json!({"credHelpers": {front.addr.clone(): "testhelper"}}),
        )?,
    )?;
    let docker = DockerConfig::in_dir(tmp.path()).with_helper_path(tmp.path());
    let cfg = ClientConfig {
        blob: BlobConfig {
            min_wait_msec: 1,
            max_wait_msec: 10,
            ..Default::default()
        },
        ..Default::default()
    };
    let client = RegistryClient::with_docker_config(cfg.clone(), docker)?;
    let r: Reference = format!("{}/tok/img:v1", front.addr).parse()?;
    let resolved = resolve(&client, &r).await?;
    assert_eq!(resolved.manifest.layers[0].digest, layer);
    let blob = Blob::open(&client, &r, &layer).await?;
    assert_eq!(fetch(&blob, 1000..13_000).await?, data[1000..13_000]);
    let first_tokens = state.lock().unwrap().token_requests;
    assert_eq!(first_tokens, 1, "the token is cached across requests");

    // The registry revokes every token: the next 401 makes the client fetch a new one.
    state.lock().unwrap().valid.clear();
    assert_eq!(fetch(&blob, 20_000..25_000).await?, data[20_000..25_000]);
    assert_eq!(state.lock().unwrap().token_requests, 2);

    // Wrong credentials: a clear error that names neither the password nor a token.
    let bad_dir = tempfile::tempdir()?;
    remote_support::write_docker_config(bad_dir.path(), &front.addr, USER, "wrong-Pw-31337")?;
    let bad =
        RegistryClient::with_docker_config(cfg.clone(), DockerConfig::in_dir(bad_dir.path()))?;
    let err = resolve(&bad, &r).await.unwrap_err();
    assert!(matches!(err, RemoteError::Unauthorized { .. }), "{err}");
    let err_text = format!("{err} / {err:?}");
    // No credentials at all: also a clear error.
    let none =
        RegistryClient::with_docker_config(cfg, DockerConfig::in_dir(tmp.path().join("none")))?;
    let err2 = resolve(&none, &r).await.unwrap_err();
    assert!(matches!(err2, RemoteError::Unauthorized { .. }), "{err2}");

    let text = format!("{}\n{err_text}\n{err2} / {err2:?}", logs.text());
    assert!(
        text.contains("registry auth refreshed"),
        "logs were captured"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let bad_b64 =
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:wrong-Pw-31337"));
    let mut secrets = vec![PASSWORD.to_owned(), b64, "wrong-Pw-31337".into(), bad_b64];
    secrets.extend(state.lock().unwrap().issued.clone());
    assert!(secrets.len() >= 6);
    for s in &secrets {
        assert!(
            !text.contains(s.as_str()),
            "secret {s:?} leaked into logs/errors"
        );
    }
    Ok(())
}
