//! Replacing a user's file whole. Two crates write files a person names and may share with other
//! programs (the gateway's MCP servers file, the command line's exports); both need the same
//! care, written once here: the new content goes to a file beside the target and is renamed
//! over it, so a crash, a full disk or a failed export leaves the old file or the new one; a
//! symbolic link stays a link; the replaced file's permissions are kept. And opening a path a
//! policy judged exactly as judged ([`open_no_symlinks`]).

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
/// writes, whole or not at all: `write` fills a new file beside it (`.NAME.partial-PID-N`, see
/// [`temp_beside`]; created new, so concurrent writers never share one), which is flushed to disk and renamed
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
    use std::os::unix::fs::PermissionsExt;
    let target = link_target(path)?;
    let mode = match std::fs::metadata(&target) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0o600,
        Err(e) => return Err(e.into()),
    };
    if target.file_name().is_none() {
        return Err(io::Error::other(format!("{}: names no file", path.display())).into());
    }
    let dir = folder_of(&target);
    remove_stale_temps(&target, "partial");
    let tmp = temp_beside(&target, "partial");
    // Locked while written: a writer stopped by Ctrl-C leaves a file the next one removes.
    let mut file = create_locked_temp(&tmp)?;
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

/// The longest file name most file systems take (Linux's `NAME_MAX`), in bytes.
const NAME_MAX: usize = 255;

/// Bytes a temporary name leaves free for what SQLite adds to a database's name (`-journal`).
const SQLITE_SUFFIX_ROOM: usize = 8;

/// How long a temporary file must have gone unwritten before [`remove_stale_temps`] takes it
/// for a leftover: the writer that made it was killed. No creation or export stalls that long
/// between writes.
pub const STALE_TEMP_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// A new name beside `target` for a file that becomes `target` once whole:
/// `.NAME.TAG-PID-N`, hidden, unique to this process and call. `NAME` is cut short when needed
/// so that the name, with room for SQLite's `-journal` after it, stays within the 255 bytes
/// file systems allow: a target whose name is near that long still gets a temporary file.
///
/// ```
/// use std::path::Path;
/// let tmp = agent_runtime_core::fs::temp_beside(Path::new("/data/out.jsonl"), "partial");
/// let name = tmp.file_name().unwrap().to_str().unwrap();
/// assert!(name.starts_with(".out.jsonl.partial-"), "{name}");
/// assert_eq!(tmp.parent(), Some(Path::new("/data")));
///
/// let long = format!("/data/{}", "x".repeat(250));
/// let tmp = agent_runtime_core::fs::temp_beside(Path::new(&long), "partial");
/// assert!(tmp.file_name().unwrap().len() <= 255 - 8);
/// ```
pub fn temp_beside(target: &Path, tag: &str) -> PathBuf {
    static TEMPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = TEMPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tail = format!(".{tag}-{}-{n}", std::process::id());
    let mut name = temp_prefix(target, tag);
    name.push(tail);
    target.with_file_name(name)
}

/// `.NAME` as [`temp_beside`] writes it for `target`, cut short to leave room for the longest
/// tail a tag, two 20-digit numbers and SQLite's suffix can make.
fn temp_prefix(target: &Path, tag: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let name = target.file_name().map(OsStrExt::as_bytes).unwrap_or(b"");
    // Saturating: a tag too long to leave room keeps no byte of the name rather than panic.
    let room = NAME_MAX
        .saturating_sub(SQLITE_SUFFIX_ROOM + tag.len() + 2 * 20 + 3)
        .saturating_sub(1);
    let mut prefix = Vec::with_capacity(1 + name.len().min(room));
    prefix.push(b'.');
    prefix.extend_from_slice(&name[..name.len().min(room)]);
    std::ffi::OsString::from_vec(prefix)
}

/// How old a temporary file that nobody holds locked ([`create_locked_temp`]) must be before
/// [`remove_stale_temps`] takes it for a leftover: its writer locks it right after creating it.
pub const ABANDONED_TEMP_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Creates `path` (a name from [`temp_beside`]; it must not exist) for writing, readable by its
/// owner only, and locks it (`flock`) for as long as the returned file stays open: its writer is
/// then known to be alive, and [`remove_stale_temps`] takes a file that nobody holds for a
/// leftover (a writer killed by Ctrl-C or `kill -9`) within seconds rather than after
/// [`STALE_TEMP_AFTER`]. Where the file system cannot lock, the file is created unlocked and
/// only its age counts.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("locked-temp-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// use agent_runtime_core::fs::{create_locked_temp, temp_beside};
/// let tmp = temp_beside(&dir.join("events.db"), "creating");
/// let held = create_locked_temp(&tmp).unwrap();
/// // Another open of it cannot take the lock while `held` is open.
/// let other = std::fs::File::open(&tmp).unwrap();
/// assert!(other.try_lock().is_err());
/// drop(held);
/// assert!(other.try_lock().is_ok());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn create_locked_temp(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // A file system without locks leaves the age rule alone to judge it.
    let _ = file.try_lock();
    Ok(file)
}

/// Whether nobody holds the file at `path` locked ([`create_locked_temp`]): `false` when it
/// is locked, cannot be opened, or the file system cannot tell.
fn nobody_holds(path: &Path) -> bool {
    std::fs::File::open(path).is_ok_and(|f| f.try_lock().is_ok())
}

/// Removes the temporary files that [`temp_beside`] named for `target` and `tag` whose writer
/// is gone: leftovers of a process killed while it wrote (Ctrl-C or `kill -9` mid-export or
/// mid-creation). A writer that made its file with [`create_locked_temp`] is gone once nobody
/// holds that file and it is [`ABANDONED_TEMP_AFTER`] old (SQLite's `-wal`, `-shm` and
/// `-journal` beside it go with it); any file nobody has written for [`STALE_TEMP_AFTER`] is
/// taken for a leftover too (a file system without locks, an older writer). Best effort: what
/// cannot be listed or removed stays. Returns how many were removed.
pub fn remove_stale_temps(target: &Path, tag: &str) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let mut prefix = temp_prefix(target, tag);
    prefix.push(format!(".{tag}-"));
    let Ok(entries) = std::fs::read_dir(folder_of(target)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.as_bytes().strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        // `PID-N`, and SQLite's `-wal`, `-shm` or `-journal` after it.
        let rest = [b"-wal".as_slice(), b"-shm", b"-journal"]
            .iter()
            .find_map(|s| rest.strip_suffix(*s))
            .unwrap_or(rest);
        let numbers = rest.split(|&b| b == b'-').collect::<Vec<_>>();
        if numbers.len() != 2
            || numbers
                .iter()
                .any(|n| n.is_empty() || !n.iter().all(u8::is_ascii_digit))
        {
            continue;
        }
        let Some(age) = entry
            .metadata()
            .ok()
            .filter(std::fs::Metadata::is_file)
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
        else {
            continue;
        };
        // The writer's own file, which it holds locked while it writes (the name without
        // SQLite's suffix): gone, or held by nobody.
        let writers_file = {
            let mut name = prefix.clone();
            name.push(std::ffi::OsStr::from_bytes(rest));
            folder_of(target).join(name)
        };
        let abandoned =
            age >= ABANDONED_TEMP_AFTER && (!writers_file.exists() || nobody_holds(&writers_file));
        if (abandoned || age >= STALE_TEMP_AFTER) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Opens the absolute `path` with `flags` (`libc::O_RDONLY`, `O_WRONLY | O_CREAT`, ...; `mode`
/// for a file it creates) following no symbolic link in any of its parts: each folder is
/// opened below the one before with `O_NOFOLLOW`, and a link anywhere fails the open (`ELOOP`
/// or `ENOTDIR`; [`is_link_in_the_way`] tells). For a path that was resolved (its links
/// followed) when it was judged: the open then reaches what was judged or nothing, whatever
/// was put in the way since.
///
/// Written with `openat(2)` rather than taken from a crate: the standard library has no
/// `openat`, and `cap-std`, which does this among much else, would be a large dependency for
/// one function. (`openat2`'s `RESOLVE_NO_SYMLINKS` does the same in one call from Linux 5.6.)
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("no-symlinks-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// # let dir = std::fs::canonicalize(&dir).unwrap();
/// use agent_runtime_core::fs::open_no_symlinks;
/// std::fs::write(dir.join("real.txt"), "x").unwrap();
/// # let _ = std::fs::remove_file(dir.join("link.txt"));
/// std::os::unix::fs::symlink("real.txt", dir.join("link.txt")).unwrap();
/// assert!(open_no_symlinks(&dir.join("real.txt"), libc::O_RDONLY, 0).is_ok());
/// assert!(open_no_symlinks(&dir.join("link.txt"), libc::O_RDONLY, 0).is_err());
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[cfg(unix)]
pub fn open_no_symlinks(path: &Path, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    use std::ffi::CString;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Component;
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_string());
    if !path.is_absolute() {
        return Err(invalid("not an absolute path"));
    }
    let mut names = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => names
                .push(CString::new(n.as_bytes()).map_err(|_| invalid("a NUL byte in the path"))?),
            // A judged path has none: it was resolved.
            _ => return Err(invalid("`.` or `..` in a path that should be resolved")),
        }
    }
    let Some(last) = names.pop() else {
        return Err(invalid("the root is no file"));
    };
    let open_at =
        |dir: libc::c_int, name: &std::ffi::CStr, flags: libc::c_int| -> io::Result<OwnedFd> {
            // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is AT_FDCWD or an
            // open descriptor the caller owns.
            let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, libc::c_uint::from(mode)) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: openat returned a new descriptor that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
    use std::os::fd::AsRawFd;
    // A folder is opened only to open below it: without read permission where O_PATH exists.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const DIR_ACCESS: libc::c_int = libc::O_PATH;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const DIR_ACCESS: libc::c_int = libc::O_RDONLY;
    let dir_flags = DIR_ACCESS | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let mut dir = open_at(libc::AT_FDCWD, c"/", dir_flags)?;
    for name in &names {
        dir = open_at(dir.as_raw_fd(), name, dir_flags)?;
    }
    let file = open_at(
        dir.as_raw_fd(),
        &last,
        flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
    )?;
    Ok(File::from(file))
}

/// Whether an [`open_no_symlinks`] of `path` failed with `error` because a part of `path` is a
/// symbolic link (rather than, say, a regular file where a folder should be).
#[cfg(unix)]
pub fn is_link_in_the_way(path: &Path, error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
        && path
            .ancestors()
            .any(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_fit_and_stale_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        // A name of 255 bytes, the most a file system takes: its temporary file still fits.
        let target = dir.path().join("n".repeat(255));
        std::fs::write(&target, "old").unwrap();
        replace(&target, |f| std::io::Write::write_all(f, b"new")).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");

        let fresh = temp_beside(&target, "partial");
        std::fs::write(&fresh, "").unwrap();
        let stale = temp_beside(&target, "partial");
        std::fs::write(&stale, "").unwrap();
        let stale_wal = PathBuf::from(format!("{}-wal", stale.display()));
        std::fs::write(&stale_wal, "").unwrap();
        let other_tag = temp_beside(&target, "creating");
        std::fs::write(&other_tag, "").unwrap();
        let lookalike = dir.path().join(format!(
            "{}.partial-notes",
            temp_prefix(&target, "partial").to_string_lossy()
        ));
        std::fs::write(&lookalike, "").unwrap();
        let old =
            std::time::SystemTime::now() - STALE_TEMP_AFTER - std::time::Duration::from_secs(1);
        for path in [&stale, &stale_wal, &other_tag, &lookalike] {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        assert_eq!(remove_stale_temps(&target, "partial"), 2);
        assert!(!stale.exists() && !stale_wal.exists());
        // A file written recently, another tag's, and one that only looks alike stay.
        assert!(fresh.exists() && other_tag.exists() && lookalike.exists());
        assert!(target.exists());

        // Seconds old: a file its writer holds stays, with SQLite's files beside it; one
        // nobody holds (its writer was stopped) goes, and so do those beside it.
        let a_while_ago = std::time::SystemTime::now() - ABANDONED_TEMP_AFTER * 2;
        let age = |path: &Path| {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(a_while_ago)
                .unwrap();
        };
        let held_path = temp_beside(&target, "partial");
        let held = create_locked_temp(&held_path).unwrap();
        let held_wal = PathBuf::from(format!("{}-wal", held_path.display()));
        std::fs::write(&held_wal, "").unwrap();
        let left_path = temp_beside(&target, "partial");
        drop(create_locked_temp(&left_path).unwrap());
        let left_journal = PathBuf::from(format!("{}-journal", left_path.display()));
        std::fs::write(&left_journal, "").unwrap();
        for path in [&held_path, &held_wal, &left_path, &left_journal, &fresh] {
            age(path);
        }
        // `fresh` was never locked: nobody holds it either.
        assert_eq!(remove_stale_temps(&target, "partial"), 3);
        assert!(held_path.exists() && held_wal.exists());
        assert!(!left_path.exists() && !left_journal.exists() && !fresh.exists());
        drop(held);
        assert_eq!(remove_stale_temps(&target, "partial"), 2);
        assert!(!held_path.exists() && !held_wal.exists());
    }

    #[cfg(unix)]
    #[test]
    fn opening_with_no_symlinks_refuses_a_link_anywhere_in_the_path() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f.txt"), "inside").unwrap();
        std::fs::create_dir_all(root.join("out")).unwrap();
        std::fs::write(root.join("out/f.txt"), "outside").unwrap();
        let mut text = String::new();
        open_no_symlinks(&root.join("a/b/f.txt"), libc::O_RDONLY, 0)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "inside");
        // A folder of the path swapped for a link (as a command could do between a policy's
        // judgement and the open): refused, and said to be a link in the way.
        std::fs::rename(root.join("a/b"), root.join("a/b-moved")).unwrap();
        std::os::unix::fs::symlink(root.join("out"), root.join("a/b")).unwrap();
        let judged = root.join("a/b/f.txt");
        let err = open_no_symlinks(&judged, libc::O_RDONLY, 0).unwrap_err();
        assert!(is_link_in_the_way(&judged, &err), "{err}");
        // The last part a link: refused too, and never created through.
        std::os::unix::fs::symlink(root.join("out/new.txt"), root.join("a/new.txt")).unwrap();
        let target = root.join("a/new.txt");
        let err = open_no_symlinks(&target, libc::O_WRONLY | libc::O_CREAT, 0o644).unwrap_err();
        assert!(is_link_in_the_way(&target, &err), "{err}");
        assert!(!root.join("out/new.txt").exists());
        // A new file where nothing is in the way is created.
        open_no_symlinks(
            &root.join("a/made.txt"),
            libc::O_WRONLY | libc::O_CREAT,
            0o644,
        )
        .unwrap();
        assert!(root.join("a/made.txt").is_file());
        // A file where a folder should be is no link.
        let under_file = root.join("a/made.txt/x");
        let err = open_no_symlinks(&under_file, libc::O_RDONLY, 0).unwrap_err();
        assert!(!is_link_in_the_way(&under_file, &err), "{err}");
        for bad in ["relative.txt", "/a/../b", "/"] {
            assert!(
                open_no_symlinks(Path::new(bad), libc::O_RDONLY, 0).is_err(),
                "{bad}"
            );
        }
    }
}
