//! A small, bounded reader of the tar headers in front of one regular file, for tar streams a
//! registry hands us (the TOC member). The `tar` crate reads GNU long names and PAX records
//! whole, whatever their declared size, and repeats them in errors; here every extension
//! record is size-checked before a byte of it is read, and there can only be a few.
//!
//! Accepted: v7, ustar and GNU headers with a valid checksum (unsigned or signed sum, as Go
//! accepts), preceded by at most [`MAX_EXTENSIONS`] PAX (`x`, `g`) or GNU (`L`, `K`) extension
//! records of at most [`MAX_EXTENSION_SIZE`] bytes each. The name is the GNU long name, else the
//! PAX `path` (local over global), else the header's (ustar prefix joined); the size is the PAX
//! `size`, else the header's. Other PAX keys are ignored, as only the name and size matter here.

use std::io::Read;

use super::{EstargzError, Result};

/// Size of a tar block (headers and padding).
pub(crate) const BLOCK: usize = 512;

/// Most extension records accepted before the file's own header. Go's estargz and our builder
/// write none in a TOC member (its 17-byte name, size and zero mtime fit a ustar header); one
/// of each kind (`g`, `x`, `L`, `K`) is already more than any writer needs.
pub(crate) const MAX_EXTENSIONS: usize = 4;

/// Largest extension record accepted. What a generic writer might add is a few PAX time records
/// or a `path` (tens of bytes each), and the only name a TOC member may carry is 17 bytes;
/// 1 KiB leaves ample room for that and keeps the reader's memory a few KiB.
pub(crate) const MAX_EXTENSION_SIZE: u64 = 1024;

/// The header of one regular file, with extension records applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileHeader {
    /// Raw name bytes (at most [`MAX_EXTENSION_SIZE`], or 256 from a ustar header).
    pub name: Vec<u8>,
    /// Bytes of file data that follow the header.
    pub size: u64,
}

/// Reads the headers up to and including the next regular file's from `r`, leaving `r` at its
/// first data byte. `what` names the stream in errors (e.g. "TOC member").
pub(crate) fn read_file_header<R: Read>(r: &mut R, what: &str) -> Result<FileHeader> {
    let bad = |msg: String| EstargzError::MalformedToc(format!("{what}: {msg}"));
    let mut global_path: Option<Vec<u8>> = None;
    let mut global_size: Option<u64> = None;
    let mut local_path: Option<Vec<u8>> = None;
    let mut local_size: Option<u64> = None;
    let mut long_name: Option<Vec<u8>> = None;
    let mut extensions = 0usize;
    loop {
        let mut block = [0u8; BLOCK];
        read_block(r, &mut block).map_err(|e| bad(format!("no tar header: {e}")))?;
        if block.iter().all(|&b| b == 0) {
            return Err(bad("no tar entry (end of archive)".into()));
        }
        verify_checksum(&block).map_err(bad)?;
        let typeflag = block[156];
        let size = parse_numeric(&block[124..136]).map_err(|e| bad(format!("header size: {e}")))?;
        if matches!(typeflag, b'x' | b'g' | b'L' | b'K') {
            extensions += 1;
            if extensions > MAX_EXTENSIONS {
                return Err(bad(format!(
                    "more than {MAX_EXTENSIONS} tar extension records"
                )));
            }
            if size > MAX_EXTENSION_SIZE {
                return Err(bad(format!(
                    "tar extension record {:?} of {size} bytes (limit {MAX_EXTENSION_SIZE})",
                    typeflag as char
                )));
            }
            let data = read_data(r, size).map_err(|e| bad(format!("tar extension record: {e}")))?;
            match typeflag {
                b'L' => long_name = Some(cstr(&data).to_vec()), // up to the first NUL, as Go
                b'K' => {} // a long link name: meaningless for a regular file
                _ => {
                    let (path, size) = if typeflag == b'x' {
                        (&mut local_path, &mut local_size)
                    } else {
                        (&mut global_path, &mut global_size)
                    };
                    for (key, value) in parse_pax_records(&data)
                        .ok_or_else(|| bad("malformed PAX record".into()))?
                    {
                        match key.as_str() {
                            "path" => *path = Some(value),
                            "size" => {
                                *size = Some(
                                    parse_pax_size(&value)
                                        .ok_or_else(|| bad("malformed PAX size".into()))?,
                                )
                            }
                            _ => {}
                        }
                    }
                }
            }
            continue;
        }
        if !matches!(typeflag, b'0' | b'\0' | b'7') {
            return Err(bad(format!(
                "tar entry of type {:?}, expected a regular file",
                typeflag as char
            )));
        }
        let name = long_name
            .or(local_path)
            .or(global_path)
            .unwrap_or_else(|| header_name(&block));
        let size = local_size.or(global_size).unwrap_or(size);
        return Ok(FileHeader { name, size });
    }
}

fn read_block<R: Read>(r: &mut R, block: &mut [u8; BLOCK]) -> std::io::Result<()> {
    r.read_exact(block)
}

/// Reads `size` bytes of extension data (already bounded by the caller) and its padding.
fn read_data<R: Read>(r: &mut R, size: u64) -> std::io::Result<Vec<u8>> {
    let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
    let mut data = vec![0u8; padded as usize];
    r.read_exact(&mut data)?;
    data.truncate(size as usize);
    Ok(data)
}

/// The header's own name: `prefix/name` for ustar (magic `ustar\0`), `name` for GNU and v7.
fn header_name(block: &[u8; BLOCK]) -> Vec<u8> {
    let name = cstr(&block[..100]);
    let prefix = if &block[257..263] == b"ustar\0" {
        cstr(&block[345..500])
    } else {
        &[]
    };
    if prefix.is_empty() {
        return name.to_vec();
    }
    let mut out = Vec::with_capacity(prefix.len() + 1 + name.len());
    out.extend_from_slice(prefix);
    out.push(b'/');
    out.extend_from_slice(name);
    out
}

/// Bytes up to the first NUL.
fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// The header checksum: the sum of all bytes with the checksum field read as spaces, summed
/// unsigned (POSIX) or signed (old Sun tars; Go accepts both).
fn verify_checksum(block: &[u8; BLOCK]) -> std::result::Result<(), String> {
    let want = parse_octal(&block[148..156]).map_err(|e| format!("header checksum field: {e}"))?;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if want == unsigned || i64::try_from(want).is_ok_and(|w| w == signed) {
        Ok(())
    } else {
        Err(format!(
            "bad tar header checksum {want:o} (computed {unsigned:o})"
        ))
    }
}

/// A numeric header field: octal digits between optional spaces/NULs, or GNU base-256 (first
/// byte's top bit set; only non-negative values that fit a `u64`).
fn parse_numeric(field: &[u8]) -> std::result::Result<u64, String> {
    match field.first() {
        Some(&b) if b & 0x80 != 0 => {
            if b & 0x40 != 0 {
                return Err("negative base-256 number".into());
            }
            let mut v: u64 = u64::from(b & 0x3f);
            for &c in &field[1..] {
                v = v
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(u64::from(c)))
                    .ok_or("base-256 number overflows")?;
            }
            Ok(v)
        }
        _ => parse_octal(field),
    }
}

fn parse_octal(field: &[u8]) -> std::result::Result<u64, String> {
    let start = field
        .iter()
        .position(|&c| c != b' ' && c != 0)
        .unwrap_or(field.len());
    let end = field
        .iter()
        .rposition(|&c| c != b' ' && c != 0)
        .map_or(start, |i| i + 1);
    let digits = &field[start..end];
    let mut v = 0u64;
    for &c in digits {
        if !(b'0'..=b'7').contains(&c) {
            return Err(format!(
                "not octal: {:?}",
                crate::untrusted::clip_bytes(field)
            ));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
            .ok_or("octal number overflows")?;
    }
    Ok(v)
}

/// A PAX `size` value: decimal digits only.
fn parse_pax_size(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// PAX records `"<len> <key>=<value>\n"`, split by their length prefix (values may hold `\n`);
/// `None` when malformed. Trailing NUL padding ends the records.
pub(crate) fn parse_pax_records(mut data: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    while !data.is_empty() && data[0] != 0 {
        let sp = data.iter().take(20).position(|&c| c == b' ')?;
        let len: usize = std::str::from_utf8(&data[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return None;
        }
        let rec = &data[sp + 1..len - 1];
        let eq = rec.iter().position(|&c| c == b'=')?;
        let key = std::str::from_utf8(&rec[..eq]).ok()?.to_owned();
        out.push((key, rec[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header block with `name`, `typeflag`, `size`, ustar or GNU magic, and a valid checksum.
    pub(crate) fn header(name: &[u8], typeflag: u8, size: u64, gnu: bool) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        b[100..107].copy_from_slice(b"0000644");
        b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        b[156] = typeflag;
        if gnu {
            b[257..265].copy_from_slice(b"ustar  \0");
        } else {
            b[257..263].copy_from_slice(b"ustar\0");
            b[263..265].copy_from_slice(b"00");
        }
        set_checksum(&mut b);
        b
    }

    pub(crate) fn set_checksum(b: &mut [u8; BLOCK]) {
        b[148..156].copy_from_slice(b"        ");
        let sum: u64 = b.iter().map(|&c| u64::from(c)).sum();
        b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    }

    /// An extension record (`x`, `g`, `L`, `K`) carrying `data`, padded to blocks.
    pub(crate) fn extension(typeflag: u8, data: &[u8]) -> Vec<u8> {
        let mut out = header(b"././@LongLink", typeflag, data.len() as u64, true).to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        out
    }

    pub(crate) fn pax(key: &str, value: &str) -> Vec<u8> {
        let body = key.len() + value.len() + 3;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        format!("{len} {key}={value}\n").into_bytes()
    }

    fn read(stream: &[u8]) -> Result<FileHeader> {
        read_file_header(&mut &stream[..], "test")
    }

    #[test]
    fn plain_headers_of_each_format() {
        for gnu in [false, true] {
            let h = read(&header(b"stargz.index.json", b'0', 42, gnu)).expect("header");
            assert_eq!(
                h,
                FileHeader {
                    name: b"stargz.index.json".to_vec(),
                    size: 42
                }
            );
        }
        let mut v7 = header(b"a", b'\0', 1, false);
        v7[257..265].fill(0);
        set_checksum(&mut v7);
        assert_eq!(read(&v7).expect("v7").name, b"a");
        let mut prefixed = header(b"name", b'0', 0, false);
        prefixed[345..351].copy_from_slice(b"prefix");
        set_checksum(&mut prefixed);
        assert_eq!(read(&prefixed).expect("ustar prefix").name, b"prefix/name");
        // Go's tar writer may use base-256 for sizes that do not fit octal.
        let mut b256 = header(b"a", b'0', 0, true);
        b256[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00]);
        set_checksum(&mut b256);
        assert_eq!(read(&b256).expect("base-256").size, 256);
    }

    #[test]
    fn extensions_override_name_and_size() {
        let mut s = extension(
            b'x',
            &[
                pax("path", "from-pax"),
                pax("size", "7"),
                pax("mtime", "1.5"),
            ]
            .concat(),
        );
        s.extend_from_slice(&header(b"short", b'0', 99, false));
        assert_eq!(
            read(&s).expect("pax"),
            FileHeader {
                name: b"from-pax".to_vec(),
                size: 7
            }
        );

        let mut s = extension(b'g', &pax("path", "global"));
        s.extend(extension(b'x', &pax("path", "local")));
        s.extend(extension(b'L', b"gnu-long\0ignored"));
        s.extend(extension(b'K', b"link\0"));
        s.extend_from_slice(&header(b"short", b'0', 3, true));
        assert_eq!(
            read(&s).expect("all four").name,
            b"gnu-long",
            "GNU long name wins, as in Go"
        );
    }

    #[test]
    fn hostile_headers_are_refused_before_reading_their_data() {
        // An extension claiming a huge size is refused from its header alone: the stream
        // holds no data behind it, so any attempt to read it would be a different error.
        let mut s = header(b"././@LongLink", b'L', 0o777_7777_7777, true).to_vec();
        s.extend_from_slice(&header(b"x", b'0', 1, false));
        let e = read(&s).expect_err("oversized long name").to_string();
        assert!(e.contains("limit 1024"), "{e}");
        let big_pax = header(b"p", b'x', MAX_EXTENSION_SIZE + 1, false);
        assert!(read(&big_pax)
            .expect_err("oversized pax")
            .to_string()
            .contains("limit"));

        let mut many = Vec::new();
        for _ in 0..=MAX_EXTENSIONS {
            many.extend(extension(b'x', &pax("mtime", "1")));
        }
        many.extend_from_slice(&header(b"x", b'0', 1, false));
        assert!(read(&many)
            .expect_err("too many")
            .to_string()
            .contains("more than 4"));

        let mut bad_sum = header(b"x", b'0', 1, false);
        bad_sum[0] = b'y';
        assert!(read(&bad_sum)
            .expect_err("checksum")
            .to_string()
            .contains("checksum"));
        assert!(read(&[0u8; BLOCK]).is_err(), "end of archive");
        assert!(read(&[1u8; 100]).is_err(), "short");
        assert!(read(&header(b"d", b'5', 0, false)).is_err(), "directory");
        assert!(read(&header(b"s", b'S', 0, true)).is_err(), "GNU sparse");
        let mut bad_size = header(b"x", b'0', 1, false);
        bad_size[124..136].copy_from_slice(b"99999999999\0");
        set_checksum(&mut bad_size);
        assert!(read(&bad_size).is_err(), "non-octal size");
        let mut bad_pax = extension(b'x', b"999 path=x\n");
        bad_pax.extend_from_slice(&header(b"x", b'0', 1, false));
        assert!(read(&bad_pax).is_err(), "PAX length past the data");
        let mut neg = extension(b'x', &pax("size", "-1"));
        neg.extend_from_slice(&header(b"x", b'0', 1, false));
        assert!(read(&neg).is_err(), "negative PAX size");
    }

    #[test]
    fn pax_records_split_by_length() {
        let data = [pax("SCHILY.xattr.a", "x\ny"), pax("path", "p")].concat();
        let recs = parse_pax_records(&data).expect("records");
        assert_eq!(
            recs,
            vec![
                ("SCHILY.xattr.a".to_owned(), b"x\ny".to_vec()),
                ("path".to_owned(), b"p".to_vec())
            ]
        );
        assert!(parse_pax_records(b"5 a=b").is_none());
        assert!(parse_pax_records(b"x a=b\n").is_none());
    }
}
