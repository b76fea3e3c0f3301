//! proto ↔ domain conversions, including the one error → `tonic::Status` mapping.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::types as pbt;
use crate::snapshot::{Info, Kind, Mount, SnapshotError};

/// Maps a domain error to the gRPC code containerd turns back into its `errdefs`; the message
/// is the whole chain, as containerd shows it to the user.
pub fn status(e: SnapshotError) -> tonic::Status {
    let msg = crate::untrusted::chain(&e).to_string();
    match e {
        SnapshotError::NotFound(_) => tonic::Status::not_found(msg),
        SnapshotError::AlreadyExists(_) => tonic::Status::already_exists(msg),
        SnapshotError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
        SnapshotError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
        SnapshotError::Unavailable(_) => tonic::Status::unavailable(msg),
        SnapshotError::Internal(_) | SnapshotError::System { .. } => tonic::Status::internal(msg),
    }
}

pub fn labels_in(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

pub fn labels_out(m: BTreeMap<String, String>) -> HashMap<String, String> {
    m.into_iter().collect()
}

pub fn mounts_out(m: Vec<Mount>) -> Vec<pbt::Mount> {
    m.into_iter()
        .map(|m| pbt::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn kind_out(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn kind_in(k: i32) -> Kind {
    match pb::Kind::try_from(k) {
        Ok(pb::Kind::View) => Kind::View,
        Ok(pb::Kind::Committed) => Kind::Committed,
        _ => Kind::Active,
    }
}

fn ts_out(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn ts_in(t: Option<prost_types::Timestamp>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(UNIX_EPOCH)
}

pub fn info_out(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent,
        kind: kind_out(i.kind) as i32,
        created_at: Some(ts_out(i.created)),
        updated_at: Some(ts_out(i.updated)),
        labels: labels_out(i.labels),
    }
}

pub fn info_in(i: pb::Info) -> Info {
    Info {
        name: i.name,
        parent: i.parent,
        kind: kind_in(i.kind),
        labels: labels_in(i.labels),
        created: ts_in(i.created_at),
        updated: ts_in(i.updated_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        use tonic::Code;
        let cases = [
            (SnapshotError::NotFound("k".into()), Code::NotFound),
            (
                SnapshotError::AlreadyExists("k".into()),
                Code::AlreadyExists,
            ),
            (
                SnapshotError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (
                SnapshotError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (SnapshotError::Unavailable("x".into()), Code::Unavailable),
            (SnapshotError::Internal("x".into()), Code::Internal),
        ];
        for (e, c) in cases {
            assert_eq!(status(e).code(), c);
        }
        assert_eq!(
            status(SnapshotError::NotFound("abc".into())).message(),
            "snapshot abc not found"
        );
        let disk = SnapshotError::System {
            what: "creating snapshot directory".into(),
            source: Box::new(std::io::Error::other("No space left on device")),
        };
        let s = status(disk);
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(
            s.message(),
            "creating snapshot directory: No space left on device"
        );
    }

    #[test]
    fn info_round_trip() {
        let i = Info {
            name: "n".into(),
            parent: "p".into(),
            kind: Kind::Committed,
            labels: [("a".to_string(), "b".to_string())].into_iter().collect(),
            created: UNIX_EPOCH + std::time::Duration::new(100, 5),
            updated: UNIX_EPOCH + std::time::Duration::new(200, 7),
        };
        assert_eq!(info_in(info_out(i.clone())), i);
    }
}
