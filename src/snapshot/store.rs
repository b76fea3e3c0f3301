//! Durable snapshot metadata in redb (`<root>/snapshotter/metadata.db`).
//!
//! Every mutation is one redb write transaction, so after a crash the store holds either the
//! state before or after a Prepare/Commit/Remove, never a mix. Directories are not part of the
//! transaction: callers create them *before* committing (an abort leaves an orphan directory,
//! removed by Cleanup) and remove them *after* committing (a crash leaves an orphan too), so a
//! snapshot in the store always has its directory.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Info, Kind, SnapshotError, Usage};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// Errors of the store itself (disk, database); domain errors are [`SnapshotError`]s.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata database")]
    Db(#[from] redb::Error),
    #[error("metadata file {path}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("corrupt snapshot record {key}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

/// Creates the database file owner-only (0600, as Go's bolt file), or narrows one an older
/// version left readable: snapshot labels name every image on the node.
fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| StoreError::File {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    if f.metadata().map_err(err)?.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    Ok(())
}

macro_rules! impl_from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.into()) }
        }
        impl From<$t> for SnapshotError {
            fn from(e: $t) -> Self { StoreError::from(e).into() }
        }
    )*};
}
impl_from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<StoreError> for SnapshotError {
    fn from(e: StoreError) -> Self {
        SnapshotError::System {
            what: "snapshot metadata".into(),
            source: Box::new(e),
        }
    }
}

/// One stored snapshot. `id` names its directory and never changes (Commit keeps it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: StoredKind,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the Unix epoch.
    pub created: u128,
    pub updated: u128,
    /// Usage captured at Commit (committed snapshots never change).
    pub size: i64,
    pub inodes: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredKind {
    View,
    Active,
    Committed,
}

impl From<StoredKind> for Kind {
    fn from(k: StoredKind) -> Kind {
        match k {
            StoredKind::View => Kind::View,
            StoredKind::Active => Kind::Active,
            StoredKind::Committed => Kind::Committed,
        }
    }
}

impl From<Kind> for StoredKind {
    fn from(k: Kind) -> StoredKind {
        match k {
            Kind::View => StoredKind::View,
            Kind::Active => StoredKind::Active,
            Kind::Committed => StoredKind::Committed,
        }
    }
}

fn to_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn from_nanos(n: u128) -> SystemTime {
    let secs = (n / 1_000_000_000) as u64;
    let nanos = (n % 1_000_000_000) as u32;
    UNIX_EPOCH + Duration::new(secs, nanos)
}

impl Record {
    pub fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_string(),
            parent: self.parent.clone(),
            kind: self.kind.into(),
            labels: self.labels.clone(),
            created: from_nanos(self.created),
            updated: from_nanos(self.updated),
        }
    }

    pub fn is_remote(&self) -> bool {
        self.labels.contains_key(super::REMOTE_LABEL)
    }
}

/// A snapshot and its ancestors, as Mounts needs them.
#[derive(Debug, Clone)]
pub struct Chain {
    pub record: Record,
    /// Ancestors nearest first: (name, record).
    pub parents: Vec<(String, Record)>,
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

fn encode(r: &Record) -> Vec<u8> {
    // Serialising plain owned data to JSON cannot fail.
    serde_json::to_vec(r).unwrap_or_default()
}

fn get_in<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    key: &str,
) -> Result<Option<Record>, SnapshotError> {
    match t.get(key)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

fn require_key(what: &str, key: &str) -> Result<(), SnapshotError> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument(format!(
            "{what} must not be empty"
        )));
    }
    Ok(())
}

/// The metadata store.
pub struct MetaStore {
    db: Database,
}

impl MetaStore {
    /// Opens (or creates) the database at `path`; redb repairs it after an unclean shutdown.
    pub fn open(path: &Path) -> Result<MetaStore, StoreError> {
        private_file(path)?;
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(MetaStore { db })
    }

    /// Creates `key` (kind Active or View) on `parent`. `make_dirs(id)` runs inside the write
    /// transaction, before it commits: if it fails, nothing is recorded.
    pub fn create(
        &self,
        kind: StoredKind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        make_dirs: impl FnOnce(u64) -> Result<(), SnapshotError>,
    ) -> Result<Chain, SnapshotError> {
        require_key("snapshot key", key)?;
        let txn = self.db.begin_write()?;
        let chain = {
            let mut t = txn.open_table(SNAPSHOTS)?;
            let mut meta = txn.open_table(META)?;
            if t.get(key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(key.to_string()));
            }
            let parents = if parent.is_empty() {
                Vec::new()
            } else {
                let p = get_in(&t, parent)?
                    .ok_or_else(|| SnapshotError::NotFound(format!("parent {parent}")))?;
                if p.kind != StoredKind::Committed {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "parent {parent} is not a committed snapshot"
                    )));
                }
                ancestors(&t, parent, p)?
            };
            let id = meta.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(1);
            meta.insert(NEXT_ID, id + 1)?;
            let now = to_nanos(SystemTime::now());
            let record = Record {
                id,
                kind,
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                size: 0,
                inodes: 0,
            };
            t.insert(key, encode(&record).as_slice())?;
            make_dirs(id)?;
            Chain { record, parents }
        };
        txn.commit()?;
        Ok(chain)
    }

    /// The record of `key`, or NotFound.
    pub fn get(&self, key: &str) -> Result<Record, SnapshotError> {
        require_key("snapshot key", key)?;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SNAPSHOTS)?;
        get_in(&t, key)?.ok_or_else(|| SnapshotError::NotFound(key.to_string()))
    }

    /// `key` and all its ancestors.
    pub fn chain(&self, key: &str) -> Result<Chain, SnapshotError> {
        require_key("snapshot key", key)?;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SNAPSHOTS)?;
        let record = get_in(&t, key)?.ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        let parents = if record.parent.is_empty() {
            Vec::new()
        } else {
            let p = get_in(&t, &record.parent)?.ok_or_else(|| {
                SnapshotError::Internal(format!("parent {} of {key} is missing", record.parent))
            })?;
            ancestors(&t, &record.parent, p)?
        };
        Ok(Chain { record, parents })
    }

    /// Turns active `key` into committed `name` (same id, so the same directory), replacing
    /// its labels, in one transaction.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<Record, SnapshotError> {
        require_key("snapshot name", name)?;
        require_key("snapshot key", key)?;
        let txn = self.db.begin_write()?;
        let record = {
            let mut t = txn.open_table(SNAPSHOTS)?;
            let mut r = get_in(&t, key)?.ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
            if r.kind != StoredKind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is a {}, only active snapshots can be committed",
                    kind_name(r.kind)
                )));
            }
            if t.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_string()));
            }
            let now = to_nanos(SystemTime::now());
            r.kind = StoredKind::Committed;
            r.labels = labels;
            r.created = now;
            r.updated = now;
            r.size = usage.size;
            r.inodes = usage.inodes;
            t.remove(key)?;
            t.insert(name, encode(&r).as_slice())?;
            r
        };
        txn.commit()?;
        Ok(record)
    }

    /// Deletes `key` if nothing is built on it; returns its record (the caller removes the
    /// directory afterwards).
    pub fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        require_key("snapshot key", key)?;
        let txn = self.db.begin_write()?;
        let record = {
            let mut t = txn.open_table(SNAPSHOTS)?;
            let r = get_in(&t, key)?.ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
            for item in t.iter()? {
                let (k, v) = item?;
                let child = decode(k.value(), v.value())?;
                if child.parent == key {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "cannot remove snapshot {key}: snapshot {} is based on it",
                        k.value()
                    )));
                }
            }
            t.remove(key)?;
            r
        };
        txn.commit()?;
        Ok(record)
    }

    /// Applies the label changes of `info` named by `field_paths` (containerd's rules).
    pub fn update(&self, info: &Info, field_paths: &[String]) -> Result<Record, SnapshotError> {
        require_key("snapshot name", &info.name)?;
        let txn = self.db.begin_write()?;
        let record = {
            let mut t = txn.open_table(SNAPSHOTS)?;
            let mut r = get_in(&t, &info.name)?
                .ok_or_else(|| SnapshotError::NotFound(info.name.clone()))?;
            apply_field_paths(&mut r.labels, info, field_paths)?;
            r.updated = to_nanos(SystemTime::now());
            t.insert(info.name.as_str(), encode(&r).as_slice())?;
            r
        };
        txn.commit()?;
        Ok(record)
    }

    /// Every snapshot, ordered by name.
    pub fn list(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Runs `f` with the set of ids in use while holding the write lock, so no snapshot is
    /// created or removed meanwhile (Cleanup uses this to pick orphan directories safely).
    pub fn with_ids_locked<T>(
        &self,
        f: impl FnOnce(&HashSet<u64>) -> T,
    ) -> Result<T, SnapshotError> {
        let txn = self.db.begin_write()?;
        let ids = {
            let t = txn.open_table(SNAPSHOTS)?;
            let mut ids = HashSet::new();
            for item in t.iter()? {
                let (k, v) = item?;
                ids.insert(decode(k.value(), v.value())?.id);
            }
            ids
        };
        let out = f(&ids);
        txn.abort()?;
        Ok(out)
    }
}

fn kind_name(k: StoredKind) -> &'static str {
    match k {
        StoredKind::View => "view",
        StoredKind::Active => "active snapshot",
        StoredKind::Committed => "committed snapshot",
    }
}

/// Walks the parent chain starting at (`name`, `first`), nearest first.
fn ancestors<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    name: &str,
    first: Record,
) -> Result<Vec<(String, Record)>, SnapshotError> {
    let mut out = vec![(name.to_string(), first)];
    loop {
        let next = match out.last() {
            Some((_, r)) if !r.parent.is_empty() => r.parent.clone(),
            _ => break,
        };
        if out.len() > 10_000 || out.iter().any(|(n, _)| *n == next) {
            return Err(SnapshotError::Internal(format!(
                "parent chain of {name} loops"
            )));
        }
        let r = get_in(t, &next)?.ok_or_else(|| {
            SnapshotError::Internal(format!("parent {next} is missing from the store"))
        })?;
        out.push((next, r));
    }
    Ok(out)
}

/// containerd's Update rules: only labels are mutable; `labels` replaces all of them,
/// `labels.<key>` sets (or, when absent from `info`, deletes) one.
pub fn apply_field_paths(
    labels: &mut BTreeMap<String, String>,
    info: &Info,
    field_paths: &[String],
) -> Result<(), SnapshotError> {
    if field_paths.is_empty() {
        *labels = info.labels.clone();
        return Ok(());
    }
    for path in field_paths {
        if let Some(key) = path.strip_prefix("labels.") {
            match info.labels.get(key) {
                Some(v) => labels.insert(key.to_string(), v.clone()),
                None => labels.remove(key),
            };
        } else if path == "labels" {
            *labels = info.labels.clone();
        } else {
            return Err(SnapshotError::InvalidArgument(format!(
                "cannot update field {path:?} of snapshot {}: only labels are mutable",
                info.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(&d.path().join("metadata.db")).unwrap();
        (d, s)
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ok(_: u64) -> Result<(), SnapshotError> {
        Ok(())
    }

    #[test]
    fn create_commit_chain_and_ids_are_unique() {
        let (_d, s) = store();
        let a = s
            .create(StoredKind::Active, "a", "", BTreeMap::new(), ok)
            .unwrap();
        s.commit(
            "A",
            "a",
            labels(&[("x", "1")]),
            Usage { size: 5, inodes: 1 },
        )
        .unwrap();
        let b = s
            .create(StoredKind::Active, "b", "A", BTreeMap::new(), ok)
            .unwrap();
        assert_ne!(a.record.id, b.record.id);
        assert_eq!(b.parents.len(), 1);
        s.commit("B", "b", BTreeMap::new(), Usage::default())
            .unwrap();
        let c = s
            .create(StoredKind::View, "c", "B", BTreeMap::new(), ok)
            .unwrap();
        let names: Vec<_> = c.parents.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["B", "A"]);
        let rec = s.get("A").unwrap();
        assert_eq!(rec.kind, StoredKind::Committed);
        assert_eq!(rec.id, a.record.id, "commit keeps the id (and directory)");
        assert_eq!(rec.labels, labels(&[("x", "1")]));
        assert_eq!(rec.size, 5);
        assert!(matches!(s.get("a"), Err(SnapshotError::NotFound(_))));
    }

    #[test]
    fn errors_follow_containerd() {
        let (_d, s) = store();
        assert!(matches!(
            s.create(StoredKind::Active, "", "", BTreeMap::new(), ok),
            Err(SnapshotError::InvalidArgument(_))
        ));
        s.create(StoredKind::Active, "a", "", BTreeMap::new(), ok)
            .unwrap();
        assert!(matches!(
            s.create(StoredKind::Active, "a", "", BTreeMap::new(), ok),
            Err(SnapshotError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create(StoredKind::Active, "x", "nope", BTreeMap::new(), ok),
            Err(SnapshotError::NotFound(_))
        ));
        assert!(matches!(
            s.create(StoredKind::Active, "x", "a", BTreeMap::new(), ok),
            Err(SnapshotError::InvalidArgument(_))
        ));
        s.create(StoredKind::View, "v", "", BTreeMap::new(), ok)
            .unwrap();
        assert!(matches!(
            s.commit("V", "v", BTreeMap::new(), Usage::default()),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.commit("V", "missing", BTreeMap::new(), Usage::default()),
            Err(SnapshotError::NotFound(_))
        ));
        assert!(matches!(
            s.commit("", "a", BTreeMap::new(), Usage::default()),
            Err(SnapshotError::InvalidArgument(_))
        ));
        s.commit("A", "a", BTreeMap::new(), Usage::default())
            .unwrap();
        s.create(StoredKind::Active, "b", "", BTreeMap::new(), ok)
            .unwrap();
        assert!(matches!(
            s.commit("A", "b", BTreeMap::new(), Usage::default()),
            Err(SnapshotError::AlreadyExists(_))
        ));
        s.create(StoredKind::Active, "child", "A", BTreeMap::new(), ok)
            .unwrap();
        let e = s.remove("A").unwrap_err();
        assert!(matches!(e, SnapshotError::FailedPrecondition(_)), "{e}");
        assert!(e.to_string().contains("child"));
        s.remove("child").unwrap();
        s.remove("A").unwrap();
        assert!(matches!(s.remove("A"), Err(SnapshotError::NotFound(_))));
    }

    #[test]
    fn failed_dir_creation_records_nothing() {
        let (_d, s) = store();
        let r = s.create(StoredKind::Active, "a", "", BTreeMap::new(), |_| {
            Err(SnapshotError::Internal("disk full".into()))
        });
        assert!(r.is_err());
        assert!(matches!(s.get("a"), Err(SnapshotError::NotFound(_))));
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("metadata.db");
        {
            let s = MetaStore::open(&path).unwrap();
            s.create(StoredKind::Active, "a", "", labels(&[("k", "v")]), ok)
                .unwrap();
            s.commit("A", "a", labels(&[("k", "v")]), Usage::default())
                .unwrap();
            s.create(StoredKind::Active, "b", "A", BTreeMap::new(), ok)
                .unwrap();
        }
        let s = MetaStore::open(&path).unwrap();
        let all = s.list().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(s.get("A").unwrap().labels, labels(&[("k", "v")]));
        let c = s
            .create(StoredKind::Active, "c", "", BTreeMap::new(), ok)
            .unwrap();
        assert!(
            all.iter().all(|(_, r)| r.id != c.record.id),
            "ids are not reused after reopen"
        );
        let ids = s.with_ids_locked(|ids| ids.len()).unwrap();
        assert_eq!(ids, 3);
    }

    #[test]
    fn update_field_paths() {
        let (_d, s) = store();
        s.create(
            StoredKind::Active,
            "a",
            "",
            labels(&[("keep", "1"), ("drop", "2")]),
            ok,
        )
        .unwrap();
        let info = |l: &[(&str, &str)]| Info {
            name: "a".into(),
            parent: String::new(),
            kind: Kind::Active,
            labels: labels(l),
            created: UNIX_EPOCH,
            updated: UNIX_EPOCH,
        };
        let r = s
            .update(
                &info(&[("new", "3")]),
                &["labels.new".into(), "labels.drop".into()],
            )
            .unwrap();
        assert_eq!(r.labels, labels(&[("keep", "1"), ("new", "3")]));
        let r = s
            .update(&info(&[("only", "x")]), &["labels".into()])
            .unwrap();
        assert_eq!(r.labels, labels(&[("only", "x")]));
        let r = s.update(&info(&[("all", "y")]), &[]).unwrap();
        assert_eq!(r.labels, labels(&[("all", "y")]));
        assert!(matches!(
            s.update(&info(&[]), &["parent".into()]),
            Err(SnapshotError::InvalidArgument(_))
        ));
        let mut missing = info(&[]);
        missing.name = "zz".into();
        assert!(matches!(
            s.update(&missing, &[]),
            Err(SnapshotError::NotFound(_))
        ));
    }
}
