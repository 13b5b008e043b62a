//! An ordered parallel map: one thread reads batches, workers transform them, the caller
//! consumes results in the original order. Verify and export use it to spread decryption and
//! hashing over the cores while SQLite reads stay on one connection.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};

/// Runs `produce` on a reader thread, which hands batches to `emit` (which returns false once the
/// consumer has stopped); `work` maps each batch on one of the worker threads; `consume` sees the
/// results in order and returns false to stop early. Returns `produce`'s error, if any.
pub(crate) fn ordered_parallel<T, U, E>(
    produce: impl FnOnce(&mut dyn FnMut(Vec<T>) -> bool) -> Result<(), E> + Send,
    work: impl Fn(Vec<T>) -> U + Sync,
    mut consume: impl FnMut(U) -> bool,
) -> Result<(), E>
where
    T: Send,
    U: Send,
    E: Send,
{
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let (batch_tx, batch_rx) = sync_channel::<(u64, Vec<T>)>(workers * 2);
    let batch_rx: Mutex<Receiver<(u64, Vec<T>)>> = Mutex::new(batch_rx);
    let stop = AtomicBool::new(false);
    let stop = &stop;
    std::thread::scope(|scope| {
        let (result_tx, result_rx) = sync_channel::<(u64, U)>(workers * 2);
        let reader = scope.spawn(move || {
            let mut idx = 0u64;
            let mut emit = |batch: Vec<T>| {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                let ok = batch_tx.send((idx, batch)).is_ok();
                idx += 1;
                ok
            };
            produce(&mut emit)
        });
        for _ in 0..workers {
            let result_tx = result_tx.clone();
            let batch_rx = &batch_rx;
            let work = &work;
            scope.spawn(move || {
                loop {
                    let next = batch_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((idx, batch)) = next else { break };
                    if result_tx.send((idx, work(batch))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(result_tx);
        let mut pending = BTreeMap::new();
        let mut next = 0u64;
        'outer: for (idx, out) in result_rx.iter() {
            pending.insert(idx, out);
            while let Some(out) = pending.remove(&next) {
                next += 1;
                if !consume(out) {
                    break 'outer;
                }
            }
        }
        // Dropping the result receiver makes workers stop, which drops the batch receiver,
        // which makes the reader's next send fail and the reader stop.
        stop.store(true, Ordering::Relaxed);
        drop(result_rx);
        // Drain until the reader has gone, so a reader blocked on a full queue sees the stop.
        while batch_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv()
            .is_ok()
        {}
        reader
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
