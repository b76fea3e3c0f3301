//! `containerd-stargz-grpc`: the snapshotter daemon containerd talks to as a proxy plugin.
//! Flags, defaults and signals follow the Go daemon (see shared/REFERENCE.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use stargz::Config;
use stargz::{Snapshotter, SnapshotterImpl, SysMounter};
use tracing::{error, info, warn};

const DEFAULT_ADDRESS: &str = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock";
const DEFAULT_CONFIG: &str = "/etc/containerd-stargz-grpc/config.toml";
const DEFAULT_ROOT: &str = "/var/lib/containerd-stargz-grpc";
/// Upper bound on a graceful stop, so a stuck client connection never keeps us alive.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "containerd-stargz-grpc",
    version,
    about = "Lazy-pulling eStargz snapshotter for containerd"
)]
struct Args {
    /// Address for the snapshotter's gRPC server.
    #[arg(long, default_value = DEFAULT_ADDRESS)]
    address: PathBuf,
    /// Path to the configuration file (may be absent only at the default path).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Path to the root directory for this snapshotter.
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Log level: trace, debug, info, warn, error (fatal/panic map to error).
    #[arg(long = "log-level", default_value = "info")]
    log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGINT: unmount remote layers before exiting.
    Cleanup,
    /// SIGTERM: keep everything for the next start.
    Keep,
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    let level = match level {
        "fatal" | "panic" => "error",
        "warning" => "warn",
        l @ ("trace" | "debug" | "info" | "warn" | "error") => l,
        other => anyhow::bail!("invalid --log-level {other:?} (trace, debug, info, warn, error)"),
    };
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

fn notify(state: sd_notify::NotifyState) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[state]) {
            warn!(error = %stargz::error_chain(&e), "sd_notify failed");
        }
    }
}

/// Registers the handlers now (before READY is sent, so an early signal is never lost)
/// and returns a future resolving to the first of SIGINT/SIGTERM.
fn signals() -> anyhow::Result<impl std::future::Future<Output = Stop>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => Stop::Cleanup,
            _ = term.recv() => Stop::Keep,
        }
    })
}

fn main() -> anyhow::Result<()> {
    stargz::tune_allocator();
    // `containerd-stargz-grpc --fuse-keeper SOCKET`: the process the daemon starts to hold
    // its FUSE connections across restarts (not for users to run).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == stargz::KEEPER_FLAG) {
        init_logging("info")?;
        let Some(socket) = argv.get(2) else {
            anyhow::bail!("{} needs the socket path", stargz::KEEPER_FLAG);
        };
        return stargz::run_keeper(std::path::Path::new(socket)).context("fuse keeper failed");
    }
    let args = Args::parse_from(stargz::go_style_args(std::env::args_os()));
    init_logging(&args.log_level)?;
    if let Err(e) = real_main(args) {
        error!(error = format!("{e:#}"), "daemon failed");
        return Err(e);
    }
    Ok(())
}

fn real_main(args: Args) -> anyhow::Result<()> {
    let missing_ok = args.config.as_os_str() == DEFAULT_CONFIG;
    let (config, unknown) = Config::load(&args.config, missing_ok)?;
    for key in unknown {
        warn!(key, config = %args.config.display(), "unknown configuration key ignored");
    }
    // Nothing we create is for other users (the cache holds every image's files, even
    // those that are 0600 in the image), so the default is owner-only; the few directories
    // that need other modes (overlay upper/work dirs, the socket) set them explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    stargz::private_dir(&args.root)
        .with_context(|| format!("create root {}", args.root.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Handlers first: a signal during a long restore is then handled, not fatal.
    let wait_signal = {
        let _guard = rt.enter();
        signals()?
    };
    let metrics = (!config.no_prometheus).then(|| Arc::new(stargz::Metrics::new()));
    // Listening before restore: a scrape during a long restore sees its progress, and a
    // metrics_address that cannot be bound fails the start at once (as Go's daemon does).
    let _metrics_server = match (&metrics, config.metrics_address.as_str()) {
        (_, "") => None,
        (None, address) => {
            warn!(
                address,
                "no_prometheus = true: metrics_address is not served"
            );
            None
        }
        (Some(m), address) => Some(rt.block_on(stargz::serve_metrics(address, m.clone()))?),
    };
    let remote =
        stargz::build_remote_layers(&config, &args.root, rt.handle().clone(), metrics.clone())?;
    let snapshotter = Arc::new(
        SnapshotterImpl::new(
            &args.root.join("snapshotter"),
            Some(remote),
            Arc::new(SysMounter),
        )?
        .with_check_policy(config.check_policy())
        .with_metrics(metrics),
    );
    snapshotter.restore()?;
    if let Err(e) = snapshotter.cleanup() {
        warn!(error = %stargz::error_chain(&e), "start-up cleanup failed");
    }

    let stop = rt.block_on(async {
        let listener = stargz::bind_socket(&args.address)?;
        info!(address = %args.address.display(), root = %args.root.display(), "containerd-stargz-grpc started");
        let (sig_tx, sig_rx) = tokio::sync::watch::channel(None::<Stop>);
        tokio::spawn(async move {
            let s = wait_signal.await;
            info!(signal = ?s, "shutting down");
            let _ = sig_tx.send(Some(s));
        });
        let signalled = |mut rx: tokio::sync::watch::Receiver<Option<Stop>>| async move {
            let _ = rx.wait_for(|s| s.is_some()).await;
        };
        notify(sd_notify::NotifyState::Ready);
        let serve = stargz::run(listener, snapshotter.clone(), signalled(sig_rx.clone()));
        tokio::select! {
            r = serve => r?,
            _ = async { signalled(sig_rx.clone()).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                warn!("in-flight requests did not finish in time");
            }
        }
        let stop = *sig_rx.borrow();
        anyhow::Ok(stop)
    })?;
    notify(sd_notify::NotifyState::Stopping);
    let _ = std::fs::remove_file(&args.address);
    if stop == Some(Stop::Cleanup) {
        snapshotter.unmount_all_remote()?;
        info!("remote layers unmounted");
        info!("exited");
        return Ok(());
    }
    // The remote layers stay mounted, their connections held by the fuse keeper for the next
    // start: exit without running their destructors (which would unmount them).
    info!("exited; remote layers stay mounted for the next start");
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_single_dash_long_flags_are_accepted() {
        let line = ["d", "-log-level", "debug", "-root=/r"].map(std::ffi::OsString::from);
        let parsed = Args::try_parse_from(stargz::go_style_args(line)).expect("parse");
        assert_eq!(
            (parsed.log_level.as_str(), parsed.root),
            ("debug", PathBuf::from("/r"))
        );
    }
}
