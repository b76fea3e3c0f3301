//! The daemon's blob read path (`Blob::fetch_range_into`, streamed, nothing cached) through a
//! fault-injecting proxy: resets, truncations, 5xx/429, full-body 200s, stalls, corrupted
//! bytes and an expired storage URL. Every fetch delivers exactly its bytes or a clear error;
//! a broken response is resumed with a `Range` from the first byte the sink has not seen; and
//! memory stays flat however large the range.

mod remote_support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use remote_support::{
    fetch, pseudo_random, Action, Fault, Hostile, Proxy, ProxyRequest, Pusher, Registry, Reply,
};
use stargz::{Blob, BlobConfig, ClientConfig, Reference, RegistryClient, RemoteError};

/// The memory test reads this process's peak RSS: no other test may run beside it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn blob_config() -> BlobConfig {
    BlobConfig {
        max_retries: 6,
        min_wait_msec: 1,
        max_wait_msec: 16,
        stall_timeout_msec: 250,
        fetching_timeout_sec: 10,
        ..Default::default()
    }
}

fn client_with(blob: BlobConfig) -> RegistryClient {
    RegistryClient::new(ClientConfig {
        blob,
        docker_config_dir: Some("/nonexistent".into()),
        ..Default::default()
    })
    .unwrap()
}

/// xorshift behind a mutex: the proxy's dice.
struct Dice(Mutex<u64>);

impl Dice {
    fn roll(&self) -> f64 {
        let mut x = self.0.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn is_data_request(r: &ProxyRequest) -> bool {
    r.path.contains("/blobs/") && r.header("range").is_some_and(|v| v != "bytes=0-1")
}

/// `(start, end)` of a `bytes=S-E` header (end exclusive).
fn asked(r: &ProxyRequest) -> Option<(u64, u64)> {
    let (s, e) = r.header("range")?.strip_prefix("bytes=")?.split_once('-')?;
    Some((s.parse().ok()?, e.parse::<u64>().ok()? + 1))
}

type Counts = Arc<Mutex<HashMap<&'static str, usize>>>;

/// Every fault but corruption, on about half of the data requests.
fn faulty_policy(dice: Arc<Dice>, counts: Counts) -> remote_support::Policy {
    Arc::new(move |r: &ProxyRequest| {
        if !is_data_request(r) {
            return Action::Forward(Fault::None);
        }
        let p = dice.roll();
        let f = dice.roll();
        let (name, fault) = match p {
            p if p < 0.10 => ("reset", Fault::Reset(f)),
            p if p < 0.20 => ("truncate", Fault::Truncate(f)),
            p if p < 0.27 => ("503", Fault::Status(503)),
            p if p < 0.32 => ("429", Fault::Status(429)),
            p if p < 0.37 => ("500", Fault::Status(500)),
            p if p < 0.42 => ("full-200", Fault::FullBody),
            p if p < 0.44 => ("stall", Fault::Stall(f, Duration::from_millis(600))),
            _ => ("none", Fault::None),
        };
        *counts.lock().unwrap().entry(name).or_default() += 1;
        Action::Forward(fault)
    })
}

fn next(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *x >> 16
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_range_fetches_through_faults_are_exact_or_clear_errors() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let reg = Registry::start(None)?;
    let data = Arc::new(pseudo_random(1_000_003, 11));
    let (layer, _) = Pusher::new(&reg.base())
        .image("f/a", "t", data.to_vec())
        .await?;
    let dice = Arc::new(Dice(Mutex::new(0x9e3779b97f4a7c15)));
    let counts = Counts::default();
    let proxy = Proxy::start(&reg.addr, faulty_policy(dice, counts.clone())).await?;
    let r: Reference = format!("{}/f/a:t", proxy.addr).parse()?;
    let c = client_with(blob_config());
    let started = Instant::now();
    let ok = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    // Several Blob instances, 4 concurrent fetchers each.
    for b in 0..3u64 {
        let blob = Blob::open(&c, &r, &layer).await?;
        for t in 0..4u64 {
            let (blob, data, ok, errors) = (blob.clone(), data.clone(), ok.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut x = b * 1000 + t + 1;
                for _ in 0..60 {
                    let off = next(&mut x) % data.len() as u64;
                    let end = (off + next(&mut x) % 40_000 + 1).min(data.len() as u64);
                    match fetch(&blob, off..end).await {
                        Ok(got) => {
                            assert!(
                                got[..] == data[off as usize..end as usize],
                                "wrong bytes in {off}..{end}"
                            );
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.lock().unwrap().push(e.to_string()),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await?;
    }
    let errors = errors.lock().unwrap().clone();
    let ok = ok.load(Ordering::Relaxed);
    eprintln!(
        "fetches ok={ok} errors={} faults={:?} in {:?}",
        errors.len(),
        counts.lock().unwrap(),
        started.elapsed()
    );
    assert_eq!(ok + errors.len(), 720);
    // Retries make most fetches succeed; whatever failed says why.
    assert!(ok > 650, "too few successful fetches: {ok}");
    for e in &errors {
        assert!(
            ["answered HTTP", "truncated", "stalled", "request to"]
                .iter()
                .any(|k| e.contains(k)),
            "unclear error: {e}"
        );
    }
    let counts = counts.lock().unwrap();
    for kind in [
        "reset", "truncate", "503", "429", "500", "full-200", "stall",
    ] {
        assert!(
            counts.get(kind).copied().unwrap_or(0) > 0,
            "fault {kind} never injected"
        );
    }
    Ok(())
}

/// A broken response is resumed from the first byte the sink has not seen: each request after
/// a reset or truncation asks for exactly the rest, a 5xx is asked again as it was, and the
/// sink sees every byte once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_responses_resume_from_the_first_missing_byte() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let reg = Registry::start(None)?;
    let data = pseudo_random(400_000, 16);
    let (layer, _) = Pusher::new(&reg.base())
        .image("f/r", "t", data.clone())
        .await?;
    let faults = [
        Fault::Truncate(0.3),
        Fault::Status(503),
        Fault::Reset(0.5),
        Fault::Stall(0.4, Duration::from_millis(600)),
        Fault::Status(500),
        Fault::None,
    ];
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let policy: remote_support::Policy = Arc::new(move |r: &ProxyRequest| {
        if !is_data_request(r) {
            return Action::Forward(Fault::None);
        }
        let mut seen = s2.lock().unwrap();
        seen.push(asked(r).expect("a single range"));
        Action::Forward(faults.get(seen.len() - 1).copied().unwrap_or(Fault::None))
    });
    let proxy = Proxy::start(&reg.addr, policy).await?;
    let r: Reference = format!("{}/f/r:t", proxy.addr).parse()?;
    let blob = Blob::open(&client_with(blob_config()), &r, &layer).await?;
    assert_eq!(fetch(&blob, 1000..301_000).await?, data[1000..301_000]);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert_eq!(seen[0], (1000, 301_000));
    assert!(seen.iter().all(|&(_, e)| e == 301_000), "{seen:?}");
    // After the truncation: the rest, from where it broke off.
    assert!(seen[1].0 > 1000, "{seen:?}");
    // The 503 answered no byte: the same range again.
    assert_eq!(seen[2], seen[1]);
    // After the reset and the stall: further on each time.
    assert!(seen[3].0 > seen[2].0 && seen[4].0 > seen[3].0, "{seen:?}");
    assert_eq!(seen[5], seen[4]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_give_a_clear_error_and_only_exact_bytes() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let reg = Registry::start(None)?;
    let data = pseudo_random(100_000, 12);
    let (layer, _) = Pusher::new(&reg.base())
        .image("f/b", "t", data.clone())
        .await?;
    for (fault, want) in [
        (Fault::Status(503), "answered HTTP 503"),
        (Fault::Truncate(0.5), "truncated"),
        (Fault::Reset(0.3), "broke off"),
        (Fault::Stall(0.2, Duration::from_secs(2)), "stalled"),
    ] {
        let policy: remote_support::Policy = Arc::new(move |r: &ProxyRequest| {
            Action::Forward(if is_data_request(r) {
                fault
            } else {
                Fault::None
            })
        });
        let proxy = Proxy::start(&reg.addr, policy).await?;
        let r: Reference = format!("{}/f/b:t", proxy.addr).parse()?;
        let blob = Blob::open(
            &client_with(BlobConfig {
                max_retries: 2,
                max_wait_msec: 2,
                stall_timeout_msec: 200,
                ..blob_config()
            }),
            &r,
            &layer,
        )
        .await?;
        let mut sink = Vec::new();
        let err = blob
            .fetch_range_into(5_000..35_000, &mut sink)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(want), "{fault:?}: {err}");
        // What reached the sink before the error is a prefix of the range, exact.
        assert!(sink.len() < 30_000, "{fault:?}");
        assert!(sink[..] == data[5_000..5_000 + sink.len()], "{fault:?}");
        if matches!(fault, Fault::Status(_)) {
            assert!(sink.is_empty());
        }
    }
    Ok(())
}

/// Registries give no per-range digest: a byte corrupted in flight is passed on with the right
/// length (the eStargz chunk digest one layer up catches it), but a whole-blob download
/// (`fetch_verified_into`) is checked against the blob's digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_keep_lengths_and_fail_the_whole_blob_digest() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let reg = Registry::start(None)?;
    let data = Arc::new(pseudo_random(200_000, 14));
    let (layer, _) = Pusher::new(&reg.base())
        .image("f/d", "t", data.to_vec())
        .await?;
    let dice = Arc::new(Dice(Mutex::new(77)));
    let d2 = dice.clone();
    let policy: remote_support::Policy = Arc::new(move |r: &ProxyRequest| {
        if is_data_request(r) {
            return Action::Forward(Fault::Corrupt(d2.roll()));
        }
        Action::Forward(Fault::None)
    });
    let proxy = Proxy::start(&reg.addr, policy).await?;
    let r: Reference = format!("{}/f/d:t", proxy.addr).parse()?;
    let blob = Blob::open(&client_with(blob_config()), &r, &layer).await?;
    let (mut exact, mut wrong) = (0, 0);
    let mut x = 5u64;
    for _ in 0..50 {
        let off = next(&mut x) % 190_000;
        let end = off + next(&mut x) % 9_000 + 1;
        let got = fetch(&blob, off..end).await?;
        assert_eq!(got.len() as u64, end - off, "length is always right");
        if got[..] == data[off as usize..end as usize] {
            exact += 1
        } else {
            wrong += 1
        }
    }
    eprintln!("corruption: exact={exact} wrong={wrong}");
    assert!(wrong > 0, "payload corruption is passed through");
    let mut sink = Vec::new();
    let err = blob.fetch_verified_into(&mut sink).await.unwrap_err();
    assert!(
        matches!(&err, RemoteError::DigestMismatch { expected, .. } if *expected == layer),
        "{err}"
    );
    assert_eq!(sink.len(), data.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_storage_and_reresolve_on_403() -> Result<()> {
    let _serial = SERIAL.lock().await;
    // A front that redirects blob GETs to a "storage" proxy which refuses the first data
    // request with 403 (an expired presigned URL): the fetch re-resolves and succeeds.
    let reg = Registry::start(None)?;
    let data = pseudo_random(60_000, 15);
    let (layer, _) = Pusher::new(&reg.base())
        .image("f/e", "t", data.clone())
        .await?;
    let refused = Arc::new(AtomicUsize::new(0));
    let r2 = refused.clone();
    let storage = Proxy::start(
        &reg.addr,
        Arc::new(move |r: &ProxyRequest| {
            if is_data_request(r) && r2.fetch_add(1, Ordering::SeqCst) == 0 {
                return Action::Respond {
                    status: 403,
                    headers: vec![],
                    body: b"expired".to_vec(),
                };
            }
            Action::Forward(Fault::None)
        }),
    )
    .await?;
    let storage_addr = storage.addr.clone();
    let front = Proxy::start(
        &reg.addr,
        Arc::new(move |r: &ProxyRequest| {
            if r.path.contains("/blobs/") {
                return Action::Respond {
                    status: 307,
                    headers: vec![(
                        "location".into(),
                        format!("http://{storage_addr}{}?sig=SECRETSIG", r.path),
                    )],
                    body: vec![],
                };
            }
            Action::Forward(Fault::None)
        }),
    )
    .await?;
    let r: Reference = format!("{}/f/e:t", front.addr).parse()?;
    let blob = Blob::open(&client_with(blob_config()), &r, &layer).await?;
    assert_eq!(blob.size(), 60_000);
    assert_eq!(fetch(&blob, 0..60_000).await?, data);
    assert!(refused.load(Ordering::SeqCst) >= 2);
    // Errors from storage URLs never show the presigned signature.
    let err = RemoteError::Status {
        url: stargz::redact_url(&format!("http://{}/x?sig=SECRETSIG", storage.addr)),
        status: 403,
        detail: String::new(),
    };
    assert!(!err.to_string().contains("SECRETSIG"));
    Ok(())
}

/// Counts what it is given and keeps nothing, checking every byte is `b'z'`.
struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        assert!(buf.iter().all(|&b| b == b'z'));
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A 256 MiB range, served by a server that breaks off every 64 MiB, streams through with the
/// process's peak RSS growing by a few MiB: nothing holds the range, resumes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_range_with_resumes_streams_in_flat_memory() -> Result<()> {
    let _serial = SERIAL.lock().await;
    const SIZE: u64 = 256 << 20;
    const PER_RESPONSE: u64 = 64 << 20;
    let srv = Hostile::start(Arc::new(|r: &ProxyRequest| {
        let Some((start, end)) = asked(r) else {
            return Reply::Fixed {
                status: 400,
                headers: vec![],
                body: vec![],
            };
        };
        if start == 0 && end == 2 {
            return Reply::Fixed {
                status: 206,
                headers: vec![("content-range".into(), format!("bytes 0-1/{SIZE}"))],
                body: b"zz".to_vec(),
            };
        }
        // No Content-Length; the connection closes after PER_RESPONSE bytes: a truncation.
        Reply::Endless {
            status: 206,
            headers: vec![(
                "content-range".into(),
                format!("bytes {start}-{}/{SIZE}", end - 1),
            )],
            prefix: Vec::new(),
            piece: vec![b'z'; 64 << 10],
            cap: PER_RESPONSE.min(end - start),
        }
    }))
    .await?;
    let r: Reference = format!("{}/a/b:t", srv.addr).parse()?;
    let digest = format!("sha256:{}", "2".repeat(64));
    let blob = Blob::open(&client_with(blob_config()), &r, &digest).await?;
    assert_eq!(blob.size(), SIZE);
    // Resets the peak to the current RSS (Linux >= 4.0).
    std::fs::write("/proc/self/clear_refs", "5")?;
    let before = status_kib("VmRSS:");
    let mut sink = CountingSink(0);
    assert_eq!(blob.fetch_range_into(0..SIZE, &mut sink).await?, SIZE);
    assert_eq!(sink.0, SIZE);
    let grew = status_kib("VmHWM:").saturating_sub(before);
    eprintln!(
        "peak RSS grew by {grew} KiB over a {} MiB range",
        SIZE >> 20
    );
    assert!(grew < 32 << 10, "peak RSS grew by {grew} KiB");
    let data_requests = srv.requests().len() - 1;
    assert_eq!(data_requests as u64, SIZE.div_ceil(PER_RESPONSE));
    Ok(())
}
