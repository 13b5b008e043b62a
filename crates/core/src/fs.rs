//! Replacing a user's file whole. Two crates write files a person names and may share with other
//! programs (the gateway's MCP servers file, the command line's exports); both need the same
//! care, written once here: the new content goes to a file beside the target and is renamed
//! over it, so a crash, a full disk or a failed export leaves the old file or the new one; a
//! symbolic link stays a link; the replaced file's permissions are kept.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The file `path` names once symbolic links are followed to their end, whether that file exists
/// or not (a link to a file not made yet names where it will be); `path` itself when it is no
/// link. Errors when links loop (more than 40, as the kernel counts).
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("link-target-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let link = dir.join("config.json");
/// # let _ = std::fs::remove_file(&link);
/// std::os::unix::fs::symlink("real.json", &link).unwrap();
/// assert_eq!(agent_runtime_core::fs::link_target(&link).unwrap(), dir.join("real.json"));
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn link_target(path: &Path) -> io::Result<PathBuf> {
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let next = std::fs::read_link(&at)?;
                at = match at.parent() {
                    Some(dir) if next.is_relative() => dir.join(next),
                    _ => next,
                };
            }
            Ok(_) => return Ok(at),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(at),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "{}: too many levels of symbolic links",
        path.display()
    )))
}

/// The folder a file is in (`.` for a bare name).
pub fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Replaces the file `path` names (a link's target, see [`link_target`]) with what `write`
/// writes, whole or not at all: `write` fills a new file beside it (`.NAME.partial-PID-N`,
/// created new, so concurrent writers never share one), which is flushed to disk and renamed
/// over the target once `write` succeeds, and removed when anything fails. The new file keeps
/// the replaced one's permissions; a new one is private to its owner (`0600`), since what users
/// write this way (exported payloads, tokens in a servers file) is often not for others.
///
/// ```
/// use std::io::Write;
/// # let dir = std::env::temp_dir().join(format!("replace-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("out.txt");
/// agent_runtime_core::fs::replace(&path, |f| f.write_all(b"whole")).unwrap();
/// assert_eq!(std::fs::read_to_string(&path).unwrap(), "whole");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn replace<T, E: From<io::Error>>(
    path: &Path,
    write: impl FnOnce(&mut File) -> Result<T, E>,
) -> Result<T, E> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let target = link_target(path)?;
    let mode = match std::fs::metadata(&target) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0o600,
        Err(e) => return Err(e.into()),
    };
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{}: names no file", path.display())))?;
    let dir = folder_of(&target);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".partial-{}-{n}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let result = (|| -> Result<T, E> {
        // The mode given at creation is filtered by the umask; the replaced file's is exact.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        let value = write(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        // The rename is durable once the folder is.
        File::open(&dir)?.sync_all()?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
