//! The two libc calls that std lacks and several modules need: a path as a C string, and
//! `lsetxattr` (setting an extended attribute without following a symlink).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `p` as a NUL-terminated string for libc (an embedded NUL is an InvalidInput error).
pub(crate) fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Sets xattr `name` of `path` itself (a symlink is not followed).
pub(crate) fn set(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = cstring(path)?;
    let n =
        CString::new(name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; value is a valid slice.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
