//! Live agents against an in-memory log or no log, to separate the scheduler's overhead from
//! the store's: `cargo run --release -p agent-runtime-workforce --example live_agents -- 10000 2000 none`.
//! Uses mimalloc and turns transparent huge pages off, as the `agent-runtime` binary does (see
//! its `main.rs` for why); the binary also sends the usual alignments to `mi_malloc` directly,
//! which this example leaves out (about 3 % of the driver's instructions).

use std::sync::Arc;

use agent_runtime_core::{EventSink, MemoryLog};
use agent_runtime_workforce::bench::{NullSink, live_agents};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // SAFETY: PR_SET_THP_DISABLE touches no memory; an error (an old kernel) only costs speed.
    #[cfg(target_os = "linux")]
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let args: Vec<String> = std::env::args().collect();
    let n: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let ms: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let sink: Arc<dyn EventSink> = match args.get(3).map(String::as_str) {
        Some("none") => Arc::new(NullSink),
        _ => Arc::new(MemoryLog::default()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(live_agents(n, ms, sink)) {
        Ok(r) => println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
