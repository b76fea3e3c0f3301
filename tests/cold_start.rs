//! Issue 11: a cold, import-heavy Python start through our daemon with the registry behind the
//! slow link (100 Mbit, 20 ms RTT) needs far fewer blocking registry requests than it reads files.
//! Without read-ahead each imported module costs about one range request; with it, a miss also
//! brings the files that follow in blob order (the rest of the same `__pycache__`), so the count
//! of blob GETs the registry answered during `ctr run` must stay far below the number of `.pyc`
//! and `.so` files the imports loaded. The extension modules among them name libraries of the
//! base layer (`libssl`, `libsqlite3`, ...), which the daemon must find and fetch ahead of the
//! loader. Needs root (network namespace, FUSE, containerd), as CI has.

mod common;
mod testbed;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_success, wait_until, Containerd, ContainerdOpts, Daemon};
use testbed::SlowLink;

/// Standard-library modules of bookworm's minbase `python3` (3.11), across most packages.
const IMPORTS: &str = "json email.parser email.mime.text email.mime.multipart email.utils \
    http.client http.server http.cookies http.cookiejar urllib.request urllib.robotparser \
    xml.dom.minidom xml.etree.ElementTree xml.sax.saxutils xmlrpc.client logging.handlers \
    logging.config argparse decimal fractions statistics difflib csv configparser sqlite3 asyncio \
    concurrent.futures unittest unittest.mock multiprocessing.pool subprocess queue socketserver \
    ssl hashlib hmac secrets uuid zipfile tarfile gzip bz2 lzma shutil tempfile glob pathlib \
    pickle shelve dbm pprint textwrap gettext calendar zoneinfo dataclasses typing inspect dis ast \
    tokenize traceback pdb cProfile pstats timeit trace doctest optparse platform sysconfig \
    importlib.metadata importlib.resources pkgutil runpy html.parser mimetypes base64 quopri \
    wsgiref.simple_server ftplib poplib imaplib smtplib selectors mmap ctypes curses rlcompleter \
    cmd shlex sched ipaddress filecmp fileinput netrc plistlib tomllib graphlib colorsys wave \
    zipapp compileall py_compile pydoc";

/// Imports [`IMPORTS`] and prints the number of modules, then how many of them were loaded from
/// a file (a `.pyc`, a `.py` without one, or an extension `.so`): each is a file the start read.
fn python_code() -> String {
    format!(
        "import sys, importlib, importlib.machinery as m\n\
         for n in {IMPORTS:?}.split(): importlib.import_module(n)\n\
         L = (m.SourceFileLoader, m.SourcelessFileLoader, m.ExtensionFileLoader)\n\
         f = sum(isinstance(getattr(getattr(v, '__spec__', None), 'loader', None), L) \
         for v in list(sys.modules.values()))\n\
         print(len(sys.modules), f)\n"
    )
}

/// The repository's `scripts/rootfs.sh` (cached debootstrap rootfs and OCI layouts).
fn rootfs_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rootfs.sh")
}

/// Runs `cmd`, panicking with its output unless it succeeds; returns stdout.
fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    assert_success(out, what)
}

/// Our `ctr-remote ARGS...` against `ctrd` (namespace `default`).
fn ctr_remote(ctrd: &Containerd, args: &[&str]) -> String {
    run_ok(
        &mut ctrd.ctr_remote_cmd(env!("CARGO_BIN_EXE_ctr-remote"), "default", args),
        &format!("ctr-remote {args:?}"),
    )
}

/// Puts the cached python image (3 layers), converted to eStargz without optimization by our
/// `ctr-remote`, into the link's registry as `cold/python:esgz`; returns its reference through
/// the link. The layers never cross the link: the gzip image is imported into a build
/// containerd from its OCI layout, and the conversion is exported and pushed from inside the
/// namespace.
fn push_estargz_python(link: &SlowLink, work: &Path) -> String {
    let oci = work.join("oci");
    run_ok(
        Command::new("bash")
            .arg(rootfs_script())
            .arg("oci")
            .arg(&oci),
        "rootfs.sh oci",
    );
    let oci_tar = work.join("oci.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&oci)
            .arg("-cf")
            .arg(&oci_tar)
            .arg("."),
        "tar of the OCI layout",
    );
    let build = Containerd::start(ContainerdOpts::default());
    let base = "cold.test/python";
    let tar = oci_tar.to_str().expect("utf-8 path");
    build.ctr_ok(&["image", "import", "--no-unpack", "--base-name", base, tar]);
    let esgz = format!("{base}:esgz");
    ctr_remote(
        &build,
        &[
            "image",
            "convert",
            "--estargz",
            "--oci",
            &format!("{base}:latest"),
            &esgz,
        ],
    );
    let esgz_tar = work.join("esgz.tar");
    build.ctr_ok(&[
        "image",
        "export",
        "--skip-manifest-json",
        esgz_tar.to_str().expect("utf-8 path"),
        &esgz,
    ]);
    drop(build);
    link.exec(&[
        "skopeo",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci-archive:{}", esgz_tar.display()),
        "docker://127.0.0.1:5000/cold/python:esgz",
    ])
    .unwrap_or_else(|e| panic!("push the eStargz image inside the namespace: {e:#}"));
    format!("{}/cold/python:esgz", link.addr())
}

/// Waits until the registry has answered nothing new for 600 ms: read-ahead that the run's
/// misses started may land after the container exited, and counts too.
fn settled_blob_gets(link: &SlowLink) -> usize {
    let sample = || {
        (
            link.blob_gets().expect("registry log"),
            link.served_bytes().expect("link stats"),
        )
    };
    let mut last = sample();
    let mut quiet = Instant::now();
    wait_until(Duration::from_secs(15), || {
        let now = sample();
        if now != last {
            last = now;
            quiet = Instant::now();
        }
        quiet.elapsed() >= Duration::from_millis(600)
    });
    last.0
}

#[test]
fn cold_python_start_needs_far_fewer_requests_than_files() {
    let started = Instant::now();
    common::require_tool("skopeo");
    common::require_tool("tar");
    // Dropped last: torn down after containerd and the daemon, also on panic.
    let link = SlowLink::up("100mbit", 10).expect("slow link up");
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = push_estargz_python(&link, tmp.path());
    let built = started.elapsed();

    // Only what the container reads reaches the registry: no prefetch, no background fetch.
    let root = tmp.path().join("root");
    let sock = tmp.path().join("stargz.sock");
    let cfg = tmp.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "noprefetch = true\nno_background_fetch = true\n\n\
             [[resolver.host.\"{addr}\".mirrors]]\nhost = \"{addr}\"\ninsecure = true\n",
            addr = link.addr()
        ),
    )
    .expect("write daemon config");
    let daemon = Daemon::start(
        &root,
        &sock,
        &["--config", cfg.to_str().expect("utf-8 path")],
    );
    let ctrd = Containerd::start(ContainerdOpts {
        stargz_socket: Some(sock.clone()),
        stargz_root: Some(root.clone()),
        ..Default::default()
    });
    ctrd.wait_stargz_ready(Duration::from_secs(30));
    ctr_remote(&ctrd, &["image", "rpull", "--plain-http", &image]);
    let fuse = common::mounts_under(&root).len();
    assert!(
        fuse >= 3,
        "the image's 3 layers should be mounted remotely below {}, found {fuse} mounts; daemon log:\n{}",
        root.display(),
        daemon.log()
    );

    let (gets_before, served_before) = (
        settled_blob_gets(&link),
        link.served_bytes().expect("link stats"),
    );
    let t = Instant::now();
    let out = ctrd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "stargz",
        &image,
        "cold-start",
        "python3",
        "-c",
        &python_code(),
    ]);
    let run_time = t.elapsed();
    let requests = settled_blob_gets(&link) - gets_before;
    let served = link.served_bytes().expect("link stats") - served_before;

    let counts: Vec<usize> = out
        .split_whitespace()
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("python printed {out:?}"))
        })
        .collect();
    let [modules, files] = counts[..] else {
        panic!("python printed {out:?}");
    };
    eprintln!(
        "cold start: {modules} modules, {files} loaded from files; {requests} blob requests, \
         {served} bytes served during `ctr run` ({run_time:?}); image ready after {built:?}"
    );
    let fetches = range_fetches(&daemon.log());
    eprintln!("{fetches}");
    assert!(
        modules > 120 && files > 120,
        "the imports should load well over 120 modules from files: {modules} modules, {files} from files"
    );
    assert!(
        requests > 0,
        "a cold start must fetch something: is the registry log ({}) being written?",
        link.state_dir().join("registry.log").display()
    );
    // Here 31 requests (45–55 before libraries were fetched ahead: ~1 per 6 files); on CI's slower machine the daemon measured the link
    // at about half its rate (its debug build decodes and hashes slower), so read-ahead spans
    // were half as long: 63–65 requests when reproduced at 50 Mbit. Without read-ahead: ~290.
    assert!(
        requests * 3 <= files,
        "{requests} blocking blob requests for {files} files read ({modules} modules): \
         read-ahead should make that far fewer than one per file; the daemon's fetches:\n{fetches}"
    );

    // The extension modules of ssl, sqlite3, lzma and bz2 (python's layer) need libraries of
    // the base layer: once their ELF headers are read, the daemon looks the libraries up and
    // fetches those not yet cached, ahead of the loader.
    let needed = libraries_needed(&daemon.log());
    let wanted = [
        "libssl.so.3",
        "libcrypto.so.3",
        "libsqlite3.so.0",
        "liblzma.so.5",
        "libbz2.so.1.0",
    ];
    for lib in wanted {
        assert!(
            needed.iter().any(|(l, _)| l == lib),
            "{lib} should have been found for the loader; found: {needed:?}"
        );
    }
    let fetched = needed
        .iter()
        .filter(|(l, f)| *f && wanted.contains(&l.as_str()))
        .count();
    assert!(
        fetched >= 3,
        "most of {wanted:?} should have been fetched ahead (the rest was cached already): {needed:?}"
    );

    drop(ctrd);
    drop(daemon);
    let left = common::mounts_under(&root);
    assert!(
        left.is_empty(),
        "mounts left below the daemon root: {left:?}"
    );
    eprintln!("whole test {:?}", started.elapsed());
}

/// The libraries the daemon looked up for the loader (its debug events): name, and whether it
/// fetched them (false: cached already).
fn libraries_needed(log: &str) -> Vec<(String, bool)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "library needed")
        .filter_map(|v| {
            let f = &v["fields"];
            Some((f["library"].as_str()?.to_owned(), f["fetch"].as_bool()?))
        })
        .collect()
}

/// The daemon's "range fetched" debug events, one line each (bytes, chunks, time, window, link
/// estimate): tells from a failure whether the link estimate or the read-ahead window kept the
/// requests small.
fn range_fetches(log: &str) -> String {
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "range fetched")
        .collect();
    let mut out = format!("{} ranges fetched by the daemon:\n", events.len());
    for v in events {
        let f = &v["fields"];
        out += &format!(
            "  {:>9} B {:>4} chunks {:>4} ms window {} {}\n",
            f["len"], f["chunks"], f["elapsed_ms"], f["window"], f["link"]
        );
    }
    out
}
