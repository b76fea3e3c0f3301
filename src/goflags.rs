//! Go's command-line syntax, for both binaries: Go's `flag` package (the daemon) and urfave/cli
//! on top of it (`ctr-remote`) take long flags with one dash as well as two (`-log-level debug`,
//! `-address=/run/x.sock`, `image rpull -plain-http REF`), and units and scripts written for Go's
//! binaries use both spellings.

/// Rewrites each single-dash long flag (`-name`, `-name=value`) to its two-dash spelling for
/// clap. One-letter flags (`-h`, `-n ns`), negative numbers, the program name and everything
/// after `--` are left alone.
pub fn go_style_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut rest_verbatim = false;
    for (i, arg) in args.into_iter().enumerate() {
        let text = arg.to_str().unwrap_or("");
        let single_dash_long = text.len() > 2
            && text.starts_with('-')
            && !text.starts_with("--")
            && text[1..].starts_with(|c: char| c.is_ascii_alphabetic());
        if i > 0 && !rest_verbatim && single_dash_long {
            out.push(format!("-{text}").into());
        } else {
            rest_verbatim |= i > 0 && text == "--";
            out.push(arg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &[&str]) -> Vec<String> {
        let os = line.iter().map(std::ffi::OsString::from);
        go_style_args(os)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn single_dash_long_flags_get_two_dashes() {
        assert_eq!(
            args(&[
                "d",
                "-log-level",
                "debug",
                "-address=/x.sock",
                "--root",
                "/r",
                "-h",
                "-V"
            ]),
            [
                "d",
                "--log-level",
                "debug",
                "--address=/x.sock",
                "--root",
                "/r",
                "-h",
                "-V"
            ]
        );
        assert_eq!(args(&["d", "--", "-log-level"]), ["d", "--", "-log-level"]);
        assert_eq!(
            args(&[
                "c",
                "-n",
                "ns",
                "i",
                "rpull",
                "-plain-http",
                "-u",
                "me:pw",
                "--level",
                "-1"
            ]),
            [
                "c",
                "-n",
                "ns",
                "i",
                "rpull",
                "--plain-http",
                "-u",
                "me:pw",
                "--level",
                "-1"
            ]
        );
    }
}
