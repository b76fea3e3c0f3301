//! The registry client against hostile servers on loopback: endless token, error, manifest and
//! range bodies, registries that never answer, and redirects that would carry credentials or
//! mirror headers to another origin. Each case asserts a clear error, a bounded number of bytes
//! read, and a bounded time.

mod remote_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use remote_support::{resolve, Hostile, ProxyRequest, Reply};
use stargz::{
    Blob, BlobConfig, ClientConfig, Credentials, HostConfig, MirrorConfig, Reference,
    RegistryClient, RemoteError, Secret,
};

const LAYER: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
/// What the kernel's loopback socket buffers may hold after the client hung up; far below the
/// gigabyte the servers offer.
const MAX_BUFFERED: u64 = 64 << 20;

fn blob_config() -> BlobConfig {
    BlobConfig {
        max_retries: 2,
        min_wait_msec: 5,
        max_wait_msec: 20,
        stall_timeout_msec: 300,
        fetching_timeout_sec: 2,
        ..Default::default()
    }
}

fn client_with(blob: BlobConfig) -> RegistryClient {
    RegistryClient::new(ClientConfig {
        blob,
        docker_config_dir: Some("/nonexistent".into()),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap()
}

fn h(k: &str, v: &str) -> (String, String) {
    (k.to_owned(), v.to_owned())
}

fn is_probe(r: &ProxyRequest) -> bool {
    r.header("range") == Some("bytes=0-1")
}

/// Answers the size probe of a 1000-byte blob.
fn probe_reply() -> Reply {
    Reply::Fixed {
        status: 206,
        headers: vec![h("content-range", "bytes 0-1/1000")],
        body: b"xx".to_vec(),
    }
}

/// Waits until the server stops writing (the client hung up), then returns what it wrote.
async fn settled(server: &Hostile) -> u64 {
    let mut last = server.sent();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = server.sent();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_token_body_is_refused_promptly() -> Result<()> {
    let token = Hostile::start(Arc::new(|_: &ProxyRequest| Reply::Endless {
        status: 200,
        headers: vec![h("content-type", "application/json")],
        prefix: Vec::new(),
        piece: vec![b'{'; 64 << 10],
        cap: 1 << 30,
    }))
    .await?;
    let realm = format!("http://{}/token", token.addr);
    let reg = Hostile::start(Arc::new(move |_: &ProxyRequest| Reply::Fixed {
        status: 401,
        headers: vec![h(
            "www-authenticate",
            &format!("Bearer realm=\"{realm}\",service=\"reg\""),
        )],
        body: Vec::new(),
    }))
    .await?;
    let r: Reference = format!("{}/a/b:t", reg.addr).parse()?;
    let t = Instant::now();
    let err = resolve(&client_with(blob_config()), &r).await.unwrap_err();
    assert!(
        matches!(&err, RemoteError::BodyTooLarge { limit, .. } if *limit == 1 << 20),
        "{err}"
    );
    assert!(err.to_string().contains("token response"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let sent = settled(&token).await;
    assert!(sent < MAX_BUFFERED, "token server wrote {sent} bytes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_error_bodies_give_clipped_messages() -> Result<()> {
    let srv = Hostile::start(Arc::new(|r: &ProxyRequest| Reply::Endless {
        status: if r.path.contains("/five/") { 503 } else { 404 },
        headers: Vec::new(),
        prefix: b"oops\n".to_vec(),
        piece: vec![b'Z'; 64 << 10],
        cap: 1 << 30,
    }))
    .await?;
    let client = client_with(blob_config());
    for (repo, want) in [("a/five", 503u16), ("a/four", 404)] {
        let r: Reference = format!("{}/{repo}:t", srv.addr).parse()?;
        let t = Instant::now();
        let err = client.fetch_manifest(&r, "t").await.unwrap_err();
        let RemoteError::Status { status, detail, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(*status, want);
        assert!(
            detail.starts_with("oops ZZZ") && detail.contains("more bytes)"),
            "{detail}"
        );
        assert!(err.to_string().len() < 1024, "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
    }
    // 503 is retried (3 requests), 404 is not.
    assert_eq!(srv.requests().len(), 4);
    let sent = settled(&srv).await;
    assert!(sent < 4 * MAX_BUFFERED, "server wrote {sent} bytes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_manifest_is_refused() -> Result<()> {
    const LIMIT: u64 = 4 << 20;
    let head = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let srv = Hostile::start(Arc::new(move |r: &ProxyRequest| {
        let headers = vec![h(
            "content-type",
            "application/vnd.oci.image.manifest.v1+json",
        )];
        if r.path.ends_with("/big") {
            // No Content-Length: only the streamed count stops it.
            return Reply::Endless {
                status: 200,
                headers,
                prefix: head.to_vec(),
                piece: vec![b' '; 64 << 10],
                cap: 2 * LIMIT,
            };
        }
        // Valid JSON padded with spaces to exactly the limit.
        let mut body = head.to_vec();
        body.resize(LIMIT as usize, b' ');
        Reply::Fixed {
            status: 200,
            headers,
            body,
        }
    }))
    .await?;
    let client = client_with(blob_config());
    let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
    let ok = client.fetch_manifest(&r, "fits").await?;
    assert_eq!(ok.raw.len() as u64, LIMIT);
    let err = client.fetch_manifest(&r, "big").await.unwrap_err();
    assert!(
        matches!(&err, RemoteError::BodyTooLarge { limit: LIMIT, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("manifest"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_registry_fails_within_the_deadline() -> Result<()> {
    let srv = Hostile::start(Arc::new(|_: &ProxyRequest| Reply::Silent)).await?;
    let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
    let cfg = blob_config();
    let client = client_with(cfg.clone());

    // No headers ever: each attempt waits one stall timeout, 3 attempts, tiny backoffs.
    let bound = cfg.retry_budget(cfg.stall_timeout());
    let t = Instant::now();
    let err = Blob::open(&client, &r, LAYER).await.err().unwrap();
    assert!(matches!(err, RemoteError::Stalled(_)), "{err}");
    assert!(
        t.elapsed() < bound + Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(srv.requests().len(), 3);

    let t = Instant::now();
    let err = resolve(&client, &r).await.unwrap_err();
    assert!(matches!(err, RemoteError::Stalled(_)), "{err}");
    assert!(
        t.elapsed() < bound + Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_checks_of_a_silent_blob_end_within_their_deadlines() -> Result<()> {
    // The probe is answered, then the server goes silent.
    let srv = Hostile::start(Arc::new(|r: &ProxyRequest| {
        if is_probe(r) {
            probe_reply()
        } else {
            Reply::Silent
        }
    }))
    .await?;
    let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
    // Nested retries (3 requests inside each of 3 fetch attempts) would wait 9 stalls of
    // 0.4 s = 3.6 s; the fetch deadline (3 fetch timeouts of 1 s + backoffs) cuts them first.
    let cfg = BlobConfig {
        stall_timeout_msec: 400,
        fetching_timeout_sec: 1,
        ..blob_config()
    };
    let client = client_with(cfg.clone());
    let blob = Blob::open(&client, &r, LAYER).await?;
    assert_eq!(blob.size(), 1000);

    let deadline = cfg.fetch_deadline();
    let t = Instant::now();
    let mut sink = Vec::new();
    let err = blob.fetch_range_into(0..100, &mut sink).await.unwrap_err();
    let took = t.elapsed();
    assert!(matches!(err, RemoteError::TimedOut { .. }), "{err}");
    assert!(
        took >= deadline && took < deadline + Duration::from_secs(1),
        "took {took:?}, deadline {deadline:?}"
    );
    assert!(sink.is_empty());
    let io = std::io::Error::from(err);
    assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);

    // The same bound through the blocking adapter the daemon's FUSE threads use.
    let sync = blob.sync(tokio::runtime::Handle::current());
    let t = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let err = sync.fetch_range_into(0..100, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, RemoteError::TimedOut { .. }), "{err}");
        t.elapsed()
    })
    .await?;
    assert!(t < deadline + Duration::from_secs(1), "took {t:?}");

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_a_blob_whose_registry_went_silent_is_bounded() -> Result<()> {
    let probes = Arc::new(AtomicUsize::new(0));
    let p2 = probes.clone();
    let srv = Hostile::start(Arc::new(move |r: &ProxyRequest| {
        if is_probe(r) && p2.fetch_add(1, Ordering::SeqCst) == 0 {
            probe_reply()
        } else {
            Reply::Silent
        }
    }))
    .await?;
    let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
    let cfg = BlobConfig {
        stall_timeout_msec: 60_000,
        ..blob_config()
    };
    // The header wait alone (60 s) would outlast the check: the request timeout (2 s) bounds it.
    let client = RegistryClient::new(ClientConfig {
        blob: cfg,
        docker_config_dir: Some("/nonexistent".into()),
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    })?;
    let blob = Blob::open(&client, &r, LAYER).await?;
    let t = Instant::now();
    let err = blob.check().await.unwrap_err();
    assert!(
        matches!(err, RemoteError::TimedOut { .. } | RemoteError::Http { .. }),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    Ok(())
}

/// A server that answers a range with an endless body: exactly the asked bytes are read and
/// the connection is dropped, whatever it declares (206 from the right offset, or 200 with the
/// whole blob, skipped up to the start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_response_longer_than_asked_is_cut_off() -> Result<()> {
    for (status, headers) in [
        (206, vec![h("content-range", "bytes 500-999/1000")]),
        (200, vec![]),
    ] {
        let srv = Hostile::start(Arc::new(move |r: &ProxyRequest| {
            if is_probe(r) {
                return probe_reply();
            }
            Reply::Endless {
                status,
                headers: headers.clone(),
                prefix: Vec::new(),
                piece: vec![b'x'; 64 << 10],
                cap: 1 << 30,
            }
        }))
        .await?;
        let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
        let blob = Blob::open(&client_with(blob_config()), &r, LAYER).await?;
        let t = Instant::now();
        let mut sink = Vec::new();
        assert_eq!(blob.fetch_range_into(500..600, &mut sink).await?, 100);
        assert_eq!(sink, [b'x'; 100]);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        let sent = settled(&srv).await;
        assert!(sent < MAX_BUFFERED, "{status}: server wrote {sent} bytes");
    }
    Ok(())
}

/// 206 answers that do not say they start where asked (another offset, another blob size, a
/// multipart body that is not one) are refused, each attempt, with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_response_from_elsewhere_is_refused() -> Result<()> {
    for (headers, want) in [
        (
            vec![h("content-range", "bytes 550-999/1000")],
            "skipped from byte 500 to 550",
        ),
        (
            vec![h("content-range", "bytes 500-999/2000")],
            "changed size from 1000 to 2000",
        ),
        (
            vec![h("content-type", "multipart/byteranges; boundary=B")],
            "part head is too long",
        ),
    ] {
        let srv = Hostile::start(Arc::new(move |r: &ProxyRequest| {
            if is_probe(r) {
                return probe_reply();
            }
            Reply::Endless {
                status: 206,
                headers: headers.clone(),
                prefix: Vec::new(),
                piece: vec![b'y'; 64 << 10],
                cap: 1 << 30,
            }
        }))
        .await?;
        let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
        let blob = Blob::open(&client_with(blob_config()), &r, LAYER).await?;
        let t = Instant::now();
        let mut sink = Vec::new();
        let err = blob
            .fetch_range_into(500..600, &mut sink)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert!(sink.is_empty(), "no byte of a refused answer is passed on");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        let sent = settled(&srv).await;
        assert!(sent < MAX_BUFFERED, "server wrote {sent} bytes");
    }
    Ok(())
}

/// A 200 (the whole blob instead of the range) of another size than the probe found is not
/// this blob: refused before any byte reaches the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_body_of_another_size_is_refused() -> Result<()> {
    let srv = Hostile::start(Arc::new(|r: &ProxyRequest| {
        if is_probe(r) {
            return probe_reply();
        }
        Reply::Fixed {
            status: 200,
            headers: vec![],
            body: vec![b'w'; 2000],
        }
    }))
    .await?;
    let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
    let blob = Blob::open(&client_with(blob_config()), &r, LAYER).await?;
    let mut sink = Vec::new();
    let err = blob.fetch_range_into(0..100, &mut sink).await.unwrap_err();
    assert!(
        matches!(
            err,
            RemoteError::BlobChanged {
                was: 1000,
                now: 2000,
                ..
            }
        ),
        "{err}"
    );
    assert!(sink.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_another_origin_carry_no_credentials_or_mirror_headers() -> Result<()> {
    let storage = Hostile::start(Arc::new(|_: &ProxyRequest| probe_reply())).await?;
    let storage_addr = storage.addr.clone();
    let mirror = Hostile::start(Arc::new(move |r: &ProxyRequest| {
        if r.header("authorization").is_none() {
            return Reply::Fixed {
                status: 401,
                headers: vec![h("www-authenticate", "Basic realm=\"m\"")],
                body: Vec::new(),
            };
        }
        // First a hop on the same origin (keeps both), then one to storage on another port.
        let location = if r.path.starts_with("/v2/") {
            "/hop/blob".to_owned()
        } else {
            format!("http://{storage_addr}/storage/blob?sig=S")
        };
        Reply::Fixed {
            status: 307,
            headers: vec![h("location", &location)],
            body: Vec::new(),
        }
    }))
    .await?;
    let mut resolver = stargz::ResolverConfig::default();
    resolver.host.insert(
        "registry.invalid".into(),
        HostConfig {
            mirrors: vec![MirrorConfig {
                host: mirror.addr.clone(),
                insecure: true,
                header: HashMap::from([("x-mirror-secret".to_owned(), "m1".to_owned())]),
                ..Default::default()
            }],
        },
    );
    let client = RegistryClient::new(ClientConfig {
        blob: blob_config(),
        resolver,
        docker_config_dir: Some("/nonexistent".into()),
        credentials: HashMap::from([(
            mirror.addr.clone(),
            Credentials {
                username: "u".into(),
                secret: Secret::new("p"),
            },
        )]),
        ..Default::default()
    })?;
    let r: Reference = "registry.invalid/a/b:t".parse()?;
    let blob = Blob::open(&client, &r, LAYER).await?;
    assert_eq!(blob.size(), 1000);

    let seen = mirror.requests();
    let hop = seen
        .iter()
        .find(|r| r.path == "/hop/blob")
        .expect("same-origin hop followed");
    assert!(hop
        .header("authorization")
        .is_some_and(|a| a.starts_with("Basic ")));
    assert_eq!(hop.header("x-mirror-secret"), Some("m1"));
    let at_storage = storage.requests();
    assert_eq!(at_storage.len(), 1);
    let s = &at_storage[0];
    assert_eq!(s.path, "/storage/blob?sig=S");
    assert_eq!(
        s.header("range"),
        Some("bytes=0-1"),
        "request headers are kept"
    );
    assert_eq!(s.header("authorization"), None);
    assert_eq!(s.header("x-mirror-secret"), None);
    Ok(())
}

/// The 1000-byte blob of the multi-range tests.
fn content() -> Vec<u8> {
    (0..1000).map(|i| (i % 251) as u8).collect()
}

/// The ranges a request names, as `start..end`.
fn ranges_asked(r: &ProxyRequest) -> Vec<(usize, usize)> {
    let spec = r.header("range").and_then(|v| v.strip_prefix("bytes="));
    spec.into_iter()
        .flat_map(|s| s.split(','))
        .filter_map(|p| {
            let (a, b) = p.split_once('-')?;
            Some((a.parse().ok()?, b.parse::<usize>().ok()? + 1))
        })
        .collect()
}

/// A `multipart/byteranges` body (boundary `B`) of `parts` of [`content`]: each says it holds
/// `said` when given, else its own bytes.
fn multipart(parts: &[((usize, usize), Option<&str>)]) -> Vec<u8> {
    let data = content();
    let mut body = Vec::new();
    for &((a, b), said) in parts {
        let range = said.map_or_else(|| format!("bytes {a}-{}/1000", b - 1), str::to_owned);
        body.extend_from_slice(
            format!("\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Range: {range}\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(&data[a..b]);
    }
    body.extend_from_slice(b"\r\n--B--\r\n");
    body
}

fn multipart_reply(body: Vec<u8>) -> Reply {
    Reply::Fixed {
        status: 206,
        headers: vec![h("content-type", "multipart/byteranges; boundary=B")],
        body,
    }
}

/// A single range of [`content`], as a registry serves it.
fn single_range_reply(r: &ProxyRequest) -> Reply {
    let asked = ranges_asked(r);
    let (a, b) = (asked[0].0, asked[asked.len() - 1].1);
    Reply::Fixed {
        status: 206,
        headers: vec![h("content-range", &format!("bytes {a}-{}/1000", b - 1))],
        body: content()[a..b].to_vec(),
    }
}

const WANTED: [std::ops::Range<u64>; 3] = [10..20, 300..450, 990..1000];

fn wanted_bytes() -> Vec<u8> {
    let data = content();
    WANTED
        .iter()
        .flat_map(|r| data[r.start as usize..r.end as usize].to_vec())
        .collect()
}

/// A registry that serves multi-range requests is asked for several ranges in one request,
/// and its parts are read for exactly the bytes asked; `force_single_range_mode` asks for the
/// covering range instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_ranges_come_in_one_request_unless_single_range_is_forced() -> Result<()> {
    for force in [false, true] {
        let srv = Hostile::start(Arc::new(|r: &ProxyRequest| {
            if is_probe(r) {
                return probe_reply();
            }
            let asked = ranges_asked(r);
            if asked.len() == 1 {
                return single_range_reply(r);
            }
            // Parts coalesced and split otherwise than asked, as a server may.
            let (first, rest) = asked.split_at(1);
            let mut parts = vec![((first[0].0, first[0].1 + 5), None)];
            parts.extend(rest.iter().map(|&p| (p, None)));
            multipart_reply(multipart(&parts))
        }))
        .await?;
        let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
        let config = BlobConfig {
            force_single_range_mode: force,
            ..blob_config()
        };
        let blob = Blob::open(&client_with(config), &r, LAYER).await?;
        assert_eq!(blob.multi_range(), !force);
        let mut sink = Vec::new();
        assert_eq!(blob.fetch_ranges_into(&WANTED, &mut sink).await?, 170);
        assert_eq!(sink, wanted_bytes());
        let data: Vec<String> = srv
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| !is_probe(r))
            .filter_map(|r| r.header("range").map(str::to_owned))
            .collect();
        let want = match force {
            false => "bytes=10-19,300-449,990-999",
            true => "bytes=10-999",
        };
        assert_eq!(data, [want], "force_single_range_mode = {force}");
        assert_eq!(blob.multi_range(), !force);
    }
    Ok(())
}

/// Answers to a multi-range request that are not the parts asked for — the whole blob, one
/// covering range, parts out of order, a part left out, a part outside the blob or another
/// blob's, a garbled body, a refusal — never get a wrong byte through: the client asks again
/// for the covering range at once, and for one range at a time from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_range_answers_that_are_not_the_parts_asked_fall_back_to_one_range() -> Result<()> {
    type Bad = fn(&[(usize, usize)]) -> Reply;
    let cases: [(&str, Bad); 8] = [
        ("whole blob", |_| Reply::Fixed {
            status: 200,
            headers: vec![],
            body: content(),
        }),
        ("covering range", |asked| Reply::Fixed {
            status: 206,
            headers: vec![h(
                "content-range",
                &format!("bytes {}-999/1000", asked[0].0),
            )],
            body: content()[asked[0].0..].to_vec(),
        }),
        ("out of order", |asked| {
            multipart_reply(multipart(&[
                (asked[1], None),
                (asked[0], None),
                (asked[2], None),
            ]))
        }),
        ("part left out", |asked| {
            multipart_reply(multipart(&[(asked[0], None), (asked[2], None)]))
        }),
        ("part outside", |asked| {
            multipart_reply(multipart(&[(asked[0], Some("bytes 995-1004/1000"))]))
        }),
        ("another blob", |asked| {
            multipart_reply(multipart(&[(asked[0], Some("bytes 10-19/5000"))]))
        }),
        ("garbled", |_| Reply::Endless {
            status: 206,
            headers: vec![h("content-type", "multipart/byteranges; boundary=B")],
            prefix: Vec::new(),
            piece: vec![b'z'; 4096],
            cap: 1 << 30,
        }),
        ("refused", |_| Reply::Fixed {
            status: 416,
            headers: vec![],
            body: Vec::new(),
        }),
    ];
    for (name, bad) in cases {
        let srv = Hostile::start(Arc::new(move |r: &ProxyRequest| {
            if is_probe(r) {
                return probe_reply();
            }
            match ranges_asked(r) {
                asked if asked.len() > 1 => bad(&asked),
                _ => single_range_reply(r),
            }
        }))
        .await?;
        let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
        let blob = Blob::open(&client_with(blob_config()), &r, LAYER).await?;
        let t = Instant::now();
        let mut sink = Vec::new();
        let got = blob.fetch_ranges_into(&WANTED, &mut sink).await;
        assert_eq!(got.map_err(|e| e.to_string()), Ok(170), "{name}");
        assert_eq!(
            sink,
            wanted_bytes(),
            "{name}: exactly the bytes asked, in order"
        );
        assert!(
            !blob.multi_range(),
            "{name}: one range at a time from now on"
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{name}: took {:?}",
            t.elapsed()
        );
        let mut again = Vec::new();
        blob.fetch_ranges_into(&WANTED, &mut again).await?;
        assert_eq!(again, wanted_bytes());
        let last = srv
            .seen
            .lock()
            .unwrap()
            .last()
            .and_then(|r| r.header("range").map(str::to_owned));
        assert_eq!(last.as_deref(), Some("bytes=10-999"), "{name}");
        let sent = settled(&srv).await;
        assert!(sent < MAX_BUFFERED, "{name}: server wrote {sent} bytes");
    }
    Ok(())
}
