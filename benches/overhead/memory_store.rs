//! MemoryStore: OS threads, each with its own current-thread runtime.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use idempotency::{
    ClaimOutcome, ClaimRequest, IdempotencyChecker, IdempotencyConfig, IdempotencyStore,
    MemoryStore,
};

use crate::compare::{median, ratios};
use crate::problems::{ANOMALIES, ERRORS, ok, problem};
use crate::report::{Report, per_s};
use crate::workload::{envelope, uuid_key, via_macro, via_process};
use crate::{MEMORY_STORE_MEASURE, MEMORY_STORE_ROUNDS, PREFIX, RESULT, TTL_MS, WARMUP};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemoryPath {
    /// `IdempotencyStore::claim` then `complete`.
    Store,
    /// `checker.process` with the no-op handler.
    Checker,
    /// The `#[idempotent]` handler.
    Macro,
}

/// Operations per second on `threads` threads sharing one fresh store (each
/// operation a fresh key: claim + complete).
pub(crate) fn memory_store_rate(threads: usize, path: MemoryPath, duration: Duration) -> f64 {
    let store = Arc::new(MemoryStore::new());
    let shared: Arc<dyn IdempotencyStore> = store.clone();
    let checker = IdempotencyChecker::from_shared(shared, IdempotencyConfig::default());
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads as u64)
        .map(|thread| {
            let (store, checker) = (Arc::clone(&store), checker.clone());
            let (stop, barrier) = (Arc::clone(&stop), Arc::clone(&barrier));
            // Named per path, for `perf report --comm`.
            let name = format!("mem-{}-{thread}", format!("{path:?}").to_lowercase());
            let spawned = std::thread::Builder::new().name(name).spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                barrier.wait();
                runtime.block_on(memory_loop(thread, &store, &checker, path, &stop))
            });
            spawned.expect("spawn a thread")
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    let rate = total as f64 / start.elapsed().as_secs_f64();
    drop(checker);
    drop(store);
    rate
}

pub(crate) async fn memory_loop(
    thread: u64,
    store: &MemoryStore,
    checker: &IdempotencyChecker,
    path: MemoryPath,
    stop: &AtomicBool,
) -> u64 {
    const TOKEN: &str = "4f9d2c7b1e0a48d6b3c5e7f9a1b3c5d7";
    let ttl = Duration::from_millis(TTL_MS);
    let lease = Duration::from_secs(300);
    let result =
        idempotency::ResultJson::new(serde_json::to_string(RESULT).expect("a string serializes"))
            .expect("JSON");
    let mut key = String::new();
    let mut event = envelope(0);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = (thread << 32) + i;
        match path {
            MemoryPath::Store => {
                uuid_key(&mut key, PREFIX, n);
                let raw = &key[PREFIX.len()..];
                let mut request = ClaimRequest::new(&key, TOKEN, lease, ttl);
                request.recorded_key = raw;
                request.event_id = Some(raw);
                request.event_type = Some("order.placed");
                match store.claim(&request).await {
                    Ok(ClaimOutcome::Acquired(lease)) => {
                        ok(store.complete(&lease, Some(black_box(&result)), ttl).await);
                    }
                    Ok(other) => problem(&ANOMALIES, format_args!("memory claim: {other:?}")),
                    Err(e) => problem(&ERRORS, e),
                }
            }
            MemoryPath::Checker => {
                uuid_key(&mut event.event_id, "", n);
                if let Some(processed) = ok(via_process(checker, &event).await)
                    && !processed.was_executed()
                {
                    problem(&ANOMALIES, "memory: a fresh key was replayed");
                }
            }
            MemoryPath::Macro => {
                uuid_key(&mut event.event_id, "", n);
                black_box(ok(via_macro(checker, &event).await));
            }
        }
        i += 1;
    }
    i
}

/// Events per batch of the paired macro measurement.
pub(crate) const PAIRED_BATCH: u64 = 64;

/// `#[idempotent]` against `checker.process` over MemoryStore, paired: in
/// each round one fresh store takes batches of [`PAIRED_BATCH`] new events
/// through the two paths in the order process, macro, macro, process (so a
/// cost that depends on a batch's position, like the table growing, falls
/// on both alike). Returns each round's macro rate over its process rate.
/// An A/A run of this design (process against process) gives medians within
/// 1% of 1.0, where separate fresh-store rounds per path move by +-5%.
pub(crate) fn memory_macro_paired(rounds: usize, duration: Duration) -> Vec<f64> {
    (0..rounds)
        .map(|_| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(async {
                let checker = IdempotencyChecker::new(MemoryStore::new());
                let mut event = envelope(0);
                let (mut spent, mut events) = ([Duration::ZERO; 2], [0u64; 2]);
                let (start, mut n, mut batch) = (Instant::now(), 0u64, 0usize);
                while start.elapsed() < duration {
                    let via_attribute = [false, true, true, false][batch % 4];
                    batch += 1;
                    let began = Instant::now();
                    for _ in 0..PAIRED_BATCH {
                        uuid_key(&mut event.event_id, "", n);
                        if via_attribute {
                            black_box(ok(via_macro(&checker, &event).await));
                        } else {
                            black_box(ok(via_process(&checker, &event).await));
                        }
                        n += 1;
                    }
                    spent[usize::from(via_attribute)] += began.elapsed();
                    events[usize::from(via_attribute)] += PAIRED_BATCH;
                }
                let rate = |i: usize| events[i] as f64 / spent[i].as_secs_f64();
                rate(1) / rate(0)
            })
        })
        .collect()
}

/// Interleaved rounds of `paths` on `threads` threads; the rates per path.
pub(crate) fn memory_store_rounds(threads: usize, paths: &[MemoryPath]) -> Vec<Vec<f64>> {
    for path in paths {
        memory_store_rate(threads, *path, WARMUP);
    }
    // Every order of the paths in turn, as for the Redis rounds.
    let orders: &[&[usize]] = match paths.len() {
        3 => &[
            &[0, 1, 2],
            &[1, 2, 0],
            &[2, 0, 1],
            &[0, 2, 1],
            &[2, 1, 0],
            &[1, 0, 2],
        ],
        2 => &[&[0, 1], &[1, 0]],
        _ => &[&[0]],
    };
    let mut rates = vec![Vec::new(); paths.len()];
    for round in 0..MEMORY_STORE_ROUNDS {
        for &which in orders[round % orders.len()] {
            rates[which].push(memory_store_rate(
                threads,
                paths[which],
                MEMORY_STORE_MEASURE,
            ));
        }
    }
    rates
}

pub(crate) fn memory_phases(report: &mut Report) {
    use MemoryPath::{Checker, Macro, Store};
    let one = memory_store_rounds(1, &[Store, Checker, Macro]);
    let two = memory_store_rounds(2, &[Store, Checker]);
    let store_1 = median(&one[0]);
    let how = format!(
        "median of {MEMORY_STORE_ROUNDS} interleaved rounds of {} ms, fresh store each",
        MEMORY_STORE_MEASURE.as_millis()
    );
    let mem = "MemoryStore";
    report.row(mem, "store claim+complete, 1 thread", per_s(store_1), how);
    report.row(
        mem,
        "store claim+complete, 2 threads",
        per_s(median(&two[0])),
        "2 OS threads sharing one store".to_owned(),
    );
    report.row(
        mem,
        "checker.process new event, 1 thread",
        per_s(median(&one[1])),
        format!("{:.3}x store level", ratios(&one[1], &one[0])),
    );
    let macro_ratio = median(&memory_macro_paired(
        MEMORY_STORE_ROUNDS,
        MEMORY_STORE_MEASURE,
    ));
    report.row(
        mem,
        "#[idempotent] new event, 1 thread",
        per_s(median(&one[2])),
        format!(
            "{macro_ratio:.3}x checker.process, paired: batches of {PAIRED_BATCH} on one \
             store per round, median of {MEMORY_STORE_ROUNDS} rounds (separate rounds: {:.3}x)",
            ratios(&one[2], &one[1])
        ),
    );
    report.row(
        mem,
        "checker.process new event, 2 threads",
        per_s(median(&two[1])),
        "2 OS threads sharing one checker".to_owned(),
    );
    report.target(
        "MemoryStore claim+complete on one thread >= 1,000,000/s",
        format!("{} ({:.2}x)", per_s(store_1), store_1 / 1e6),
        store_1 >= 1e6,
    );
    report.target(
        "#[idempotent] over MemoryStore (no network: the macro's own cost) >= 0.98x checker.process",
        format!("{macro_ratio:.3}x"),
        macro_ratio >= 0.98,
    );
}
