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
//! The endpoints' own TCP connections end at this proxy and see a near-zero RTT, so the proxy
//! also plays TCP's congestion window on the emulated link (unless `--no-window`): a direction
//! starts with Linux's initial window (10 segments), grows it by the bytes acknowledged (slow start;
//! an emulated ack comes back one round trip after the send), and shrinks it again after an idle
//! period longer than the retransmission timeout (`tcp_slow_start_after_idle`). So a 1 MB response
//! after a pause takes several round trips, as on a real link, instead of one. Losses are not
//! modelled; the rate limit itself comes from `tbf` on the veth.
//!
//! ```text
//! cargo run --release --example delay-proxy -- --listen 10.203.0.2:5000 \
//!     --upstream 127.0.0.1:5000 --delay-ms 10 --stats /run/x/stats.json
//! ```
use std::collections::VecDeque;
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
/// Linux's initial congestion window: 10 segments of a 1500-byte-MTU link.
const INIT_WINDOW: u64 = 10 * 1448;
/// Linux's minimum retransmission timeout, the base of the idle restart.
const MIN_RTO: Duration = Duration::from_millis(200);

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
    /// Do not emulate TCP's congestion window (slow start) on the delayed link.
    #[arg(long)]
    no_window: bool,
    /// Largest emulated congestion window, in KiB.
    #[arg(long, default_value_t = 4096)]
    max_window_kib: u64,
}

/// What every connection shares of the emulated link.
#[derive(Clone, Copy)]
struct LinkParams {
    delay: Duration,
    connect_delay: Duration,
    /// `None`: no window emulation.
    max_window: Option<u64>,
}

/// The emulated sender's congestion window of one direction, on the emulated timeline.
struct Window {
    cwnd: u64,
    max: u64,
    rtt: Duration,
    /// (ack arrival time, bytes) of sent, not yet acknowledged segments, oldest first.
    in_flight: VecDeque<(Instant, u64)>,
    in_flight_bytes: u64,
    last_send: Option<Instant>,
}

impl Window {
    fn new(max: u64, rtt: Duration) -> Self {
        Window {
            cwnd: INIT_WINDOW,
            max,
            rtt,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            last_send: None,
        }
    }

    /// Earliest emulated send time at or after `earliest` for up to `want` bytes, and how many of
    /// them the window lets go then; records them as in flight.
    fn send(&mut self, earliest: Instant, want: u64) -> (Instant, u64) {
        let mut at = earliest.max(self.last_send.unwrap_or(earliest));
        self.restart_after_idle(at);
        loop {
            self.take_acks(at);
            let room = self.cwnd.saturating_sub(self.in_flight_bytes);
            if room > 0 {
                let n = room.min(want);
                self.in_flight.push_back((at + self.rtt, n));
                self.in_flight_bytes += n;
                self.last_send = Some(at);
                return (at, n);
            }
            match self.in_flight.front() {
                Some(&(ack, _)) => at = at.max(ack),
                None => return (at, want), // unreachable: cwnd > 0 and nothing in flight
            }
        }
    }

    /// Slow start: every acknowledged byte grows the window by one, up to `max`.
    fn take_acks(&mut self, now: Instant) {
        while let Some(&(ack, n)) = self.in_flight.front() {
            if ack > now {
                break;
            }
            self.in_flight.pop_front();
            self.in_flight_bytes -= n;
            self.cwnd = (self.cwnd + n).min(self.max);
        }
    }

    /// `tcp_cwnd_restart`: after an idle RTO the window halves per RTO elapsed, down to the
    /// initial window.
    fn restart_after_idle(&mut self, now: Instant) {
        let Some(last) = self.last_send else { return };
        self.take_acks(now);
        let rto = MIN_RTO + self.rtt;
        let idle = now.saturating_duration_since(last);
        if self.in_flight_bytes == 0 && idle > rto {
            let halvings = (idle.as_millis() / rto.as_millis().max(1)).min(63) as u32;
            self.cwnd = (self.cwnd >> halvings).max(INIT_WINDOW);
        }
    }
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
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let link = LinkParams {
        delay: Duration::from_millis(args.delay_ms),
        connect_delay: Duration::from_millis(args.connect_delay_ms.unwrap_or(2 * args.delay_ms)),
        max_window: (!args.no_window).then_some(args.max_window_kib * 1024),
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let stats = Arc::new(Stats::default());
    if let Some(path) = args.stats.clone() {
        tokio::spawn(write_stats(path, stats.clone()));
    }
    tracing::info!(listen = %args.listen, upstream = %args.upstream, delay_ms = args.delay_ms,
        connect_delay_ms = link.connect_delay.as_millis() as u64, window = !args.no_window,
        "delay proxy ready");
    loop {
        let (client, peer) = listener.accept().await.context("accept")?;
        let accepted = Instant::now();
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        let upstream = args.upstream;
        tokio::spawn(async move {
            if let Err(err) = serve(client, upstream, accepted, link, stats).await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    accepted: Instant,
    link: LinkParams,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connect {upstream}"))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_rd, client_wr) = client.into_split();
    let (server_rd, server_wr) = server.into_split();
    let up = pump(
        client_rd,
        server_wr,
        link,
        accepted + link.connect_delay,
        stats.clone(),
        true,
    );
    let down = pump(server_rd, client_wr, link, accepted, stats, false);
    let (up, down) = tokio::join!(up, down);
    up.and(down)
}

/// Copies `rd` to `wr`, releasing each chunk `delay` after it was (emulated to be) sent: when it
/// was read, or later if the emulated congestion window was full; never before `not_before`.
/// Order is kept. EOF is forwarded (as a write shutdown) with the same delay.
async fn pump(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    link: LinkParams,
    not_before: Instant,
    stats: Arc<Stats>,
    upward: bool,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(QUEUE_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            let n = rd.read(&mut buf).await?;
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx
                .send((Instant::now().max(not_before), chunk))
                .await
                .is_err()
                || n == 0
            {
                return anyhow::Ok(());
            }
        }
    };
    let writer = async move {
        let mut window = link.max_window.map(|max| Window::new(max, 2 * link.delay));
        let mut last_sent = not_before;
        while let Some((read_at, chunk)) = rx.recv().await {
            let Some(chunk) = chunk else {
                sleep_until(last_sent.max(read_at) + link.delay).await;
                wr.shutdown().await?;
                break;
            };
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let (sent, n) = match window.as_mut() {
                    Some(w) => w.send(read_at.max(last_sent), rest.len() as u64),
                    None => (read_at.max(last_sent), rest.len() as u64),
                };
                last_sent = sent;
                let (now, later) = rest.split_at(n as usize);
                sleep_until(sent + link.delay).await;
                wr.write_all(now).await?;
                let counter = if upward {
                    &stats.client_to_upstream
                } else {
                    &stats.upstream_to_client
                };
                counter.fetch_add(n, Ordering::Relaxed);
                rest = later;
            }
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
            let written = tokio::fs::write(&tmp, &now)
                .await
                .and(tokio::fs::rename(&tmp, &path).await);
            if let Err(err) = written {
                tracing::warn!(path = %path.display(), error = %err, "cannot write stats");
            }
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
