//! Path resolution for policy checks: symlinks followed, `..` applied after them, as the kernel
//! would, even for paths that do not exist yet.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// How many symlinks one resolution may follow before it gives up (as `ELOOP`).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` (relative paths against `base`) to an absolute path with every existing
/// symlink followed and every `.` and `..` applied in order; components that do not exist are
/// kept as written. Returns `None` for paths that can never be safe (NUL bytes, symlink loops).
///
/// ```
/// use agent_runtime_gateway::paths::resolve;
/// use std::path::Path;
/// assert_eq!(resolve("a/../../etc", Path::new("/work/ws")).unwrap(), Path::new("/work/etc"));
/// ```
pub fn resolve(path: &str, base: &Path) -> Option<PathBuf> {
    if path.contains('\0') {
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
            _ => cur = next,
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
}
