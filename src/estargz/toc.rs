//! `stargz.index.json`: the table of contents, with the Go field names and omit-empty rules.

use std::collections::BTreeMap;

use std::io::Read as _;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::footer::Format;
use super::{EstargzError, Result};

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
    #[serde(
        rename = "groupName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
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
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "xattrs_b64"
    )]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero_i64")]
    pub chunk_offset: i64,
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero_i64")]
    pub chunk_size: i64,
    #[serde(
        rename = "chunkDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
}

mod xattrs_b64 {
    use std::collections::BTreeMap;

    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let enc: BTreeMap<&str, String> = m
            .iter()
            .map(|(k, v)| (k.as_str(), STANDARD.encode(v)))
            .collect();
        enc.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let enc = Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default();
        enc.into_iter()
            .map(|(k, v)| {
                let bytes = STANDARD.decode(v.as_bytes()).map_err(|e| {
                    D::Error::custom(format!("xattr {:?}: {e}", crate::untrusted::clip(&k)))
                })?;
                Ok((k, bytes))
            })
            .collect()
    }
}

/// Largest uncompressed TOC JSON we accept (a million-file layer is ~300 MiB of JSON; bigger is
/// treated as hostile rather than risking the daemon's memory).
pub const MAX_TOC_JSON_SIZE: u64 = 256 << 20;
/// Largest compressed TOC member we fetch.
pub const MAX_TOC_COMPRESSED_SIZE: u64 = 256 << 20;

/// Parses a blob's TOC: the bytes the footer points at ([`super::TocLocation::toc_range`]).
/// For eStargz a gzip member holding one tar entry `stargz.index.json`; for zstd:chunked a zstd
/// frame of the JSON alone. Returns the TOC and its digest, `sha256:` of the uncompressed JSON.
pub fn parse_toc_member(member: &[u8], format: Format) -> Result<(Toc, String)> {
    let mut entries = Vec::new();
    let (version, digest) = parse_toc_member_with(member, format, |e| {
        entries.push(e);
        Ok(())
    })?;
    Ok((Toc { version, entries }, digest))
}

/// [`parse_toc_member`] without materializing the TOC: each entry goes to `on_entry` as soon
/// as it is parsed (an error from it stops the parse), so a caller that builds its own
/// structure never holds the JSON or the entry list. Returns the TOC version and digest; the
/// digest is known only at the end, so the caller must check it before using what it built.
pub fn parse_toc_member_with(
    member: &[u8],
    format: Format,
    on_entry: impl FnMut(TocEntry) -> Result<()>,
) -> Result<(u32, String)> {
    if member.len() as u64 > MAX_TOC_COMPRESSED_SIZE {
        return Err(EstargzError::TocTooLarge {
            size: member.len() as u64,
            limit: MAX_TOC_COMPRESSED_SIZE,
        });
    }
    match format {
        Format::Gzip => {
            // One gzip member, like Go's `Multistream(false)`; its tar headers go through our
            // bounded reader, never the `tar` crate, which would read any long name or PAX
            // record whole.
            let mut gz = flate2::read::GzDecoder::new(member);
            let header = super::tar_header::read_file_header(&mut gz, "TOC member")?;
            if header.name != TOC_TAR_NAME.as_bytes() {
                return Err(EstargzError::MalformedToc(format!(
                    "TOC tar entry is {:?}, expected {TOC_TAR_NAME:?}",
                    crate::untrusted::clip_bytes(&header.name)
                )));
            }
            let size = header.size;
            if size > MAX_TOC_JSON_SIZE {
                return Err(EstargzError::TocTooLarge {
                    size,
                    limit: MAX_TOC_JSON_SIZE,
                });
            }
            let (version, digest, read) = parse_json((&mut gz).take(size), on_entry)?;
            if read < size {
                return Err(EstargzError::MalformedToc("TOC JSON truncated".into()));
            }
            Ok((version, digest))
        }
        Format::ZstdChunked => {
            let zstd = super::chunk::zstd_reader(member)
                .map_err(|e| EstargzError::MalformedToc(format!("zstd: {e}")))?;
            // The JSON's size is known only at its end: read one byte past the limit to tell
            // a TOC over it from one that ends there.
            let (version, digest, _) = parse_json(zstd.take(MAX_TOC_JSON_SIZE + 1), on_entry)?;
            Ok((version, digest))
        }
    }
}

/// Parses TOC JSON from `json` as it is decompressed, hashing it on the way. Returns the
/// version, the digest and how many bytes were read; more than [`MAX_TOC_JSON_SIZE`] is an
/// error.
fn parse_json<R: std::io::Read>(
    json: R,
    on_entry: impl FnMut(TocEntry) -> Result<()>,
) -> Result<(u32, String, u64)> {
    // The JSON is parsed as it is decompressed and hashed: a layer's TOC JSON is several times
    // its compressed size (megabytes for a rootfs), and holding it whole next to the parsed
    // entries was the daemon's peak memory at mount.
    let mut hashed = HashingReader {
        inner: json,
        hasher: sha2::Sha256::new(),
        read: 0,
    };
    let mut visitor = TocVisitor {
        on_entry,
        failed: None,
    };
    let parsed = {
        let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(
            64 << 10,
            &mut hashed,
        ));
        serde::Deserializer::deserialize_map(&mut de, &mut visitor)
            .and_then(|v| de.end().map(|()| v))
    };
    if hashed.read > MAX_TOC_JSON_SIZE {
        return Err(EstargzError::TocTooLarge {
            size: hashed.read,
            limit: MAX_TOC_JSON_SIZE,
        });
    }
    let version = match (parsed, visitor.failed.take()) {
        (_, Some(e)) => return Err(e),
        (Err(e), None) => return Err(e.into()),
        (Ok(v), None) => v,
    };
    Ok((
        version,
        format!("sha256:{}", hex::encode(hashed.hasher.finalize())),
        hashed.read,
    ))
}

/// Visits `{"version": N, "entries": [...]}` like `Toc`'s derived `Deserialize` (version
/// required, unknown keys ignored, duplicates refused), handing each entry to `on_entry`.
struct TocVisitor<F> {
    on_entry: F,
    /// The callback's own error (serde's error type can carry only a message).
    failed: Option<EstargzError>,
}

impl<'de, F: FnMut(TocEntry) -> Result<()>> serde::de::Visitor<'de> for &mut TocVisitor<F> {
    type Value = u32;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a TOC object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<u32, A::Error> {
        use serde::de::Error as _;
        let (mut version, mut seen_entries) = (None, false);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "version" if version.is_some() => return Err(A::Error::duplicate_field("version")),
                "version" => version = Some(map.next_value::<u32>()?),
                "entries" if seen_entries => return Err(A::Error::duplicate_field("entries")),
                "entries" => {
                    seen_entries = true;
                    map.next_value_seed(EntriesSeed(&mut *self))?;
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        version.ok_or_else(|| A::Error::missing_field("version"))
    }
}

/// The `entries` array: `null` (Go's empty slice) or a sequence, streamed entry by entry.
struct EntriesSeed<'a, F>(&'a mut TocVisitor<F>);

impl<'de, F: FnMut(TocEntry) -> Result<()>> serde::de::DeserializeSeed<'de> for EntriesSeed<'_, F> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: FnMut(TocEntry) -> Result<()>> serde::de::Visitor<'de> for EntriesSeed<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of TOC entries")
    }

    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<(), A::Error> {
        use serde::de::Error as _;
        while let Some(e) = seq.next_element::<TocEntry>()? {
            if let Err(err) = (self.0.on_entry)(e) {
                let msg = err.to_string();
                self.0.failed = Some(err);
                return Err(A::Error::custom(msg));
            }
        }
        Ok(())
    }
}

/// Hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    read: u64,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .inner
            .read(buf)
            .map_err(|e| std::io::Error::new(e.kind(), format!("reading TOC JSON: {e}")))?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Checks a computed TOC digest against the expected one (`sha256:<hex>`, case-insensitive hex).
pub fn verify_toc_digest(actual: &str, expected: &str) -> Result<()> {
    let want = super::parse_sha256(expected)?;
    let got = super::parse_sha256(actual)?;
    if want != got {
        return Err(EstargzError::TocDigestMismatch {
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        });
    }
    Ok(())
}

/// Serializes the TOC exactly as Go's `json.MarshalIndent(toc, "", "\t")` does: tab indent,
/// `": "` separators, struct field order, and Go's HTML-safe escaping of `<`, `>`, `&`,
/// U+2028 and U+2029. Identical entries therefore give identical bytes and TOC digests.
pub fn to_go_json(toc: &Toc) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256 * toc.entries.len() + 64);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter::new());
    toc.serialize(&mut ser)?;
    Ok(out)
}

/// serde_json's pretty printer with Go's string escaping.
struct GoFormatter(serde_json::ser::PrettyFormatter<'static>);

impl GoFormatter {
    fn new() -> Self {
        Self(serde_json::ser::PrettyFormatter::with_indent(b"\t"))
    }
}

macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        $(fn $name<W: ?Sized + std::io::Write>(&mut self, w: &mut W $(, $arg: $ty)*) -> std::io::Result<()> {
            self.0.$name(w $(, $arg)*)
        })*
    };
}

impl serde_json::ser::Formatter for GoFormatter {
    forward! {
        begin_array();
        end_array();
        begin_array_value(first: bool);
        end_array_value();
        begin_object();
        end_object();
        begin_object_key(first: bool);
        begin_object_value();
        end_object_value();
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let esc = match c {
                '<' => "\\u003c",
                '>' => "\\u003e",
                '&' => "\\u0026",
                '\u{2028}' => "\\u2028",
                '\u{2029}' => "\\u2029",
                _ => continue,
            };
            w.write_all(&fragment.as_bytes()[start..i])?;
            w.write_all(esc.as_bytes())?;
            start = i + c.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
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

    #[test]
    fn go_json_layout_and_escaping() {
        let toc = Toc {
            version: 1,
            entries: vec![TocEntry {
                name: "a<b>&c".into(),
                kind: EntryType::Dir,
                mode: 493,
                ..Default::default()
            }],
        };
        let json = String::from_utf8(to_go_json(&toc).expect("json")).expect("utf8");
        let want = "{\n\t\"version\": 1,\n\t\"entries\": [\n\t\t{\n\t\t\t\"name\": \"a\\u003cb\\u003e\\u0026c\",\n\t\t\t\"type\": \"dir\",\n\t\t\t\"mode\": 493\n\t\t}\n\t]\n}";
        assert_eq!(json, want);
        let empty = String::from_utf8(
            to_go_json(&Toc {
                version: 1,
                entries: vec![],
            })
            .expect("json"),
        )
        .expect("utf8");
        assert_eq!(empty, "{\n\t\"version\": 1,\n\t\"entries\": []\n}");
    }

    /// A TOC member holding `json` as `stargz.index.json`.
    fn member(json: &str) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, TOC_TAR_NAME, json.as_bytes())
            .expect("tar");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar.into_inner().expect("tar")).expect("gz");
        gz.finish().expect("gz")
    }

    #[test]
    fn streamed_parse_matches_derived_rules() {
        let json = r#"{"version":1,"extra":{"x":[1]},"entries":[{"name":"a","type":"dir"},{"name":"a/b","type":"reg","size":3}]}"#;
        let (toc, digest) = parse_toc_member(&member(json), Format::Gzip).expect("parse");
        assert_eq!(toc, serde_json::from_str::<Toc>(json).expect("derived"));
        assert_eq!(
            digest,
            format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(json.as_bytes()))
            )
        );
        // Go marshals an empty entry list as null.
        assert!(
            parse_toc_member(&member(r#"{"version":1,"entries":null}"#), Format::Gzip)
                .expect("null")
                .0
                .entries
                .is_empty()
        );
        for bad in [
            r#"{"entries":[]}"#,
            r#"{"version":1,"version":1}"#,
            r#"{"version":1,"entries":[],"entries":[]}"#,
            r#"{"version":1,"entries":{}}"#,
            r#"{"version":1} trailing"#,
            r#"{"version":1,"entries":[{"name":"x","type":"socket"}]}"#,
        ] {
            assert!(
                parse_toc_member(&member(bad), Format::Gzip).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn callback_error_stops_the_parse_and_is_returned() {
        let json = r#"{"version":1,"entries":[{"name":"a","type":"dir"},{"name":"b","type":"dir"},{"name":"c","type":"dir"}]}"#;
        let mut seen = 0;
        let err = parse_toc_member_with(&member(json), Format::Gzip, |e| {
            seen += 1;
            if e.name == "b" {
                return Err(EstargzError::MalformedToc("stop at b".into()));
            }
            Ok(())
        })
        .expect_err("callback error");
        assert_eq!(seen, 2);
        assert!(
            matches!(err, EstargzError::MalformedToc(ref m) if m == "stop at b"),
            "{err}"
        );
    }

    #[test]
    fn toc_member_errors() {
        assert!(parse_toc_member(b"", Format::Gzip).is_err());
        assert!(parse_toc_member(b"not gzip at all", Format::Gzip).is_err());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &[0u8; 1024]).expect("gz");
        assert!(
            parse_toc_member(&gz.finish().expect("gz"), Format::Gzip).is_err(),
            "empty tar"
        );
    }
}
