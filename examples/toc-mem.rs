//! Memory cost of opening a layer: peak and resident memory of `open_layer` (footer → TOC →
//! index → inode table) on one eStargz blob, or on a gzip layer converted first.
//!
//!   cargo run --release --example toc-mem -- BLOB [--convert]
//!
//! Prints VmHWM / VmRSS (KiB) before and after, so a change to the TOC path can be measured.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts live heap bytes and their peak, to tell real use from allocator slack in RSS.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same layout as asked.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: p was allocated by System with l.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn status(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: toc-mem BLOB [--convert]"))?;
    let mut blob = std::path::PathBuf::from(path);
    if args.iter().any(|a| a == "--convert") {
        let out = std::env::temp_dir().join("toc-mem.estargz");
        let input =
            flate2::read::GzDecoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
        stargz::estargz::build(input, std::fs::File::create(&out)?, &Default::default())?;
        blob = out;
        println!("converted to {}", blob.display());
    }
    // Start from a clean high-water mark (Linux: writing 5 to clear_refs resets VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (hwm0, rss0) = (status("VmHWM:"), status("VmRSS:"));
    let live0 = LIVE.load(Ordering::Relaxed);
    PEAK.store(live0, Ordering::Relaxed);
    let src: Arc<dyn stargz::LayerSource> = Arc::new(stargz::FileSource::open(&blob)?);
    let dir = tempfile::tempdir()?;
    let spec = stargz::LayerSpec {
        digest: "sha256:test".into(),
        source: src,
        toc_digest: None,
    };
    let t = std::time::Instant::now();
    let reader = stargz::open_layer(spec, dir.path(), &Default::default(), Default::default())?;
    let took = t.elapsed();
    let (hwm1, rss1) = (status("VmHWM:"), status("VmRSS:"));
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
    let trimmed = status("VmRSS:");
    println!(
        "heap: live +{} KiB, peak +{} KiB",
        (LIVE.load(Ordering::Relaxed) - live0) / 1024,
        (PEAK.load(Ordering::Relaxed) - live0) / 1024
    );
    println!(
        "entries {} chunks {}  open {:?}  before: hwm {hwm0} rss {rss0} KiB  after: hwm {hwm1} (+{}) rss {rss1} (+{}) KiB, after malloc_trim +{} KiB",
        reader.table().nodes().len(),
        reader.table().blob_order.len(),
        took,
        hwm1.saturating_sub(rss0),
        rss1.saturating_sub(rss0),
        trimmed.saturating_sub(rss0)
    );
    println!(
        "size_of Node {} Chunk {}",
        std::mem::size_of::<stargz::Node>(),
        std::mem::size_of::<stargz::Chunk>()
    );
    let t = reader.table();
    let kids: usize = t.nodes().iter().map(|n| n.child_count()).sum();
    let chunks: usize = t.nodes().iter().map(|n| t.chunks(n).len()).sum();
    let xattrs: usize = t.nodes().iter().map(|n| t.xattrs(n).count()).sum();
    let links: usize = t.nodes().iter().map(|n| t.link_name(n).len()).sum();
    println!(
        "children {kids} chunks {chunks} xattrs {xattrs} link bytes {links}; table vectors {} KiB",
        t.heap_bytes() / 1024
    );
    Ok(())
}
#[allow(dead_code)]
fn sizes() {}
