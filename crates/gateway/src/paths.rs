//! Path resolution for policy checks: symlinks followed, `..` applied after them, as the kernel
//! would, even for paths that do not exist yet.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// How many symlinks one resolution may follow before it gives up (as `ELOOP`).
const MAX_SYMLINKS: usize = 40;

/// Whether `path` starts with `~` or `~user`: a folder of that name here for a native or
/// command tool, but a home folder for a shell or an MCP server that expands it (the reference
/// filesystem server does). No one resolution is right for every tool, so such a path resolves
/// to nothing, which policy rules count as outside (`./~/x` names a folder called `~`).
fn names_a_home(path: &str) -> bool {
    path.starts_with('~')
}

/// Resolves `path` (relative paths against `base`) to an absolute path with every existing
/// symlink followed and every `.` and `..` applied in order; components that do not exist are
/// kept as written. Returns `None` for paths that can never be safe (NUL bytes, symlink loops,
/// a leading `~`, which a shell or an MCP server may expand to a home folder where a native
/// tool sees a folder named `~`) and for paths with a part that cannot be looked at (longer
/// than the system takes, in a folder this process may not search), which may be a link.
///
/// ```
/// use agent_runtime_gateway::paths::resolve;
/// use std::path::Path;
/// assert_eq!(resolve("a/../../etc", Path::new("/work/ws")).unwrap(), Path::new("/work/etc"));
/// ```
pub fn resolve(path: &str, base: &Path) -> Option<PathBuf> {
    if path.contains('\0') || names_a_home(path) {
        return None;
    }
    let start = Path::new(path);
    let mut queue: VecDeque<OsString> = VecDeque::new();
    let mut cur = PathBuf::from("/");
    let full = if start.is_absolute() {
        start.to_path_buf()
    } else {
        base.join(start)
    };
    push_components(&full, &mut queue, &mut cur);
    let mut followed = 0usize;
    while let Some(c) = queue.pop_front() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        match std::fs::symlink_metadata(&next) {
            Ok(meta) if meta.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return None;
                }
                let target = std::fs::read_link(&next).ok()?;
                let mut rest: VecDeque<OsString> = VecDeque::new();
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                push_components(&target, &mut rest, &mut cur);
                while let Some(r) = rest.pop_back() {
                    queue.push_front(r);
                }
            }
            Ok(_) => cur = next,
            // What does not exist (or sits under a file) is kept as written: opening it fails.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                cur = next
            }
            // Anything else (a path too long to look at, a folder this process may not search)
            // leaves the component unknown: it may be a link the kernel follows, so the path
            // resolves to nothing, which every rule takes for outside.
            Err(_) => return None,
        }
    }
    Some(cur)
}

fn push_components(path: &Path, queue: &mut VecDeque<OsString>, cur: &mut PathBuf) {
    for comp in path.components() {
        match comp {
            Component::RootDir | Component::Prefix(_) => {
                *cur = PathBuf::from("/");
                queue.clear();
            }
            Component::CurDir => {}
            Component::ParentDir => queue.push_back(OsString::from("..")),
            Component::Normal(n) => queue.push_back(n.to_os_string()),
        }
    }
}

/// Whether `path` is `root` or below it (both already resolved).
pub fn is_within(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_cases() {
        let base = Path::new("/nonexistent-base/ws");
        assert_eq!(
            resolve("x/./y", base).unwrap(),
            Path::new("/nonexistent-base/ws/x/y")
        );
        assert_eq!(resolve("../../../../..", base).unwrap(), Path::new("/"));
        assert_eq!(
            resolve("/etc/../etc/passwd", base).unwrap(),
            Path::new("/etc/passwd")
        );
        assert!(resolve("a\0b", base).is_none());
        // A home folder for some tools, a folder named `~` for others: no one answer.
        assert!(resolve("~/.ssh/id_ed25519", base).is_none());
        assert!(resolve("~root/x", base).is_none());
        assert!(resolve("~", base).is_none());
        assert_eq!(
            resolve("./~/x", base).unwrap(),
            Path::new("/nonexistent-base/ws/~/x")
        );
    }

    #[test]
    fn symlinks_are_followed_before_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let ws = root.join("ws");
        std::fs::create_dir_all(ws.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", ws.join("link")).unwrap();
        std::os::unix::fs::symlink("link/..", ws.join("loopish")).unwrap();
        assert_eq!(
            resolve("link/passwd", &ws).unwrap(),
            Path::new("/etc/passwd")
        );
        // `link/..` is the parent of /etc, not the workspace.
        assert_eq!(resolve("link/../tmp", &ws).unwrap(), Path::new("/tmp"));
        assert_eq!(resolve("loopish", &ws).unwrap(), Path::new("/"));
        std::os::unix::fs::symlink("self", ws.join("self")).unwrap();
        assert!(resolve("self/x", &ws).is_none());
    }

    /// A link whose resolved path is longer than the system looks at (`ENAMETOOLONG`) is not
    /// taken for a file that is not a link: the kernel follows the short path given, and it
    /// leads out.
    #[test]
    fn a_part_that_cannot_be_looked_at_resolves_to_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let ws = root.join("ws");
        // Folders nested until the path is nearly 4,096 bytes long, made one level at a time
        // below the one before.
        let mut deep = ws.clone();
        std::fs::create_dir_all(&deep).unwrap();
        let name = std::ffi::CString::new("d".repeat(200)).unwrap();
        let ws_c = std::ffi::CString::new(ws.to_str().unwrap()).unwrap();
        // SAFETY: NUL-terminated strings that outlive the calls; each descriptor is closed
        // once the next is open.
        unsafe {
            let mut fd = libc::open(ws_c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY);
            assert!(fd >= 0);
            // A link's target may have 4,095 bytes at most.
            while deep.as_os_str().len() + 201 < 4090 {
                assert_eq!(libc::mkdirat(fd, name.as_ptr(), 0o755), 0);
                let next = libc::openat(fd, name.as_ptr(), libc::O_PATH | libc::O_DIRECTORY);
                assert!(next >= 0);
                libc::close(fd);
                fd = next;
                deep.push("d".repeat(200));
            }
            libc::close(fd);
        }
        // `ws/far` is a link to the deep folder: `far/NAME` resolves to a path too long to
        // look at, which the kernel opens through the link all the same.
        std::os::unix::fs::symlink(&deep, ws.join("far")).unwrap();
        let long = format!("far/{}", "x".repeat(200));
        assert!(std::fs::symlink_metadata(deep.join("x".repeat(200))).is_err());
        assert_eq!(resolve(&long, &ws), None);
        assert_eq!(resolve("missing/x", &ws), Some(ws.join("missing/x")));
    }
}
