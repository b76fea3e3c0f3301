//! What to mount (pure, unit-tested) and the small [`Mounter`] seam for the syscalls the
//! snapshotter itself makes (it only ever unmounts: containerd mounts what we return, and
//! remote layers are mounted by [`super::RemoteLayers`]).

use std::io;
use std::path::{Path, PathBuf};

use super::{Kind, Mount};

/// Mounts for a snapshot, exactly as Go's stargz snapshotter returns them:
/// no parents → bind of `fs` (rw, or ro for a View); a View on one parent → ro rbind of the
/// parent's `fs`; otherwise overlay with `lowerdir` = parents' `fs`, nearest first, plus
/// `workdir`/`upperdir` when active.
pub fn compute_mounts(kind: Kind, fs: &Path, work: &Path, parent_fs: &[PathBuf]) -> Vec<Mount> {
    if parent_fs.is_empty() {
        let ro = if kind == Kind::View { "ro" } else { "rw" };
        return vec![Mount {
            kind: "bind".into(),
            source: fs.display().to_string(),
            options: vec![ro.into(), "rbind".into()],
        }];
    }
    let mut options = Vec::new();
    if kind == Kind::Active {
        options.push(format!("workdir={}", work.display()));
        options.push(format!("upperdir={}", fs.display()));
    } else if parent_fs.len() == 1 {
        return vec![Mount {
            kind: "bind".into(),
            source: parent_fs[0].display().to_string(),
            options: vec!["ro".into(), "rbind".into()],
        }];
    }
    let lower: Vec<String> = parent_fs.iter().map(|p| p.display().to_string()).collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }]
}

/// The mount-table operations the snapshotter needs; a fake in tests, [`SysMounter`] for real.
pub trait Mounter: Send + Sync {
    /// Mount points at or below `dir`, deepest first.
    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Detaches the mount at `target` (lazily, so a busy mount never blocks us).
    fn unmount(&self, target: &Path) -> io::Result<()>;
}

/// Real syscalls: `/proc/self/mountinfo` and `umount2(MNT_DETACH)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysMounter;

impl Mounter for SysMounter {
    fn mounts_under(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(parse_mounts_under(&info, dir))
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
    }
}

/// Mount points (5th field of mountinfo, octal escapes decoded) at or below `dir`, deepest first.
pub fn parse_mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mount_entries(mountinfo)
        .map(|(_, p)| p)
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// `(major:minor, mount point)` of every mount in `mountinfo`, in table order (a mount stacked
/// on another comes after it), octal escapes of the mount point decoded.
pub(crate) fn mount_entries(mountinfo: &str) -> impl Iterator<Item = (&str, PathBuf)> {
    mountinfo.lines().filter_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        Some((dev, PathBuf::from(unescape_octal(mp))))
    })
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            out.push(((d[0] - b'0') << 6) | ((d[1] - b'0') << 3) | (d[2] - b'0'));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn no_parent_is_a_bind() {
        let m = compute_mounts(Kind::Active, &p("/r/1/fs"), &p("/r/1/work"), &[]);
        assert_eq!(
            m,
            vec![Mount {
                kind: "bind".into(),
                source: "/r/1/fs".into(),
                options: vec!["rw".into(), "rbind".into()]
            }]
        );
        let m = compute_mounts(Kind::View, &p("/r/1/fs"), &p("/r/1/work"), &[]);
        assert_eq!(m[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn view_on_one_parent_is_ro_bind_of_parent() {
        let m = compute_mounts(Kind::View, &p("/r/2/fs"), &p("/r/2/work"), &[p("/r/1/fs")]);
        assert_eq!(
            m,
            vec![Mount {
                kind: "bind".into(),
                source: "/r/1/fs".into(),
                options: vec!["ro".into(), "rbind".into()]
            }]
        );
    }

    #[test]
    fn active_on_parents_is_overlay_nearest_first() {
        let m = compute_mounts(
            Kind::Active,
            &p("/r/3/fs"),
            &p("/r/3/work"),
            &[p("/r/2/fs"), p("/r/1/fs")],
        );
        assert_eq!(
            m,
            vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    "workdir=/r/3/work".into(),
                    "upperdir=/r/3/fs".into(),
                    "lowerdir=/r/2/fs:/r/1/fs".into()
                ],
            }]
        );
    }

    #[test]
    fn view_on_many_parents_is_ro_overlay() {
        let m = compute_mounts(
            Kind::View,
            &p("/r/3/fs"),
            &p("/r/3/work"),
            &[p("/r/2/fs"), p("/r/1/fs")],
        );
        assert_eq!(m[0].kind, "overlay");
        assert_eq!(m[0].options, ["lowerdir=/r/2/fs:/r/1/fs"]);
    }

    #[test]
    fn mountinfo_parsing() {
        let info = "22 1 0:20 / /r/snap/1/fs rw - fuse x rw\n\
                    23 1 0:21 / /r/snap/1/fs/inner rw - tmpfs x rw\n\
                    24 1 0:22 / /other rw - tmpfs x rw\n\
                    25 1 0:23 / /r/snap/with\\040space rw - tmpfs x rw\n";
        let m = parse_mounts_under(info, Path::new("/r/snap"));
        assert_eq!(
            m,
            vec![
                p("/r/snap/1/fs/inner"),
                p("/r/snap/1/fs"),
                p("/r/snap/with space")
            ]
        );
    }
}
