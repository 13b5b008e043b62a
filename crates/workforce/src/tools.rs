//! The registry a run calls its tools through ([`ToolRegistry`], the driver's
//! [`ToolInvoker`]), and the native tools.
//!
//! A run should reach its tools through the gateway, so that every call is validated, judged
//! by the policy, sandboxed and recorded: build the registry from the gateway's handles,
//! `ToolRegistry::from_tools(gateway.tool_handles())` (as `agent-runtime run` does). The list
//! is taken when the run starts: a tool registered later (an MCP server that connects late) is
//! not in it. A registry of native tools alone (`with_native_tools`) is for tests and the
//! simulator: its calls pass no policy.
//!
//! Native tools: `echo` (returns its arguments), `concat` (joins `parts` with `sep`), `sleep`
//! (waits `ms` milliseconds, cancellable), `read_file` (`path` to `{text, bytes}`), `write_file`
//! (`path`, `text`; idempotent: writing the same text again changes nothing) and `fail` (always
//! fails with `class` and `message`, for trying failure policies).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::{
    CallContext, ClassifiedError, ErrorClass, FileTarget, RiskClass, Tool, ToolDescriptor,
    ToolError, ToolOutput, ToolSource, ToolSpec, async_trait,
};
use serde_json::{Value, json};

use crate::driver::ToolInvoker;

/// Tools by name.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
    /// Why a tool not here is missing, when the tools' source knows (see
    /// [`ToolRegistry::with_unavailable`]).
    unavailable: Option<WhyMissing>,
}

/// Says why a tool is missing, when known.
type WhyMissing = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// This registry, with `why` saying why a tool not in it is missing (the gateway's
    /// registry knows the tools of an MCP server that cannot be reached now): a run that needs
    /// one is refused with that reason, rather than told the tool is unknown.
    pub fn with_unavailable(
        mut self,
        why: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.unavailable = Some(Arc::new(why));
        self
    }

    /// A registry with every native tool of this module.
    pub fn with_native_tools() -> Self {
        Self::from_tools(native_tools())
    }

    /// A registry of `tools` (a later tool of the same name replaces an earlier one); for
    /// example the gateway's tool handles, so that every call goes through its policy,
    /// sandbox and audit.
    pub fn from_tools(tools: impl IntoIterator<Item = Arc<dyn Tool>>) -> Self {
        let mut r = Self::new();
        for t in tools {
            r.register(t);
        }
        r
    }

    /// Adds or replaces a tool under its descriptor's name.
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.descriptor().name.clone(), tool);
    }
}

#[async_trait]
impl ToolInvoker for ToolRegistry {
    fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    fn spec(&self, name: &str) -> Option<ToolSpec> {
        self.tools.get(name).map(|t| {
            let d = t.descriptor();
            ToolSpec {
                name: d.name.clone(),
                description: d.description.clone(),
                input_schema: d.input_schema.clone(),
            }
        })
    }

    async fn invoke(
        &self,
        name: &str,
        args: Value,
        ctx: CallContext,
    ) -> Result<ToolOutput, ToolError> {
        self.get(name)?.call(args, ctx).await
    }

    fn check_args(&self, name: &str, args: &Value) -> Result<(), ToolError> {
        self.get(name)?.check_args(args)
    }

    fn unavailable(&self, name: &str) -> Option<String> {
        self.unavailable.as_ref().and_then(|why| why(name))
    }
}

impl ToolRegistry {
    /// Tool `name`, or the `invalid_arguments` error a call of an unknown tool gets.
    fn get(&self, name: &str) -> Result<&Arc<dyn Tool>, ToolError> {
        self.tools.get(name).ok_or_else(|| {
            ClassifiedError::new(
                ErrorClass::InvalidArguments,
                format!("unknown tool `{name}`"),
            )
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Which {
    Echo,
    Concat,
    Sleep,
    ReadFile,
    WriteFile,
    Fail,
}

/// Every native tool of this module, for a registry of one's own or the gateway's.
pub fn native_tools() -> Vec<Arc<dyn Tool>> {
    vec![
        Arc::new(Native::echo()),
        Arc::new(Native::concat()),
        Arc::new(Native::sleep()),
        Arc::new(Native::read_file()),
        Arc::new(Native::write_file()),
        Arc::new(Native::fail()),
    ]
}

/// One of the native tools.
#[derive(Debug)]
pub struct Native {
    which: Which,
    descriptor: ToolDescriptor,
}

impl Native {
    fn new(
        which: Which,
        name: &str,
        description: &str,
        risk: RiskClass,
        input_schema: Value,
    ) -> Self {
        Native {
            which,
            descriptor: ToolDescriptor {
                name: name.into(),
                description: description.into(),
                input_schema,
                output_schema: None,
                risk,
                source: ToolSource::Native,
            },
        }
    }
    /// `echo`: returns its arguments.
    pub fn echo() -> Self {
        Self::new(
            Which::Echo,
            "echo",
            "Returns its arguments unchanged.",
            RiskClass::Read,
            json!({"type": "object"}),
        )
    }
    /// `concat`: joins `parts` (strings or JSON) with `sep` into `{text}`.
    pub fn concat() -> Self {
        Self::new(
            Which::Concat,
            "concat",
            "Joins `parts` with `sep` (default empty) into {text}.",
            RiskClass::Read,
            json!({"type": "object", "properties": {"parts": {"type": "array"}, "sep": {"type": "string"}}, "required": ["parts"], "additionalProperties": false}),
        )
    }
    /// `sleep`: waits `ms` milliseconds.
    pub fn sleep() -> Self {
        Self::new(
            Which::Sleep,
            "sleep",
            "Waits `ms` milliseconds, then returns {slept_ms}.",
            RiskClass::Read,
            json!({"type": "object", "properties": {"ms": {"type": "integer", "minimum": 0}}, "required": ["ms"], "additionalProperties": false}),
        )
    }
    /// `read_file`: reads a UTF-8 file.
    pub fn read_file() -> Self {
        Self::new(
            Which::ReadFile,
            "read_file",
            "Reads the UTF-8 file at `path` into {text, bytes}.",
            RiskClass::Read,
            json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"], "additionalProperties": false}),
        )
    }
    /// `write_file`: writes `text` to `path` (idempotent).
    pub fn write_file() -> Self {
        Self::new(
            Which::WriteFile,
            "write_file",
            "Writes `text` to the file at `path` (replacing it) and returns {path, bytes}.",
            RiskClass::Write,
            json!({"type": "object", "properties": {"path": {"type": "string"}, "text": {"type": "string"}}, "required": ["path", "text"], "additionalProperties": false}),
        )
    }
    /// `fail`: always fails.
    pub fn fail() -> Self {
        Self::new(
            Which::Fail,
            "fail",
            "Always fails with error class `class` (default tool_error) and `message`.",
            RiskClass::Read,
            json!({"type": "object", "properties": {"class": {"type": "string"}, "message": {"type": "string"}}, "additionalProperties": false}),
        )
    }
}

fn arg_str<'a>(args: &'a Value, key: &str) -> Result<&'a str, ToolError> {
    args.get(key).and_then(Value::as_str).ok_or_else(|| {
        ClassifiedError::new(
            ErrorClass::InvalidArguments,
            format!("argument `{key}` must be a string"),
        )
    })
}

#[async_trait]
impl Tool for Native {
    fn descriptor(&self) -> &ToolDescriptor {
        &self.descriptor
    }

    async fn call(&self, args: Value, ctx: CallContext) -> Result<ToolOutput, ToolError> {
        match self.which {
            Which::Echo => Ok(ToolOutput::new(args)),
            Which::Concat => {
                let parts = args.get("parts").and_then(Value::as_array).ok_or_else(|| {
                    ClassifiedError::new(
                        ErrorClass::InvalidArguments,
                        "argument `parts` must be an array",
                    )
                })?;
                let sep = args.get("sep").and_then(Value::as_str).unwrap_or("");
                let text: Vec<String> = parts
                    .iter()
                    .map(|p| match p {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                Ok(ToolOutput::new(json!({"text": text.join(sep)})))
            }
            Which::Sleep => {
                let ms = args.get("ms").and_then(Value::as_u64).ok_or_else(|| {
                    ClassifiedError::new(
                        ErrorClass::InvalidArguments,
                        "argument `ms` must be a whole number",
                    )
                })?;
                // Not held through the wait: ten thousand sleeping calls kept ten thousand
                // argument maps alive (about 600 bytes each).
                drop(args);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(ToolOutput::new(json!({"slept_ms": ms}))),
                    _ = ctx.cancel.cancelled() => Err(ClassifiedError::new(ErrorClass::Cancelled, "sleep cancelled")),
                }
            }
            Which::ReadFile => {
                // What the gateway's policy judged (see `CallContext::judged_paths`), opened
                // with no link followed; else relative to where it judged (`workdir`).
                let given = arg_str(&args, "path")?;
                let target = ctx
                    .file(given)
                    .map_err(|e| ClassifiedError::tool(e.to_string()))?;
                let text = off_the_runtime(&ctx, move || read_text_file(&target)).await?;
                let bytes = text.len();
                Ok(ToolOutput::new(json!({"text": text, "bytes": bytes})))
            }
            Which::WriteFile => {
                let given = arg_str(&args, "path")?;
                let target = ctx
                    .file(given)
                    .map_err(|e| ClassifiedError::tool(e.to_string()))?;
                let text = arg_str(&args, "text")?.to_string();
                let bytes = text.len();
                let out = json!({"path": given, "bytes": bytes});
                off_the_runtime(&ctx, move || write_text_file(&target, &text)).await?;
                Ok(ToolOutput::new(out))
            }
            Which::Fail => {
                let class = args
                    .get("class")
                    .and_then(Value::as_str)
                    .and_then(|c| c.parse().ok())
                    // Only the gateway says the log could not audit a call (the run stops on
                    // it): a tool that says so is a tool failing.
                    .filter(|c| *c != ErrorClass::AuditUnavailable)
                    .unwrap_or(ErrorClass::ToolError);
                let message = args
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("failed as asked");
                Err(ClassifiedError::new(class, message))
            }
        }
    }
}

/// The largest file `read_file` reads: its text is recorded whole in the run's log, whose
/// payloads are capped at 16 MiB too.
pub const READ_FILE_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Runs file work on tokio's blocking threads: a read of a slow disk (or anything else that
/// blocks) on the runtime's own threads held up every other task of the run, and with two of
/// them blocked on this machine's two cores, timers stopped firing. The call ends when the
/// work does or when it is cancelled (a timeout, the run's end); cancelled work runs on to its
/// end unobserved, which the checks in [`open_regular`] keep short.
async fn off_the_runtime<T: Send + 'static>(
    ctx: &CallContext,
    work: impl FnOnce() -> Result<T, ToolError> + Send + 'static,
) -> Result<T, ToolError> {
    let task = tokio::task::spawn_blocking(work);
    tokio::select! {
        joined = task => joined.unwrap_or_else(|e| Err(ClassifiedError::new(
            ErrorClass::Internal,
            format!("the file work stopped: {e}"),
        ))),
        _ = ctx.cancel.cancelled() => Err(ClassifiedError::new(ErrorClass::Cancelled, "cancelled")),
    }
}

/// Refuses, by its path, what `write_file` should not write: a directory, a pipe, a device.
/// Checked before the open so the message says what the path is (opening a pipe without a
/// reader fails with a bare "No such device or address"); [`open_regular`] checks the handle
/// again, as the path may be replaced in between. A path that does not exist yet is fine.
fn regular_file(path: &Path, verb: &str) -> Result<(), ToolError> {
    match std::fs::metadata(path) {
        Ok(m) => is_regular(path, verb, m).map(drop),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(cannot(verb, path, e)),
    }
}

/// A file tool's failure: `cannot VERB PATH: WHY`.
fn cannot(verb: &str, path: &Path, why: impl std::fmt::Display) -> ToolError {
    ClassifiedError::tool(format!("cannot {verb} {}: {why}", path.display()))
}

fn is_regular(
    path: &Path,
    verb: &str,
    m: std::fs::Metadata,
) -> Result<std::fs::Metadata, ToolError> {
    if m.is_file() {
        return Ok(m);
    }
    let what = if m.is_dir() {
        "a directory"
    } else {
        "not a regular file (a pipe, socket or device)"
    };
    Err(cannot(verb, path, format_args!("it is {what}")))
}

/// How a file tool opens its file.
#[derive(Clone, Copy)]
enum Access {
    Read,
    /// Created if missing, not truncated (see [`open_regular`]).
    Write,
}

/// Opens `path` without waiting for a pipe's other end (`O_NONBLOCK`, which changes nothing
/// for a regular file) and checks that what was opened is a regular file: a path checked by
/// [`regular_file`] may have been replaced by a pipe or a device before the open. Writing
/// opens without truncating, so nothing is lost if the check refuses. A path the gateway's
/// policy judged is opened following no link ([`FileTarget::open`]): a link in its way now was
/// put there since.
fn open_regular(
    target: &FileTarget,
    verb: &str,
    access: Access,
) -> Result<(std::fs::File, std::fs::Metadata), ToolError> {
    let path = target.path();
    let open = |nonblocking: bool| -> std::io::Result<std::fs::File> {
        #[cfg(unix)]
        {
            let access = match access {
                Access::Read => libc::O_RDONLY,
                Access::Write => libc::O_WRONLY | libc::O_CREAT,
            };
            let nonblocking = if nonblocking { libc::O_NONBLOCK } else { 0 };
            // The mode `OpenOptions` gives a new file.
            target.open(access | nonblocking, 0o666)
        }
        #[cfg(not(unix))]
        {
            let _ = nonblocking;
            let mut options = std::fs::OpenOptions::new();
            match access {
                Access::Read => options.read(true),
                Access::Write => options.write(true).create(true),
            };
            options.open(path)
        }
    };
    let opened = match open(true) {
        // A file under a lease (a Samba oplock, an NFS delegation) refuses a non-blocking open
        // until the lease is broken; a pipe never answers so, so the open may wait for it.
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open(false),
        other => other,
    };
    let file = opened.map_err(|e| {
        #[cfg(unix)]
        if target.is_judged() && agent_runtime_core::fs::is_link_in_the_way(path, &e) {
            return cannot(
                verb,
                path,
                "a part of the path became a symbolic link after the policy judged it; \
                 the path is not followed",
            );
        }
        // Opening a pipe that has no reader to write, without waiting, fails so (as does a
        // device file with no device): the bare "No such device or address" says neither.
        #[cfg(unix)]
        if e.raw_os_error() == Some(libc::ENXIO) {
            return cannot(
                verb,
                path,
                "it is not a regular file (a pipe with no reader, or a device)",
            );
        }
        cannot(verb, path, e)
    })?;
    let meta = file.metadata().map_err(|e| cannot(verb, path, e))?;
    let meta = is_regular(path, verb, meta)?;
    // Blocking again for the reads and writes: a regular file ignores the flag on local
    // filesystems, but a FUSE or network one may not, and would answer EAGAIN.
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        // SAFETY: `fd` is the open descriptor `file` owns for the length of these calls.
        let cleared = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
        };
        if !cleared {
            return Err(cannot(verb, path, std::io::Error::last_os_error()));
        }
    }
    Ok((file, meta))
}

fn read_text_file(target: &FileTarget) -> Result<String, ToolError> {
    let path = target.path();
    use std::io::Read;
    let too_large = |size: u64| {
        ClassifiedError::tool(format!(
            "cannot read {}: it has {size} bytes, over read_file's limit of {READ_FILE_MAX_BYTES}",
            path.display()
        ))
    };
    // No check by path first, as writing has: the open waits for nothing and is checked.
    let (file, meta) = open_regular(target, "read", Access::Read)?;
    if meta.len() > READ_FILE_MAX_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    // Bounded again while reading: the file may have grown since.
    file.take(READ_FILE_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot("read", path, e))?;
    if bytes.len() as u64 > READ_FILE_MAX_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        ClassifiedError::tool(format!(
            "cannot read {}: not UTF-8 text (byte {} is not)",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

fn write_text_file(target: &FileTarget, text: &str) -> Result<(), ToolError> {
    let path = target.path();
    use std::io::Write;
    // Not for a judged path: the check by name would follow a link put in its way (and tell
    // what lies outside); the open refuses that, and checks what it opened.
    if !target.is_judged() {
        regular_file(path, "write")?;
    }
    let (mut file, _) = open_regular(target, "write", Access::Write)?;
    file.set_len(0).map_err(|e| cannot("write", path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| cannot("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_runtime_core::Actor;

    #[cfg(unix)]
    fn make_fifo(path: &str) {
        let c = std::ffi::CString::new(path).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(
            unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
            0,
            "mkfifo {path}"
        );
    }

    async fn call(tool: Native, args: Value) -> Result<Value, String> {
        tool.call(args, CallContext::new(Actor::System))
            .await
            .map(|o| o.value)
            .map_err(|e| e.message)
    }

    /// `read_file` reads regular files only, bounded: a named pipe would wait for a writer,
    /// `/dev/zero` would never end, a directory cannot be read; a file over the limit and one
    /// that is not UTF-8 are refused with their reasons. `write_file` will not write into a pipe
    /// either (opening it would wait for a reader).
    #[tokio::test]
    async fn file_tools_refuse_what_would_block_or_never_end() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        let read = |path: String| call(Native::read_file(), json!({"path": path}));

        std::fs::write(at("a.txt"), "hello").unwrap();
        assert_eq!(
            read(at("a.txt")).await.unwrap(),
            json!({"text": "hello", "bytes": 5})
        );
        assert!(
            read(at("gone.txt"))
                .await
                .unwrap_err()
                .contains("No such file")
        );
        let e = read(dir.path().to_string_lossy().into_owned())
            .await
            .unwrap_err();
        assert!(e.ends_with("it is a directory"), "{e}");
        #[cfg(unix)]
        {
            let e = read("/dev/zero".into()).await.unwrap_err();
            assert!(e.contains("not a regular file"), "{e}");
            let fifo = at("pipe");
            make_fifo(&fifo);
            let e = read(fifo.clone()).await.unwrap_err();
            assert!(e.contains("not a regular file"), "{e}");
            let e = call(Native::write_file(), json!({"path": fifo, "text": "x"}))
                .await
                .unwrap_err();
            assert!(
                e.contains("cannot write") && e.contains("not a regular file"),
                "{e}"
            );
        }
        std::fs::write(at("latin1.txt"), b"caf\xe9").unwrap();
        let e = read(at("latin1.txt")).await.unwrap_err();
        assert!(e.ends_with("not UTF-8 text (byte 3 is not)"), "{e}");
        let big = std::fs::File::create(at("big.bin")).unwrap();
        big.set_len(READ_FILE_MAX_BYTES + 1).unwrap();
        let e = read(at("big.bin")).await.unwrap_err();
        assert!(e.contains("over read_file's limit"), "{e}");

        let out = call(
            Native::write_file(),
            json!({"path": at("b.txt"), "text": "hi"}),
        )
        .await
        .unwrap();
        assert_eq!(out["bytes"], 2);
        assert_eq!(std::fs::read_to_string(at("b.txt")).unwrap(), "hi");
        // Over a longer file: nothing of the old text is left behind.
        std::fs::write(at("c.txt"), "a longer old text").unwrap();
        call(
            Native::write_file(),
            json!({"path": at("c.txt"), "text": "new"}),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read_to_string(at("c.txt")).unwrap(), "new");
    }

    /// The handle of a regular file is blocking again once checked.
    #[cfg(unix)]
    #[test]
    fn an_opened_regular_file_blocks_as_usual() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt").to_string_lossy().into_owned();
        let target = CallContext::new(Actor::System).file(&path).unwrap();
        let (file, _) = open_regular(&target, "write", Access::Write).unwrap();
        // SAFETY: reading the flags of a descriptor `file` owns.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        assert!(flags >= 0 && flags & libc::O_NONBLOCK == 0, "{flags:#x}");
    }

    /// A path that passed the check by name may be a pipe by the time it is opened: the open
    /// does not wait for the pipe's other end, and what was opened is checked again.
    #[cfg(unix)]
    #[test]
    fn a_pipe_swapped_in_after_the_check_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(dir.path()).unwrap();
        let fifo = dir.join("swapped").to_string_lossy().into_owned();
        make_fifo(&fifo);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            // Opened as a judged path (following no link) and as any other: the same checks.
            let mut judged = CallContext::new(Actor::System);
            judged.judged_paths = Some(std::sync::Arc::new(
                [(path.clone(), Some(std::path::PathBuf::from(&path)))].into(),
            ));
            for ctx in [CallContext::new(Actor::System), judged] {
                let target = ctx.file(&path).unwrap();
                let read = open_regular(&target, "read", Access::Read)
                    .map(|_| ())
                    .map_err(|e| e.message);
                let write = open_regular(&target, "write", Access::Write)
                    .map(|_| ())
                    .map_err(|e| e.message);
                let _ = tx.send((read, write));
            }
        });
        for _ in [false, true] {
            let (read, write) = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("opening a pipe waited for its other end");
            assert!(
                read.unwrap_err()
                    .ends_with("not a regular file (a pipe, socket or device)")
            );
            // With no reader, opening to write fails at once (ENXIO) rather than waiting.
            assert!(
                write
                    .unwrap_err()
                    .starts_with(&format!("cannot write {fifo}: "))
            );
        }
    }

    /// A path the policy judged is opened as judged: a folder of it swapped for a link since
    /// (as a command of the same run could do) fails the call, for reading and for writing,
    /// and nothing outside is read or written.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_judged_path_is_not_followed_through_a_link_put_in_its_way() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let ws = root.join("ws");
        std::fs::create_dir_all(ws.join("sub")).unwrap();
        std::fs::write(ws.join("sub/a.txt"), "inside").unwrap();
        std::fs::create_dir_all(root.join("out")).unwrap();
        std::fs::write(root.join("out/a.txt"), "SECRET").unwrap();
        let mut ctx = CallContext::new(Actor::System);
        ctx.workdir = Some(ws.as_path().into());
        ctx.judged_paths = Some(std::sync::Arc::new(
            [
                ("sub/a.txt".to_string(), Some(ws.join("sub/a.txt"))),
                ("far/x".to_string(), None),
            ]
            .into(),
        ));
        let reader = Native::read_file();
        let read = || reader.call(json!({"path": "sub/a.txt"}), ctx.clone());
        assert_eq!(read().await.unwrap().value["text"], "inside");
        std::fs::rename(ws.join("sub"), ws.join("sub-moved")).unwrap();
        std::os::unix::fs::symlink(root.join("out"), ws.join("sub")).unwrap();
        let err = read().await.unwrap_err();
        assert!(
            err.message
                .contains("became a symbolic link after the policy judged it"),
            "{err}"
        );
        let err = Native::write_file()
            .call(
                json!({"path": "sub/a.txt", "text": "overwritten"}),
                ctx.clone(),
            )
            .await
            .unwrap_err();
        assert!(err.message.contains("symbolic link"), "{err}");
        assert_eq!(
            std::fs::read_to_string(root.join("out/a.txt")).unwrap(),
            "SECRET"
        );
        // A path the policy did not judge is opened as before, links followed.
        let v = Native::read_file()
            .call(json!({"path": ws.join("sub/a.txt")}), ctx.clone())
            .await
            .unwrap();
        assert_eq!(v.value["text"], "SECRET");
        // A path the policy could not resolve is not opened at all.
        let err = Native::read_file()
            .call(json!({"path": "far/x"}), ctx.clone())
            .await
            .unwrap_err();
        assert!(err.message.contains("could not resolve"), "{err}");
    }

    /// Writing to a judged path that is a pipe with no reader (no pre-check there, so that no
    /// stat follows a link) says what it is, not the bare "No such device or address".
    #[cfg(unix)]
    #[tokio::test]
    async fn a_judged_path_that_is_a_pipe_is_named_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let ws = std::fs::canonicalize(dir.path()).unwrap();
        let fifo = ws.join("pipe");
        make_fifo(&fifo.to_string_lossy());
        let mut ctx = CallContext::new(Actor::System);
        ctx.workdir = Some(ws.as_path().into());
        ctx.judged_paths = Some(std::sync::Arc::new(
            [("pipe".to_string(), Some(fifo.clone()))].into(),
        ));
        let err = Native::write_file()
            .call(json!({"path": "pipe", "text": "x"}), ctx.clone())
            .await
            .unwrap_err();
        assert!(
            err.message.contains("cannot write")
                && err
                    .message
                    .contains("not a regular file (a pipe with no reader"),
            "{err}"
        );
        let err = Native::read_file()
            .call(json!({"path": "pipe"}), ctx)
            .await
            .unwrap_err();
        assert!(err.message.contains("not a regular file"), "{err}");
    }

    /// A cancelled call ends at once, whatever its file work is doing.
    #[tokio::test]
    async fn a_cancelled_file_call_ends() {
        let ctx = CallContext::new(Actor::System);
        ctx.cancel.cancel();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Work that would wait forever, as a read of a stuck disk does.
        let e = off_the_runtime(&ctx, move || {
            let _ = rx.recv();
            Ok(())
        })
        .await
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Cancelled);
        drop(tx);
    }
}
