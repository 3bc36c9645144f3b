//! `IDEMPOTENCY_BENCH_ONLY=spin:<job>[:<tasks>[:<seconds>]]`: one workload
//! on Redis, alone and long enough for a profiler to attach to.
//! `IDEMPOTENCY_BENCH_BURN=<iterations>` adds a busy loop to each of the
//! hand-written client's duplicates (`ref-dup`).

use std::time::{Duration, Instant};

use idempotency_test_support::RedisServer;

use crate::bench::Bench;
use crate::cpu::{TICKS_PER_SECOND, cpu_sample, write_calls};
use crate::workload::{Job, run};

/// Runs the job `spec` names and prints its rate and what each event cost
/// the client and Redis.
pub(crate) fn spin_alone(server: &RedisServer, started: Instant, spec: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut parts = spec.split(':').skip(1);
    let name = parts.next();
    if let Some(which @ ("worker" | "bare")) = name {
        let messages = parts.next().and_then(|m| m.parse().ok()).unwrap_or(100_000);
        let rate = runtime.block_on(crate::pipelines::spin_worker(
            server,
            messages,
            which == "bare",
        ));
        println!("{which}: {rate:.0} msg/s over {messages} messages");
        return;
    }
    if let Some(which @ ("memory-store" | "memory-checker")) = name {
        let path = if which == "memory-store" {
            crate::memory_store::MemoryPath::Store
        } else {
            crate::memory_store::MemoryPath::Checker
        };
        let seconds = parts.next().and_then(|s| s.parse().ok()).unwrap_or(5);
        let rate = crate::memory_store::memory_store_rate(1, path, Duration::from_secs(seconds));
        println!("{which}, 1 thread: {rate:.0}/s over {seconds} s");
        return;
    }
    let job = match name {
        Some("ref-new") => Job::RefNew,
        Some("ref-new-script") => Job::RefNewScript,
        Some("ref-dup") => Job::RefDup,
        Some("process-new") => Job::ProcessNew,
        Some("process-dup") => Job::ProcessDup,
        Some("macro-new") => Job::MacroNew,
        Some("macro-dup") => Job::MacroDup,
        Some("peer-new") => Job::PeerNew,
        Some("peer-dup") => Job::PeerDup,
        other => {
            eprintln!(
                "unknown job {other:?}: one of ref-new, ref-new-script, ref-dup, process-new, process-dup, macro-new, macro-dup, peer-new, peer-dup, worker, bare, memory-store, memory-checker"
            );
            std::process::exit(2);
        }
    };
    let tasks = parts.next().and_then(|t| t.parse().ok()).unwrap_or(32);
    let seconds = parts.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    runtime.block_on(async {
        let bench = Bench::connect(server, started).await;
        bench.seed_duplicates().await;
        bench.progress(format_args!(
            "spinning {job:?} in {tasks} tasks for {seconds} s (pid {})",
            std::process::id()
        ));
        let (redis_before, reads_before) = bench.redis_cpu().await;
        let before = cpu_sample();
        let writes_before = write_calls();
        let mut worker = bench.worker(job);
        worker.burn = std::env::var("IDEMPOTENCY_BENCH_BURN")
            .ok()
            .and_then(|b| b.parse().ok())
            .unwrap_or(0);
        let (events, rate) = run(&worker, tasks, Duration::from_secs(seconds)).await;
        let writes_after = write_calls();
        let after = cpu_sample();
        let (redis_after, reads_after) = bench.redis_cpu().await;
        let per_event = |x: f64| x / events.max(1) as f64;
        let micros = |ticks: u64| per_event(ticks as f64 / TICKS_PER_SECOND * 1e6);
        println!(
            "{job:?}, {tasks} tasks: {rate:.0}/s; per event: client CPU {:.1} us ({:.1} us in \
             the kernel), Redis CPU {:.1} us, Redis socket reads {:.3}, client writes {:.3}",
            micros(after.own - before.own),
            micros(after.own_system - before.own_system),
            per_event((redis_after - redis_before) * 1e6),
            // Less the INFO call that read the counter.
            per_event(reads_after.saturating_sub(reads_before).saturating_sub(1) as f64),
            per_event((writes_after - writes_before) as f64),
        );
    });
}
