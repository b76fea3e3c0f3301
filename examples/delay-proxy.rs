//! `delay-proxy`: a TCP proxy that adds a fixed one-way delay to each direction, so that a registry
//! behind it looks like one at the end of a long link. Test-bed tooling, not part of the product
//! (this kernel has no `netem`; see "Emulating a slow link" in shared/REFERENCE.md and
//! `scripts/netlink.sh`, which runs it inside a network namespace behind a `tbf`-limited veth).
//!
//! Each chunk read from one side is stamped and released to the other side `delay` later, in
//! order, while the next chunks are already being read: the delay adds latency without capping
//! throughput (a per-connection sleep would). The first client bytes of a connection are held for
//! one more round trip (`--connect-delay-ms`, default 2 × delay), standing in for the TCP handshake
//! that a real link would also delay: a new connection costs what it costs on a real link.
//!
//! Known differences from a real link: the client's TCP sees a near-zero RTT, so slow start and
//! the window limit of a long fat pipe are not reproduced (the rate limit comes from `tbf`).
//!
//! ```text
//! cargo run --release --example delay-proxy -- --listen 10.203.0.2:5000 \
//!     --upstream 127.0.0.1:5000 --delay-ms 10 --stats /run/x/stats.json
//! ```
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

/// Chunks in flight per direction. With 64 KiB reads this bounds a connection's buffered bytes
/// (8 MiB per direction) while leaving room for rate × delay of any link we emulate.
const QUEUE_CHUNKS: usize = 128;
const READ_SIZE: usize = 64 * 1024;

#[derive(Parser, Debug)]
#[command(about = "TCP proxy adding a one-way delay in each direction")]
struct Args {
    /// Address to accept clients on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address every connection is forwarded to.
    #[arg(long)]
    upstream: SocketAddr,
    /// One-way delay in milliseconds (round trip = 2 × this).
    #[arg(long, default_value_t = 10)]
    delay_ms: u64,
    /// Extra hold of a connection's first client bytes (emulated handshake); default 2 × delay.
    #[arg(long)]
    connect_delay_ms: Option<u64>,
    /// Write byte counters as JSON here (atomically, every 100 ms when they change).
    #[arg(long)]
    stats: Option<PathBuf>,
}

/// Totals over all connections; `upstream_to_client` is what the registry served.
#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    client_to_upstream: AtomicU64,
    upstream_to_client: AtomicU64,
}

impl Stats {
    fn json(&self) -> String {
        format!(
            "{{\"connections\":{},\"client_to_upstream\":{},\"upstream_to_client\":{}}}\n",
            self.connections.load(Ordering::Relaxed),
            self.client_to_upstream.load(Ordering::Relaxed),
            self.upstream_to_client.load(Ordering::Relaxed)
        )
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_ansi(false).with_writer(std::io::stderr).init();
    let args = Args::parse();
    let delay = Duration::from_millis(args.delay_ms);
    let connect_delay = Duration::from_millis(args.connect_delay_ms.unwrap_or(2 * args.delay_ms));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let stats = Arc::new(Stats::default());
    if let Some(path) = args.stats.clone() {
        tokio::spawn(write_stats(path, stats.clone()));
    }
    tracing::info!(listen = %args.listen, upstream = %args.upstream, delay_ms = args.delay_ms,
        connect_delay_ms = connect_delay.as_millis() as u64, "delay proxy ready");
    loop {
        let (client, peer) = listener.accept().await.context("accept")?;
        let accepted = Instant::now();
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        let upstream = args.upstream;
        tokio::spawn(async move {
            if let Err(err) = serve(client, upstream, accepted, delay, connect_delay, stats).await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    accepted: Instant,
    delay: Duration,
    connect_delay: Duration,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let server = TcpStream::connect(upstream).await.with_context(|| format!("connect {upstream}"))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_rd, client_wr) = client.into_split();
    let (server_rd, server_wr) = server.into_split();
    let up = pump(client_rd, server_wr, delay, accepted + connect_delay, stats.clone(), true);
    let down = pump(server_rd, client_wr, delay, accepted, stats, false);
    let (up, down) = tokio::join!(up, down);
    up.and(down)
}

/// Copies `rd` to `wr`, releasing each chunk `delay` after it was read (never before
/// `not_before + delay`), in order. EOF is forwarded (as a write shutdown) with the same delay.
async fn pump(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    delay: Duration,
    not_before: Instant,
    stats: Arc<Stats>,
    upward: bool,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(QUEUE_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; READ_SIZE];
        let mut last_due = not_before + delay;
        loop {
            let n = rd.read(&mut buf).await?;
            last_due = last_due.max(Instant::now() + delay);
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((last_due, chunk)).await.is_err() || n == 0 {
                return anyhow::Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            sleep_until(due).await;
            let Some(chunk) = chunk else {
                wr.shutdown().await?;
                break;
            };
            wr.write_all(&chunk).await?;
            let counter = if upward { &stats.client_to_upstream } else { &stats.upstream_to_client };
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        anyhow::Ok(())
    };
    let (r, w) = tokio::join!(reader, writer);
    r.and(w)
}

/// Keeps `path` holding the current counters; readers never see a partial file (write + rename).
async fn write_stats(path: PathBuf, stats: Arc<Stats>) {
    let tmp = path.with_extension("tmp");
    let mut last = String::new();
    loop {
        let now = stats.json();
        if now != last {
            let written = tokio::fs::write(&tmp, &now).await.and(tokio::fs::rename(&tmp, &path).await);
            if let Err(err) = written {
                tracing::warn!(path = %path.display(), error = %err, "cannot write stats");
            }
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
