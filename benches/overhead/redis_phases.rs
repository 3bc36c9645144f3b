//! The Redis measurements: raw rates, the interleaved comparisons of ours,
//! the hand-written reference and the peer, round trips, memory per record.

use std::sync::Arc;
use std::time::Instant;

use idempotency::{EventEnvelope, IdempotencyChecker, IdempotencyConfig};
use idempotency_test_support::RedisServer;

use crate::bench::Bench;
use crate::compare::{Compared, compare, orders_of_four, orders_of_three};
use crate::counting::{Counted, count, verify_counting};
use crate::powertools::powertools_rows;
use crate::problems::ok;
use crate::redis_memory::{RecordMemory, memory_ours, memory_reference};
use crate::report::{Report, per_s};
use crate::workload::{Job, Kind, Payload, Variant, envelope, run, via_process};
use crate::{
    CLAIM_VALUE, COUNTED_EVENTS, DONE_VALUE, HOT_BASE, HOT_KEYS, MEASURE, MEMORY_SAMPLE,
    RAW_MEASURE, RESULT, ROUNDS, TASKS, WARMUP,
};

/// The four workloads of every comparison.
pub(crate) const WORKLOADS: [(Kind, usize, &str); 4] = [
    (Kind::New, 1, "new events, sequential"),
    (Kind::New, TASKS, "new events, 32-way"),
    (Kind::Duplicate, 1, "duplicates, sequential"),
    (Kind::Duplicate, TASKS, "duplicates, 32-way"),
];

/// What each contender guarantees, for the side-by-side table.
const GUARANTEES: [[&str; 5]; 3] = [
    [
        "ours (`checker.process`, `RedisStore`)",
        "yes: the lease's exact document is compared by a small script (Redis 7) or `SET ... IFEQ` (Valkey >= 8.1), with the finish script checking the token when they differ",
        "yes: renewed in the background while the handler runs",
        "yes: `FAILED` with the error; the next delivery retries",
        "yes: the stored result",
    ],
    [
        "`idempotent` 0.3.0 (`ValkeyStore`)",
        "yes: a fencing token checked by its complete script",
        "no: a handler that outlives the claim's TTL loses it",
        "no: a failed claim stays until its TTL or `remove`",
        "yes: the cached response",
    ],
    [
        "hand-written (`SET NX GET`, `SET XX`)",
        "no: `SET XX` overwrites whoever holds the key",
        "no",
        "no",
        "yes: the stored value",
    ],
];

/// The side-by-side rows of ours, `idempotent` and the hand-written client
/// on one server, as a table: rates, ratios, client and server CPU per
/// event, the server's socket reads per event.
/// `commandstats` gives Redis's execution time per event (from the
/// sequential counts) for a new event and a duplicate, in the order ours,
/// idempotent, hand-written.
pub(crate) fn side_by_side(
    report: &mut Report,
    server: &str,
    compared: &[(Kind, &'static str, Compared)],
    commandstats: [[&Counted; 3]; 2],
) {
    let (ours, peer, reference) = (Variant::Process, Variant::Peer, Variant::Reference);
    let rows = compared
        .iter()
        .map(|(kind, label, c)| {
            let cpu = |v: Variant| {
                let (client, server) = c.cost[v as usize].per_event_us();
                format!("{client:.1} / {server:.1}")
            };
            vec![
                (*label).to_owned(),
                per_s(c.median(ours)),
                per_s(c.median(peer)),
                per_s(c.median(reference)),
                format!("{:.3}x", c.ratio(ours, peer)),
                format!("{:.3}x", c.ratio(ours, reference)),
                cpu(ours),
                cpu(peer),
                cpu(reference),
                {
                    let [a, b, c] = commandstats[*kind as usize];
                    format!(
                        "{:.1} / {:.1} / {:.1}",
                        a.server_us, b.server_us, c.server_us
                    )
                },
                {
                    let reads = |v: Variant| c.cost[v as usize].reads_per_event();
                    format!(
                        "{:.2} / {:.2} / {:.2}",
                        reads(ours),
                        reads(peer),
                        reads(reference)
                    )
                },
            ]
        })
        .collect();
    report.table(
        format!(
            "Side by side on {server} (medians of interleaved rounds; CPU per event in us, \
             client / server main thread; commandstats: the server's execution time per event in a \
             sequential count, only the scripts' where scripts run; socket reads: the server's reads \
             from client sockets per event, fewer when requests arrive batched)"
        ),
        [
            "workload",
            "ours",
            "`idempotent` 0.3.0",
            "hand-written, unfenced",
            "ours / idempotent",
            "ours / hand-written",
            "CPU ours",
            "CPU idempotent",
            "CPU hand-written",
            "commandstats us: ours / idempotent / hand-written",
            "socket reads per event: ours / idempotent / hand-written",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
    );
}

/// The row of `idempotent` for `label`.
pub(crate) fn peer_row(report: &mut Report, section: &'static str, label: &str, c: &Compared) {
    report.row(
        section,
        format!("idempotent 0.3.0 {label}"),
        per_s(c.median(Variant::Peer)),
        format!(
            "checker.process {:.3}x it, it {:.3}x reference; {}",
            c.ratio(Variant::Process, Variant::Peer),
            c.ratio(Variant::Peer, Variant::Reference),
            c.cpu_note(Variant::Peer)
        ),
    );
}

/// The Redis measurements, then AWS Powertools on the same server; returns
/// the CPU seconds redis-server and Powertools' Python process used.
pub(crate) async fn redis_phases(
    server: &RedisServer,
    started: Instant,
    report: &mut Report,
) -> f64 {
    let bench = Bench::connect(server, started).await;
    let server_info = bench.info(&["server"]).await;
    println!(
        "redis:    redis-server {} (port {}, no persistence)",
        server_info.get("redis_version").map_or("?", String::as_str),
        server.port()
    );
    println!(
        "runtime:  tokio multi-thread, 2 workers; {TASKS}-way = {TASKS} tasks on one multiplexed \
         connection; {ROUNDS} interleaved rounds of {} ms per variant",
        MEASURE.as_millis()
    );
    println!(
        "values:   result {} B of JSON; reference values {} B (claim) and {} B (done)",
        RESULT.len() + 2,
        CLAIM_VALUE.len(),
        DONE_VALUE.len()
    );

    // How this server counts commands called by scripts.
    let (counting_ok, counting) = verify_counting(&bench).await;
    println!("counting: {counting}");

    // Raw rates.
    bench.flushall().await;
    bench.seed_duplicates().await;
    let mut raw = Vec::new();
    for (job, name) in [
        (Job::Ping, "PING, sequential"),
        (Job::Get, "GET, sequential"),
        (Job::PipelinedGet, "GET, pipelined x100"),
    ] {
        bench.progress(format_args!("raw {name}"));
        let worker = bench.worker(job);
        run(&worker, 1, WARMUP).await;
        let (_, rate) = run(&worker, 1, RAW_MEASURE).await;
        raw.push(rate);
        report.row(
            "reference",
            format!("raw {name}"),
            per_s(rate),
            String::new(),
        );
    }
    let ping = raw[0];

    // The interleaved comparisons.
    let orders = orders_of_four([
        Variant::Reference,
        Variant::Process,
        Variant::Macro,
        Variant::Peer,
    ]);
    let mut compared = Vec::new();
    for (kind, tasks, label) in WORKLOADS {
        let c = compare(&bench, kind, tasks, label, &orders, ROUNDS).await;
        compared.push((kind, label, c));
    }

    // The hand-written client completing by a script of our compare
    // script's cost, in rounds of its own with the plain one and ours: how
    // much of our client CPU per new event is the Lua completion's, which
    // any fenced client pays on Redis 7.
    let scripted = compare(
        &bench,
        Kind::New,
        TASKS,
        "new events, 32-way, scripted completion",
        &orders_of_three([
            Variant::Reference,
            Variant::ScriptedReference,
            Variant::Process,
        ]),
        ROUNDS,
    )
    .await;

    // Duplicates with the local replay cache.
    bench.progress("duplicates with the local cache");
    let cached_config = IdempotencyConfig::builder()
        .local_cache(100_000, "60s")
        .build()
        .expect("a valid configuration");
    let cached = IdempotencyChecker::with_config(bench.store.clone(), cached_config);
    let hot: Arc<[EventEnvelope<Payload>]> = (0..HOT_KEYS as u64)
        .map(|k| envelope(HOT_BASE + k))
        .collect();
    for event in hot.iter() {
        ok(via_process(&cached, event).await);
    }
    let mut cached_worker = bench.worker(Job::ProcessDup);
    cached_worker.checker = cached.clone();
    cached_worker.dup_envelopes = Arc::clone(&hot);
    run(&cached_worker, 1, WARMUP).await;
    let before = cached.stats();
    let (cached_ops, cached_rate) = run(&cached_worker, 1, RAW_MEASURE).await;
    let after = cached.stats();
    let hits = after.cache_hits - before.cache_hits;

    // Round trips.
    bench.progress("round trips (INFO commandstats)");
    bench.flushall().await;
    bench.seed_duplicates().await;
    let new = count(&bench, bench.worker(Job::ProcessNew), COUNTED_EVENTS).await;
    let dup = count(&bench, bench.worker(Job::ProcessDup), COUNTED_EVENTS).await;
    let ref_new = count(&bench, bench.worker(Job::RefNew), COUNTED_EVENTS).await;
    let ref_dup = count(&bench, bench.worker(Job::RefDup), COUNTED_EVENTS).await;
    let cached_dup = count(&bench, cached_worker.clone(), COUNTED_EVENTS).await;
    let peer_new = count(&bench, bench.worker(Job::PeerNew), COUNTED_EVENTS).await;
    let peer_dup = count(&bench, bench.worker(Job::PeerDup), COUNTED_EVENTS).await;

    // Rows, in reading order.
    let redis_cpu = |c: &Compared, variant: Variant| c.cpu_note(variant);
    for (_, label, c) in &compared {
        report.row(
            "reference",
            format!("hand-written {label}"),
            per_s(c.median(Variant::Reference)),
            format!(
                "median of {ROUNDS} interleaved rounds; {}",
                redis_cpu(c, Variant::Reference)
            ),
        );
    }
    for (_, label, c) in &compared {
        report.row(
            "ours (Redis)",
            format!("checker.process {label}"),
            per_s(c.median(Variant::Process)),
            format!(
                "{:.3}x reference; {}",
                c.process_vs_reference(),
                redis_cpu(c, Variant::Process)
            ),
        );
        report.row(
            "ours (Redis)",
            format!("#[idempotent] {label}"),
            per_s(c.median(Variant::Macro)),
            format!(
                "{:.3}x reference, {:.3}x process; {}",
                c.ratio(Variant::Macro, Variant::Reference),
                c.macro_vs_process(),
                redis_cpu(c, Variant::Macro)
            ),
        );
    }
    for (_, label, c) in &compared {
        peer_row(report, "peer (Redis)", label, c);
    }
    report.row(
        "reference",
        "hand-written new events, 32-way, completing by script",
        per_s(scripted.median(Variant::ScriptedReference)),
        format!(
            "{ROUNDS} interleaved rounds of its own with the hand-written client ({:.3}x its \
             rate) and checker.process ({:.3}x this rate); client CPU per event: \
             checker.process {:.2}x this one's, the hand-written client {:.2}x; {}",
            scripted.ratio(Variant::ScriptedReference, Variant::Reference),
            scripted.ratio(Variant::Process, Variant::ScriptedReference),
            scripted.client_cpu_ratio(Variant::Process, Variant::ScriptedReference),
            scripted.client_cpu_ratio(Variant::Reference, Variant::ScriptedReference),
            scripted.cpu_note(Variant::ScriptedReference)
        ),
    );
    report.row(
        "ours (Redis)",
        "checker.process duplicates, local cache, sequential",
        per_s(cached_rate),
        format!(
            "{HOT_KEYS} hot keys; {:.1}x raw PING; cache hits {:.0}% of calls",
            cached_rate / ping,
            100.0 * hits as f64 / cached_ops.max(1) as f64
        ),
    );
    let rt = "round trips";
    let per_event = |c: &Counted| format!("{:.2}/event", c.round_trips());
    for (name, counted) in [
        ("checker.process new event", &new),
        ("checker.process duplicate", &dup),
        ("checker.process duplicate, local cache", &cached_dup),
        ("hand-written new event", &ref_new),
        ("hand-written duplicate", &ref_dup),
        ("idempotent 0.3.0 new event", &peer_new),
        ("idempotent 0.3.0 duplicate", &peer_dup),
    ] {
        report.row(rt, name, per_event(counted), counted.describe());
    }
    let reference_counts_right = ref_new.round_trips() == 2.0 && ref_dup.round_trips() == 1.0;
    if !counting_ok || !reference_counts_right {
        println!(
            "WARNING: the counting method did not verify on this server (see `counting:` and the \
             hand-written rows); the round-trip targets below may be wrong"
        );
    }

    // Memory per record.
    bench.progress("Redis memory per COMPLETED record");
    let ours_raw = memory_ours(&bench, false).await;
    let ours_hashed = memory_ours(&bench, true).await;
    let ref_raw = memory_reference(&bench, false).await;
    let ref_hashed = memory_reference(&bench, true).await;
    let mem_note = |m: &RecordMemory| {
        format!(
            "INFO used_memory delta {:.0} B/record; key {} B",
            m.delta, m.key_len
        )
    };
    let memory = "Redis memory";
    for (name, m) in [
        ("COMPLETED record, 100-byte result, hashing off", &ours_raw),
        (
            "COMPLETED record, 100-byte result, hashing on",
            &ours_hashed,
        ),
        (
            "hand-written SET of the 100-byte value, raw-length key",
            &ref_raw,
        ),
        (
            "hand-written SET of the 100-byte value, hashed-length key",
            &ref_hashed,
        ),
    ] {
        report.row(
            memory,
            name,
            format!("{:.0} B", m.usage),
            format!("MEMORY USAGE average of {MEMORY_SAMPLE}; {}", mem_note(m)),
        );
    }

    // Targets measured against Redis.
    report.target(
        "a new event costs exactly 2 store round trips",
        format!("{:.2}", new.round_trips()),
        new.round_trips() == 2.0,
    );
    report.target(
        "a duplicate costs exactly 1 store round trip",
        format!("{:.2}", dup.round_trips()),
        dup.round_trips() == 1.0,
    );
    for (kind, label, c) in &compared {
        let floor = match kind {
            Kind::New => 0.85,
            Kind::Duplicate => 0.9,
        };
        let ratio = c.process_vs_reference();
        report.target(
            format!("{label} >= {floor:.2}x reference"),
            format!("{ratio:.3}x"),
            ratio >= floor,
        );
    }
    for (_, label, c) in &compared {
        let ratio = c.macro_vs_process();
        report.target(
            format!("#[idempotent] {label} >= 0.98x checker.process"),
            format!("{ratio:.3}x"),
            ratio >= 0.98,
        );
    }
    peer_targets(report, "Redis 7", &compared);
    client_cpu_targets(report, "Redis 7", &compared, Some(&scripted));
    let cached_ratio = cached_rate / ping;
    report.target(
        "duplicates with the local cache >= 20x raw sequential PING rate",
        format!(
            "{cached_ratio:.1}x ({} vs {})",
            per_s(cached_rate),
            per_s(ping)
        ),
        cached_ratio >= 20.0,
    );
    for (label, m) in [("hashing off", &ours_raw), ("hashing on", &ours_hashed)] {
        report.target(
            format!("Redis memory per COMPLETED record <= 350 B, {label}"),
            format!(
                "{:.0} B MEMORY USAGE (INFO delta {:.0} B)",
                m.usage, m.delta
            ),
            m.usage <= 350.0,
        );
    }
    side_by_side(
        report,
        "Redis",
        &compared,
        [[&new, &peer_new, &ref_new], [&dup, &peer_dup, &ref_dup]],
    );
    report.table(
        "What each contender guarantees".to_owned(),
        [
            "contender",
            "fencing",
            "lease renewal",
            "failure state",
            "replay",
        ]
        .map(str::to_owned)
        .to_vec(),
        GUARANTEES
            .iter()
            .map(|row| row.map(str::to_owned).to_vec())
            .collect(),
    );
    let python_cpu = powertools_rows(server, &compared, report);
    bench.server_cpu().await + python_cpu
}

/// The performance targets on Redis 7: `checker.process` throughput against
/// `idempotent` 0.3.0.
fn peer_targets(report: &mut Report, server: &str, compared: &[(Kind, &'static str, Compared)]) {
    for (kind, label, c) in compared {
        let floor = match kind {
            Kind::New => 1.15,
            Kind::Duplicate => 1.05,
        };
        let ratio = c.ratio(Variant::Process, Variant::Peer);
        report.target(
            format!("{server}: {label}: checker.process >= {floor:.2}x idempotent 0.3.0"),
            format!("{ratio:.3}x"),
            ratio >= floor,
        );
    }
}

/// Client CPU per event at 32 tasks against the hand-written client's, on
/// `server`; on Redis 7 also against the hand-written client completing by
/// script (`scripted`, rounds of their own), for context: the target is
/// the plain client.
pub(crate) fn client_cpu_targets(
    report: &mut Report,
    server: &str,
    compared: &[(Kind, &'static str, Compared)],
    scripted: Option<&Compared>,
) {
    for (kind, label, c) in compared
        .iter()
        .filter(|(_, label, _)| label.ends_with("32-way"))
    {
        let ratio = c.client_cpu_ratio(Variant::Process, Variant::Reference);
        let us = |v: Variant| c.cost[v as usize].per_event_us().0;
        let context = match (kind, scripted) {
            (Kind::New, Some(s)) => format!(
                "; {:.2}x the hand-written client completing by script",
                s.client_cpu_ratio(Variant::Process, Variant::ScriptedReference)
            ),
            _ => String::new(),
        };
        report.target(
            format!("{server}: {label}: client CPU per event <= 1.30x the hand-written client's"),
            format!(
                "{ratio:.2}x ({:.1} us vs {:.1} us{context})",
                us(Variant::Process),
                us(Variant::Reference)
            ),
            ratio <= 1.3,
        );
    }
}
