//! `ctr-remote`: containerd client with the lazy-pulling commands (see `stargz::ctr`).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = stargz::CtrRemoteCli::parse_from(stargz::go_style_args(std::env::args_os()));
    let level = if cli.debug { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(stargz::run_ctr_remote(cli))?;
    Ok(())
}
