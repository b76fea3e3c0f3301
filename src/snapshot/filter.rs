//! containerd's filter syntax, the subset used on snapshots.
//!
//! A filter is selectors joined by `,` (all must match); several filters match if any does.
//! A selector is a field path (`name`, `parent`, `kind`, `labels.<key>`, with `"quoted"`
//! segments allowed) and optionally an operator (`==`, `!=`, `~=` regex) and a value (bare or
//! `"quoted"`; `/regex/` also accepted). Matching follows containerd's `filters` package:
//! a bare field path tests presence, `!=` matches an absent field.
//! Written by hand because no crate implements containerd's grammar.

use regex::Regex;

use super::{Info, Kind, SnapshotError};

#[derive(Debug, Clone)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter: all selectors must match.
#[derive(Debug, Clone)]
pub struct Filter {
    selectors: Vec<Selector>,
}

/// Parsed filters: any may match; none given matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Filter>);

impl Filters {
    /// Parses containerd filter strings; a syntax error is InvalidArgument.
    pub fn parse(filters: &[String]) -> Result<Filters, SnapshotError> {
        let mut out = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            out.push(Filter::parse(f).map_err(|msg| {
                SnapshotError::InvalidArgument(format!("invalid filter {f:?}: {msg}"))
            })?);
        }
        Ok(Filters(out))
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.0.is_empty() || self.0.iter().any(|f| f.matches(info))
    }
}

impl Filter {
    fn matches(&self, info: &Info) -> bool {
        self.selectors.iter().all(|s| s.matches(info))
    }

    fn parse(s: &str) -> Result<Filter, String> {
        let mut p = Parser {
            s: s.as_bytes(),
            i: 0,
        };
        let mut selectors = Vec::new();
        loop {
            p.skip_ws();
            selectors.push(p.selector()?);
            p.skip_ws();
            match p.peek() {
                None => break,
                Some(b',') => p.i += 1,
                Some(c) => return Err(format!("unexpected {:?} at offset {}", c as char, p.i)),
            }
        }
        Ok(Filter { selectors })
    }
}

fn field<'a>(info: &'a Info, path: &[String]) -> Option<&'a str> {
    match path.first().map(String::as_str) {
        Some("name") if path.len() == 1 => Some(&info.name),
        Some("parent") if path.len() == 1 => Some(&info.parent),
        Some("kind") if path.len() == 1 => Some(match info.kind {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }),
        Some("labels") if path.len() > 1 => {
            info.labels.get(&path[1..].join(".")).map(String::as_str)
        }
        _ => None,
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field(info, &self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Eq(v) => value == Some(v.as_str()),
            Op::Ne(v) => value.unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.unwrap_or("")),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(c) if c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let mut path = vec![self.field()?];
        while self.peek() == Some(b'.') {
            self.i += 1;
            path.push(self.field()?);
        }
        self.skip_ws();
        let rest = &self.s[self.i..];
        let op = if rest.starts_with(b"==") {
            self.i += 2;
            Op::Eq(self.value()?)
        } else if rest.starts_with(b"!=") {
            self.i += 2;
            Op::Ne(self.value()?)
        } else if rest.starts_with(b"~=") {
            self.i += 2;
            let v = self.value()?;
            Op::Matches(Regex::new(&v).map_err(|e| format!("bad regex {v:?}: {e}"))?)
        } else {
            Op::Present
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(b'"') => self.quoted(b'"'),
            _ => {
                let start = self.i;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'/')
                {
                    self.i += 1;
                }
                if start == self.i {
                    return Err(format!("expected a field name at offset {start}"));
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
        }
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_ws();
        match self.peek() {
            Some(q @ (b'"' | b'/')) => self.quoted(q),
            _ => {
                let start = self.i;
                while matches!(self.peek(), Some(c) if c != b',' && !c.is_ascii_whitespace()) {
                    self.i += 1;
                }
                if start == self.i {
                    return Err(format!("expected a value at offset {start}"));
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
        }
    }

    /// A string delimited by `q`; backslash escapes the next byte.
    fn quoted(&mut self, q: u8) -> Result<String, String> {
        let start = self.i;
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            if c == q {
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            if c == b'\\' && q == b'"' {
                match self.peek() {
                    Some(n) => {
                        self.i += 1;
                        out.push(match n {
                            b'n' => b'\n',
                            b't' => b'\t',
                            other => other,
                        });
                    }
                    None => break,
                }
            } else {
                out.push(c);
            }
        }
        Err(format!("unterminated quote starting at offset {start}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created: UNIX_EPOCH,
            updated: UNIX_EPOCH,
        }
    }

    fn m(filters: &[&str], i: &Info) -> bool {
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filters::parse(&f).unwrap().matches(i)
    }

    #[test]
    fn selectors() {
        let i = info(
            "a",
            "p",
            Kind::Committed,
            &[
                ("containerd.io/snapshot/remote", "remote snapshot"),
                ("x", "1"),
            ],
        );
        assert!(m(&[], &i));
        assert!(m(&["name==a"], &i));
        assert!(!m(&["name==b"], &i));
        assert!(m(&["name!=b"], &i));
        assert!(m(&["parent==p,kind==committed"], &i));
        assert!(!m(&["parent==p,kind==active"], &i));
        assert!(m(&["kind==active", "name==a"], &i), "filters are ORed");
        assert!(m(&["labels.x"], &i));
        assert!(!m(&["labels.y"], &i));
        assert!(
            m(&["labels.y!=1"], &i),
            "!= matches absent fields like containerd"
        );
        assert!(m(
            &[r#"labels."containerd.io/snapshot/remote"=="remote snapshot""#],
            &i
        ));
        assert!(
            m(&["labels.containerd.io/snapshot/remote"], &i),
            "unquoted dotted keys are joined"
        );
        assert!(m(&["name~=^a$"], &i));
        assert!(m(&["name~=/^[a-c]+$/"], &i));
        assert!(!m(&["name~=^b"], &i));
        assert!(m(&[" name == a , labels.x == 1 "], &i));
    }

    #[test]
    fn invalid_filters() {
        for bad in [
            "==a",
            "name==",
            "name==\"open",
            "name~=(",
            "name==a b",
            "labels.",
            ",",
        ] {
            let e = Filters::parse(&[bad.to_string()]).unwrap_err();
            assert!(matches!(e, SnapshotError::InvalidArgument(_)), "{bad}: {e}");
        }
    }
}
