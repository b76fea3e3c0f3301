//! The access record of `image optimize`: which layer each accessed file belongs to, and the
//! record file format shared with Go's `ctr-remote` (`--record-out` / `--estargz-record-in`).
//!
//! Attribution is Go's `ImageRecorder.Record`, entry for entry, so both tools give the same
//! record for the same accesses: a path belongs to the top-most layer whose tar holds an entry
//! of that name; a whiteout of the name, or an opaque marker in its parent directory, in a
//! layer above that means the file was deleted and nothing is recorded. The paths given here are
//! what the kernel reports for an opened file, i.e. symlinks already followed and a hardlink
//! under the name it was opened by, as in Go (whose fanotify reports the same paths).

use std::collections::HashSet;
use std::io::Write;

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";

/// Most tar entries the indexes of one image may hold together: a bound on memory for hostile
/// layers (a real image has tens of thousands).
pub(crate) const MAX_INDEX_ENTRIES: usize = 4_000_000;

/// Go's `cleanEntryName`: `path.Clean("/" + name)` without the leading slash.
pub(crate) fn clean_entry_name(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// Why an accessed path was not recorded (Go logs these at debug level and moves on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Skip {
    Empty,
    Deleted,
    ParentDeleted,
    NotInImage,
}

/// One line of a record file (Go `recorder.Entry`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Entry {
    pub path: String,
    #[serde(
        rename = "manifestDigest",
        skip_serializing_if = "String::is_empty",
        default
    )]
    pub manifest_digest: String,
    #[serde(
        rename = "layerIndex",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub layer_index: Option<usize>,
}

/// Per-layer sets of entry names, and the record being built in first-access order.
#[derive(Debug, Default)]
pub(crate) struct ImageRecorder {
    index: Vec<HashSet<String>>,
    manifest_digest: String,
    seen: HashSet<String>,
    entries: Vec<Entry>,
}

impl ImageRecorder {
    /// `index[i]` holds the cleaned names of layer `i`'s tar entries (bottom layer first).
    pub(crate) fn new(manifest_digest: &str, index: Vec<HashSet<String>>) -> Self {
        Self {
            index,
            manifest_digest: manifest_digest.to_string(),
            ..Self::default()
        }
    }

    /// The layer `name` belongs to, as Go's `ImageRecorder.Record` decides it.
    pub(crate) fn layer_of(&self, name: &str) -> Result<usize, Skip> {
        let name = clean_entry_name(name);
        if name.is_empty() {
            return Err(Skip::Empty);
        }
        let (dir, base) = match name.rsplit_once('/') {
            Some((d, b)) => (d, b),
            None => ("", name.as_str()),
        };
        let wh = clean_entry_name(&format!("{dir}/{WHITEOUT_PREFIX}{base}"));
        let wh_dir = clean_entry_name(&format!("{dir}/{WHITEOUT_OPAQUE}"));
        for (i, files) in self.index.iter().enumerate().rev() {
            if files.contains(&name) {
                return Ok(i);
            }
            if files.contains(&wh) {
                return Err(Skip::Deleted);
            }
            if files.contains(&wh_dir) {
                return Err(Skip::ParentDeleted);
            }
        }
        Err(Skip::NotInImage)
    }

    /// Records an access; only the first access of a path is kept (Go writes every event and
    /// its reader drops repeats, so the two files read the same).
    pub(crate) fn record(&mut self, name: &str) -> Result<(), Skip> {
        let layer = self.layer_of(name)?;
        let path = clean_entry_name(name);
        if self.seen.insert(path.clone()) {
            self.entries.push(Entry {
                path,
                manifest_digest: self.manifest_digest.clone(),
                layer_index: Some(layer),
            });
        }
        Ok(())
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Files recorded in layer `i`, in first-access order.
    pub(crate) fn files_of_layer(&self, i: usize) -> usize {
        self.entries
            .iter()
            .filter(|e| e.layer_index == Some(i))
            .count()
    }

    /// Writes the record as Go's `json.Encoder` does: one JSON object per line.
    pub(crate) fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        for e in &self.entries {
            serde_json::to_writer(&mut *w, e)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn clean_matches_go_path_clean() {
        assert_eq!(clean_entry_name("./usr/bin/../lib//x"), "usr/lib/x");
        assert_eq!(clean_entry_name("/etc/"), "etc");
        assert_eq!(clean_entry_name("../../etc/passwd"), "etc/passwd");
        assert_eq!(clean_entry_name("/"), "");
    }

    #[test]
    fn upper_layer_shadows_and_whiteouts_delete() {
        let r = ImageRecorder::new(
            "sha256:m",
            vec![
                set(&["etc", "etc/a", "etc/b", "lib", "lib/x", "opt", "opt/y"]),
                set(&["etc", "etc/a", "etc/.wh.b", "opt", "opt/.wh..wh..opq"]),
            ],
        );
        assert_eq!(r.layer_of("/etc/a"), Ok(1));
        assert_eq!(r.layer_of("lib/x"), Ok(0));
        assert_eq!(r.layer_of("/etc/b"), Err(Skip::Deleted));
        assert_eq!(r.layer_of("/opt/y"), Err(Skip::ParentDeleted));
        assert_eq!(r.layer_of("/tmp/new"), Err(Skip::NotInImage));
        assert_eq!(r.layer_of("/"), Err(Skip::Empty));
    }

    #[test]
    fn record_keeps_first_access_and_writes_go_lines() {
        let mut r = ImageRecorder::new("sha256:m", vec![set(&["a", "b"]), set(&["c"])]);
        for p in ["/c", "/a", "/c", "/nope", "/b", "/a"] {
            let _ = r.record(p);
        }
        let mut out = Vec::new();
        r.write_to(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"path\":\"c\",\"manifestDigest\":\"sha256:m\",\"layerIndex\":1}\n\
             {\"path\":\"a\",\"manifestDigest\":\"sha256:m\",\"layerIndex\":0}\n\
             {\"path\":\"b\",\"manifestDigest\":\"sha256:m\",\"layerIndex\":0}\n"
        );
        assert_eq!((r.files_of_layer(0), r.files_of_layer(1)), (2, 1));
    }
}
