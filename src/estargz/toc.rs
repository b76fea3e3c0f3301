//! `stargz.index.json`: the table of contents, with the Go field names and omit-empty rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Name of the TOC entry, the last tar entry of a stargz blob.
pub const TOC_TAR_NAME: &str = "stargz.index.json";

/// The whole TOC document: `{"version":1,"entries":[…]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    pub version: u32,
    #[serde(default)]
    pub entries: Vec<TocEntry>,
}

/// Entry kinds as spelled in the TOC. An unknown `type` is a parse error, never a default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    Dir,
    #[default]
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// A continuation of the preceding `reg` entry (big files are split into chunks).
    Chunk,
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// One TOC entry. Field names and omit-empty behaviour match Go's `estargz.TOCEntry`,
/// so a TOC we write is byte-for-byte what Go would write for the same entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub size: i64,
    #[serde(rename = "modtime", default, skip_serializing_if = "String::is_empty")]
    pub mod_time: String,
    #[serde(rename = "linkName", default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub mode: i64,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub uid: u32,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub gid: u32,
    #[serde(rename = "userName", default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(rename = "groupName", default, skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub offset: i64,
    #[serde(rename = "innerOffset", default, skip_serializing_if = "is_zero_i64")]
    pub inner_offset: i64,
    #[serde(rename = "devMajor", default, skip_serializing_if = "is_zero_u32")]
    pub dev_major: u32,
    #[serde(rename = "devMinor", default, skip_serializing_if = "is_zero_u32")]
    pub dev_minor: u32,
    /// Extended attributes; values are base64 in JSON (Go's `[]byte` encoding).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", with = "xattrs_b64")]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero_i64")]
    pub chunk_offset: i64,
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero_i64")]
    pub chunk_size: i64,
    #[serde(rename = "chunkDigest", default, skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
}

mod xattrs_b64 {
    use std::collections::BTreeMap;

    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        let enc: BTreeMap<&str, String> = m.iter().map(|(k, v)| (k.as_str(), STANDARD.encode(v))).collect();
        enc.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let enc = Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default();
        enc.into_iter()
            .map(|(k, v)| {
                let bytes = STANDARD.decode(v.as_bytes()).map_err(|e| D::Error::custom(format!("xattr {k:?}: {e}")))?;
                Ok((k, bytes))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_entries() {
        let json = r#"{"version":1,"entries":[
            {"name":"bin/","type":"dir","modtime":"2020-01-01T00:00:00Z","mode":493},
            {"name":"bin/x","type":"reg","size":5,"offset":100,"digest":"sha256:aa","chunkDigest":"sha256:aa","xattrs":{"user.a":"aGk="}},
            {"name":"bin/y","type":"chunk","offset":200,"chunkOffset":4194304}
        ]}"#;
        let toc: Toc = serde_json::from_str(json).expect("parse");
        assert_eq!(toc.entries.len(), 3);
        assert_eq!(toc.entries[1].xattrs["user.a"], b"hi");
        assert_eq!(toc.entries[2].kind, EntryType::Chunk);
        let back = serde_json::to_string(&toc.entries[1]).expect("ser");
        assert!(back.contains(r#""xattrs":{"user.a":"aGk="}"#), "{back}");
        assert!(!back.contains("uid"), "zero fields are omitted: {back}");
    }

    #[test]
    fn unknown_type_is_an_error() {
        let json = r#"{"version":1,"entries":[{"name":"x","type":"socket"}]}"#;
        assert!(serde_json::from_str::<Toc>(json).is_err());
    }
}
