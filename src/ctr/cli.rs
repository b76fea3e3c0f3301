//! Command line of `ctr-remote`, mirroring Go's global flags and `images` subcommands.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use super::client::Containerd;
use super::convert::{convert, ConvertOptions};
use super::labels::DEFAULT_PREFETCH_SIZE;
use super::optimize::{
    optimize, parse_json_args, parse_mount_flag, NetOptions, OptimizeError, OptimizeOptions,
    WorkloadStop,
};
use super::registry::{RegistryOptions, RemoteFetcher};
use super::rpull::{human, rpull, LayerOutcome, RpullOptions};
use super::toc::layer_toc;
use super::Error;
use crate::estargz::Format;
use crate::remote::Reference;

const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";

#[derive(Debug, Parser)]
#[command(
    name = "ctr-remote",
    version,
    about = "containerd CLI with lazy-pulling (stargz) commands"
)]
pub struct Cli {
    /// address for containerd's GRPC server (default "/run/containerd/containerd.sock") [$CONTAINERD_ADDRESS]
    #[arg(short = 'a', long, global = true)]
    pub address: Option<PathBuf>,
    /// namespace to use with commands (default "default") [$CONTAINERD_NAMESPACE]
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// enable debug output in logs
    #[arg(long, global = true)]
    pub debug: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// manage images
    #[command(visible_aliases = ["image", "i"])]
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// pull an image from a registry leveraging stargz snapshotter (eStargz layers are mounted lazily; other layers are downloaded)
    Rpull(RpullArgs),
    /// get the digest of TOC of a layer
    GetTocDigest(GetTocDigestArgs),
    /// convert an image (to eStargz: --estargz is required)
    Convert(ConvertArgs),
    /// optimize an image with user-specified workload
    Optimize(Box<OptimizeArgs>),
}

#[derive(Debug, Args)]
pub struct OptimizeArgs {
    /// record the monitor log to the specified file
    #[arg(long)]
    pub record_out: Option<PathBuf>,
    /// convert Docker media types to OCI media types
    #[arg(long)]
    pub oci: bool,
    /// eStargz compression level
    #[arg(long, default_value_t = 9)]
    pub estargz_compression_level: u32,
    /// eStargz chunk size (0 = 4 MiB)
    #[arg(long, default_value_t = 0)]
    pub estargz_chunk_size: u64,
    /// use zstd compression instead of gzip (a.k.a zstd:chunked)
    #[arg(long)]
    pub zstdchunked: bool,
    #[command(flatten)]
    pub zstd: ZstdChunkedArgs,
    /// time period to monitor access log (seconds; 0 = the default, as Go)
    #[arg(long, default_value_t = 10)]
    pub period: u64,
    /// user/group name to override image's default config(user[:group])
    #[arg(long)]
    pub user: Option<String>,
    /// working dir to override image's default config
    #[arg(long)]
    pub cwd: Option<String>,
    /// command arguments to override image's default config(in JSON array)
    #[arg(long)]
    pub args: Option<String>,
    /// entrypoint to override image's default config(in JSON array)
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// environment valulable to add or override to the image's default config
    #[arg(long)]
    pub env: Vec<String>,
    /// specify additional container environment variables in a file(i.e. FOO=bar, one per line)
    #[arg(long)]
    pub env_file: Option<PathBuf>,
    /// additional mounts for the container (e.g. type=foo,source=/path,destination=/target,options=bind)
    #[arg(long)]
    pub mount: Vec<String>,
    /// comma-separated nameservers added to the container's /etc/resolv.conf
    #[arg(long, default_value = "8.8.8.8")]
    pub dns_nameservers: String,
    /// comma-separated search domains added to the container's /etc/resolv.conf
    #[arg(long)]
    pub dns_search_domains: Option<String>,
    /// comma-separated options added to the container's /etc/resolv.conf
    #[arg(long)]
    pub dns_options: Option<String>,
    /// comma-separated hosts configuration (host:IP) added to container's /etc/hosts
    #[arg(long)]
    pub add_hosts: Option<String>,
    /// enable host networking in the container
    #[arg(long)]
    pub net_host: bool,
    /// convert image without optimization
    #[arg(long)]
    pub no_optimize: bool,
    /// reuse eStargz (already optimized) layers without further conversion
    #[arg(long)]
    pub reuse: bool,
    /// attach stdin to the container
    #[arg(short = 'i')]
    pub stdin: bool,
    /// Pull content from a specific platform (only this host's is supported)
    #[arg(long)]
    pub platform: Vec<String>,
    /// ignore context cancel and keep the container running until it receives SIGINT (Ctrl + C) sent manually
    #[arg(long)]
    pub wait_on_signal: bool,
    /// allow connections using plain HTTP when the source must be pulled first
    #[arg(long)]
    pub plain_http: bool,
    /// source image reference
    #[arg(value_name = "source_ref")]
    pub source: String,
    /// target image reference
    #[arg(value_name = "target_ref")]
    pub target: String,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// convert legacy tar(.gz) layers to eStargz for lazy pulling. Should be used in conjunction with '--oci'
    #[arg(long)]
    pub estargz: bool,
    /// Read 'ctr-remote optimize --record-out=<FILE>' record file
    #[arg(long)]
    pub estargz_record_in: Option<PathBuf>,
    /// eStargz compression level
    #[arg(long, default_value_t = 9)]
    pub estargz_compression_level: u32,
    /// eStargz chunk size (0 = 4 MiB)
    #[arg(long, default_value_t = 0)]
    pub estargz_chunk_size: u64,
    /// use zstd compression instead of gzip (a.k.a zstd:chunked). Must be used in conjunction with '--oci'
    #[arg(long)]
    pub zstdchunked: bool,
    #[command(flatten)]
    pub zstd: ZstdChunkedArgs,
    /// convert Docker media types to OCI media types
    #[arg(long)]
    pub oci: bool,
    /// source image reference
    #[arg(value_name = "source_ref")]
    pub source: String,
    /// target image reference
    #[arg(value_name = "target_ref")]
    pub target: String,
}

/// zstd:chunked options of newer Go releases; without them, `--estargz-chunk-size` and
/// `--estargz-record-in` apply to zstd:chunked too, as in Go 0.12.
#[derive(Debug, Args)]
pub struct ZstdChunkedArgs {
    /// zstd:chunked compression level (1-22)
    #[arg(long, default_value_t = 3)]
    pub zstdchunked_compression_level: u32,
    /// zstd:chunked chunk size (0 = --estargz-chunk-size)
    #[arg(long, default_value_t = 0)]
    pub zstdchunked_chunk_size: u64,
    /// Read 'ctr-remote optimize --record-out=<FILE>' record file (zstd:chunked; default --estargz-record-in)
    #[arg(long)]
    pub zstdchunked_record_in: Option<PathBuf>,
}

/// The layer format, level and chunk size `convert`/`optimize` build with, after Go's checks
/// of `--estargz`, `--zstdchunked` and `--oci`.
fn layer_format(
    estargz: bool,
    zstdchunked: bool,
    oci: bool,
    estargz_level: u32,
    estargz_chunk_size: u64,
    zstd: &ZstdChunkedArgs,
) -> Result<(Format, u32, u64), Error> {
    if zstdchunked {
        if estargz {
            return Err(Error::InvalidArgument(
                "option --estargz conflicts with --zstdchunked".into(),
            ));
        }
        if !oci {
            return Err(Error::InvalidArgument(
                "option --zstdchunked must be used in conjunction with --oci".into(),
            ));
        }
        if !(1..=22).contains(&zstd.zstdchunked_compression_level) {
            return Err(Error::InvalidArgument(
                "--zstdchunked-compression-level must be 1-22".into(),
            ));
        }
        let chunk_size = match zstd.zstdchunked_chunk_size {
            0 => estargz_chunk_size,
            n => n,
        };
        return Ok((
            Format::ZstdChunked,
            zstd.zstdchunked_compression_level,
            chunk_size,
        ));
    }
    if estargz_level > 9 {
        return Err(Error::InvalidArgument(
            "--estargz-compression-level must be 0-9".into(),
        ));
    }
    Ok((Format::Gzip, estargz_level, estargz_chunk_size))
}

#[derive(Debug, Args)]
pub struct GetTocDigestArgs {
    /// parse layer as zstd:chunked
    #[arg(long)]
    pub zstdchunked: bool,
    /// dump TOC instead of digest. Note that the dumped TOC might be formatted with indents so may have different digest against the original in the layer
    #[arg(long)]
    pub dump_toc: bool,
    /// layer digest
    #[arg(value_name = "layer digest")]
    pub digest: String,
}

#[derive(Debug, Args)]
pub struct RpullArgs {
    /// skip SSL certificate validation
    #[arg(short = 'k', long)]
    pub skip_verify: bool,
    /// allow connections using plain HTTP
    #[arg(long)]
    pub plain_http: bool,
    /// user[:password] Registry user and password
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// labels to attach to the image
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Skip content verification for layers contained in this image.
    #[arg(long)]
    pub skip_content_verify: bool,
    /// snapshotter name (default "stargz", the lazy-pulling one; empty = the default) [$CONTAINERD_SNAPSHOTTER]
    #[arg(long)]
    pub snapshotter: Option<String>,
    /// image reference
    #[arg(value_name = "ref")]
    pub reference: String,
}

impl Cli {
    fn address(&self) -> PathBuf {
        self.address
            .clone()
            .or_else(|| std::env::var_os("CONTAINERD_ADDRESS").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS))
    }

    fn namespace(&self) -> String {
        self.namespace
            .clone()
            .or_else(|| {
                std::env::var("CONTAINERD_NAMESPACE")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "default".to_string())
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let cd = Containerd::connect(&cli.address(), &cli.namespace()).await?;
    match cli.command {
        Command::Images {
            command: ImagesCommand::Rpull(args),
        } => run_rpull(&cd, args).await,
        Command::Images {
            command: ImagesCommand::GetTocDigest(args),
        } => run_get_toc_digest(&cd, args).await,
        Command::Images {
            command: ImagesCommand::Convert(args),
        } => run_convert(&cd, args).await,
        Command::Images {
            command: ImagesCommand::Optimize(args),
        } => run_optimize(&cd, *args).await,
    }
}

/// `k=v` (or bare `k`, value empty) as `ctr`'s `LabelArgs`.
fn parse_labels(args: &[String]) -> HashMap<String, String> {
    args.iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.clone(), String::new()),
        })
        .collect()
}

async fn run_rpull(cd: &Containerd, args: RpullArgs) -> Result<(), Error> {
    let reference: Reference = args.reference.parse()?;
    let fetcher = RemoteFetcher::new(
        reference.clone(),
        &RegistryOptions {
            plain_http: args.plain_http,
            skip_verify: args.skip_verify,
            user: args.user,
        },
    )?;
    let snapshotter = args
        .snapshotter
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::env::var("CONTAINERD_SNAPSHOTTER")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "stargz".to_string());
    let opts = RpullOptions {
        snapshotter,
        skip_content_verify: args.skip_content_verify,
        prefetch_size: DEFAULT_PREFETCH_SIZE,
        image_labels: parse_labels(&args.labels),
    };
    let started = Instant::now();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let s = rpull(
        cd,
        &fetcher,
        &args.reference,
        &reference,
        &opts,
        &mut out,
        &mut err,
    )
    .await?;
    let remote = s
        .layers
        .iter()
        .filter(|(_, o)| *o == LayerOutcome::Remote)
        .count();
    let size = s.image_size().max(0) as u64;
    // Two different byte counts meet here: what rpull itself downloaded (layers that could not
    // be lazy, in full) and what the snapshotter fetches later for lazy layers (their TOCs now,
    // files as they are read). The line says which one it counts.
    eprintln!(
        "done: {remote}/{} layers remote (lazy: the snapshotter fetches their files from the \
         registry as containers read them); rpull downloaded {} of the image's {} of layers \
         ({:.1}%: the layers that are not remote, in full) in {:.2}s",
        s.layers.len(),
        human(s.downloaded()),
        human(size),
        if size == 0 {
            0.0
        } else {
            100.0 * s.downloaded() as f64 / size as f64
        },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn run_get_toc_digest(cd: &Containerd, args: GetTocDigestArgs) -> Result<(), Error> {
    let format = if args.zstdchunked {
        Format::ZstdChunked
    } else {
        Format::Gzip
    };
    let found = layer_toc(cd, &args.digest, format).await?;
    if args.dump_toc {
        let json = serde_json::to_string_pretty(&found.toc)?;
        println!("{json}");
    } else {
        println!("{}", found.digest);
    }
    Ok(())
}

async fn run_convert(cd: &Containerd, args: ConvertArgs) -> Result<(), Error> {
    if !args.estargz && !args.zstdchunked {
        return Err(Error::Unsupported(
            "specify --estargz or --zstdchunked: no other conversion is implemented".into(),
        ));
    }
    let (format, compression_level, chunk_size) = layer_format(
        args.estargz,
        args.zstdchunked,
        args.oci,
        args.estargz_compression_level,
        args.estargz_chunk_size,
        &args.zstd,
    )?;
    let record_in = match format {
        Format::ZstdChunked => args.zstd.zstdchunked_record_in.or(args.estargz_record_in),
        Format::Gzip => args.estargz_record_in,
    };
    let opts = ConvertOptions {
        oci: args.oci,
        format,
        compression_level,
        chunk_size,
        record_in,
        tmp_dir: None,
        keep_layers: vec![],
    };
    let mut err = std::io::stderr();
    let manifest = convert(cd, &args.source, &args.target, &opts, &mut err).await?;
    // Go prints the new image's manifest digest.
    println!("{}", manifest.digest);
    Ok(())
}

async fn run_optimize(cd: &Containerd, args: OptimizeArgs) -> Result<(), Error> {
    let (format, compression_level, chunk_size) = layer_format(
        false,
        args.zstdchunked,
        args.oci,
        args.estargz_compression_level,
        args.estargz_chunk_size,
        &args.zstd,
    )?;
    let host = crate::oci::host_platform();
    let host = format!("{}/{}", host.os, host.architecture);
    if let Some(p) = args.platform.iter().find(|p| {
        // `linux/amd64` or `linux/amd64/v…`: the os/arch part must be this host's.
        p.split('/').take(2).collect::<Vec<_>>().join("/") != host
    }) {
        return Err(Error::Unsupported(format!(
            "--platform {}: only this host's platform ({host}) can be optimized",
            crate::untrusted::clip(p)
        )));
    }
    let csv = |v: Option<&str>| -> Vec<String> {
        v.map(|s| {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
    };
    let mut env = args.env;
    if let Some(f) = &args.env_file {
        // containerd's WithEnvFile: every line, after --env.
        env.extend(std::fs::read_to_string(f)?.lines().map(str::to_string));
    }
    let mounts = args
        .mount
        .iter()
        .map(|m| parse_mount_flag(m))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = OptimizeOptions {
        oci: args.oci,
        period: std::time::Duration::from_secs(args.period),
        entrypoint: parse_json_args("--entrypoint", args.entrypoint.as_deref())?,
        args: parse_json_args("--args", args.args.as_deref())?,
        env,
        cwd: args.cwd,
        user: args.user,
        record_out: args.record_out,
        format,
        compression_level,
        chunk_size,
        registry: RegistryOptions {
            plain_http: args.plain_http,
            ..Default::default()
        },
        no_optimize: args.no_optimize,
        reuse: args.reuse,
        stdin: args.stdin,
        net: NetOptions {
            host: args.net_host,
            nameservers: csv(Some(&args.dns_nameservers)),
            search: csv(args.dns_search_domains.as_deref()),
            options: csv(args.dns_options.as_deref()),
            extra_hosts: csv(args.add_hosts.as_deref()),
        },
        mounts,
        wait_on_signal: args
            .wait_on_signal
            .then(|| std::sync::Arc::new(WorkloadStop::default())),
    };
    use std::sync::atomic::Ordering;
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut err = std::io::stderr();
    let stop = opts.wait_on_signal.clone();
    let run = optimize(cd, &args.source, &args.target, &opts, &mut err);
    tokio::pin!(run);
    // A signal drops the optimize future: its guards delete the container, unmount and
    // remove the temp dir before we return. Only a SIGINT while a `--wait-on-signal` workload
    // runs is passed on instead: it ends the workload and the optimization goes on.
    let manifest = loop {
        tokio::select! {
            r = &mut run => break r?,
            _ = int.recv() => match &stop {
                Some(s) if s.waiting.load(Ordering::SeqCst) => s.notify.notify_one(),
                _ => return Err(OptimizeError::Interrupted("SIGINT").into()),
            },
            _ = term.recv() => return Err(OptimizeError::Interrupted("SIGTERM").into()),
        }
    };
    println!("{}", manifest.digest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ctr-remote").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn accepts_go_ctr_remote_flag_names() {
        let cli = parse(&[
            "-a",
            "/x.sock",
            "-n",
            "ns",
            "i",
            "rpull",
            "--plain-http",
            "-k",
            "-u",
            "me:pw",
            "--label",
            "a=b",
            "--skip-content-verify",
            "--snapshotter",
            "overlayfs",
            "reg/img:1",
        ]);
        assert_eq!(cli.address(), PathBuf::from("/x.sock"));
        assert_eq!(cli.namespace(), "ns");
        let Command::Images {
            command: ImagesCommand::Rpull(r),
        } = cli.command
        else {
            panic!("rpull")
        };
        assert!(r.plain_http && r.skip_verify && r.skip_content_verify);
        assert_eq!(
            (r.user.as_deref(), r.snapshotter.as_deref()),
            (Some("me:pw"), Some("overlayfs"))
        );
        assert_eq!(parse_labels(&r.labels)["a"], "b");

        let cli = parse(&[
            "--address",
            "/y",
            "image",
            "get-toc-digest",
            "--dump-toc",
            "sha256:ab",
        ]);
        let Command::Images {
            command: ImagesCommand::GetTocDigest(g),
        } = cli.command
        else {
            panic!("toc")
        };
        assert!(g.dump_toc && !g.zstdchunked);

        let cli = parse(&[
            "images",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-compression-level",
            "5",
            "--estargz-chunk-size",
            "100000",
            "--estargz-record-in",
            "/r.json",
            "src",
            "dst",
        ]);
        let Command::Images {
            command: ImagesCommand::Convert(c),
        } = cli.command
        else {
            panic!("convert")
        };
        assert!(c.estargz && c.oci);
        assert_eq!(
            (c.estargz_compression_level, c.estargz_chunk_size),
            (5, 100000)
        );
        assert_eq!((c.source.as_str(), c.target.as_str()), ("src", "dst"));
    }

    /// `convert --zstdchunked` with Go's rules: needs --oci, conflicts with --estargz, level 3 by
    /// default, chunk size and record from the eStargz flags unless the zstd ones are given.
    #[test]
    fn zstdchunked_flags_follow_go() {
        let convert = |args: &[&str]| {
            let mut all = vec!["images", "convert"];
            all.extend_from_slice(args);
            all.extend_from_slice(&["a", "b"]);
            let Command::Images {
                command: ImagesCommand::Convert(c),
            } = parse(&all).command
            else {
                panic!("convert")
            };
            c
        };
        let format = |c: &ConvertArgs| {
            layer_format(
                c.estargz,
                c.zstdchunked,
                c.oci,
                c.estargz_compression_level,
                c.estargz_chunk_size,
                &c.zstd,
            )
        };
        let c = convert(&["--zstdchunked", "--oci", "--estargz-chunk-size", "1000"]);
        assert_eq!(format(&c).expect("valid"), (Format::ZstdChunked, 3, 1000));
        let c = convert(&[
            "--zstdchunked",
            "--oci",
            "--zstdchunked-compression-level",
            "19",
            "--zstdchunked-chunk-size",
            "2000",
            "--estargz-chunk-size",
            "1000",
        ]);
        assert_eq!(format(&c).expect("valid"), (Format::ZstdChunked, 19, 2000));
        for bad in [
            &["--zstdchunked"][..],
            &["--zstdchunked", "--oci", "--estargz"],
            &[
                "--zstdchunked",
                "--oci",
                "--zstdchunked-compression-level",
                "23",
            ],
            &[
                "--zstdchunked",
                "--oci",
                "--zstdchunked-compression-level",
                "0",
            ],
        ] {
            assert!(format(&convert(bad)).is_err(), "{bad:?}");
        }
        let c = convert(&["--estargz", "--estargz-compression-level", "10"]);
        assert!(format(&c).is_err());
        let c = convert(&["--estargz"]);
        assert_eq!(format(&c).expect("valid"), (Format::Gzip, 9, 0));
    }

    #[test]
    fn defaults_match_go() {
        let cli = parse(&["images", "convert", "--estargz", "a", "b"]);
        let Command::Images {
            command: ImagesCommand::Convert(c),
        } = cli.command
        else {
            panic!("convert")
        };
        assert_eq!(
            (c.estargz_compression_level, c.estargz_chunk_size, c.oci),
            (9, 0, false)
        );
    }

    #[test]
    fn optimize_takes_go_flags_and_defaults() {
        let cli = parse(&["i", "optimize", "a", "b"]);
        let Command::Images {
            command: ImagesCommand::Optimize(o),
        } = cli.command
        else {
            panic!("optimize")
        };
        assert_eq!(
            (
                o.period,
                o.estargz_compression_level,
                o.dns_nameservers.as_str()
            ),
            (10, 9, "8.8.8.8")
        );
        assert!(!o.oci && !o.net_host && !o.no_optimize && o.record_out.is_none());

        let cli = parse(&[
            "image",
            "optimize",
            "--oci",
            "--period",
            "3",
            "--entrypoint",
            r#"["sh"]"#,
            "--args",
            r#"["-c","true"]"#,
            "--env",
            "A=1",
            "--env",
            "B=2",
            "--record-out",
            "/r.json",
            "--user",
            "1:2",
            "--cwd",
            "/w",
            "--mount",
            "type=bind,src=/a,dst=/b",
            "--net-host",
            "src",
            "dst",
        ]);
        let Command::Images {
            command: ImagesCommand::Optimize(o),
        } = cli.command
        else {
            panic!("optimize")
        };
        assert!(o.oci && o.net_host);
        assert_eq!(o.period, 3);
        assert_eq!(o.env, ["A=1", "B=2"]);
        assert_eq!(
            (o.user.as_deref(), o.cwd.as_deref(), o.source.as_str()),
            (Some("1:2"), Some("/w"), "src")
        );
    }
}
