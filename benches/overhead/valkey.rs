//! The same new-event and duplicate comparisons on Valkey 9, where our store
//! completes with `SET ... IFEQ` instead of the finish script: ours, the
//! hand-written client and `idempotent` 0.3.0.

use std::time::Instant;

use idempotency_test_support::RedisServer;

use crate::bench::Bench;
use crate::compare::{Compared, compare, orders_of_three};
use crate::counting::count;
use crate::redis_phases::{WORKLOADS, peer_row, side_by_side};
use crate::report::{Report, per_s};
use crate::workload::{Job, Kind, Variant};
use crate::{COUNTED_EVENTS, VALKEY_ROUNDS};

/// The Valkey measurements; returns the CPU seconds valkey-server used.
pub(crate) async fn valkey_phases(
    server: &RedisServer,
    started: Instant,
    report: &mut Report,
) -> f64 {
    let bench = Bench::connect(server, started).await;
    let info = bench.info(&["server"]).await;
    let version = info
        .get("valkey_version")
        .or_else(|| info.get("redis_version"))
        .map_or("?", String::as_str);
    println!(
        "valkey:   valkey-server {version} (port {}, no persistence); {VALKEY_ROUNDS} interleaved \
         rounds of reference, checker.process, idempotent per workload",
        server.port()
    );
    let orders = orders_of_three([Variant::Reference, Variant::Process, Variant::Peer]);
    let mut compared: Vec<(Kind, &'static str, Compared)> = Vec::new();
    for (kind, tasks, label) in WORKLOADS {
        let c = compare(&bench, kind, tasks, label, &orders, VALKEY_ROUNDS).await;
        compared.push((kind, label, c));
    }
    bench.progress("round trips on Valkey (INFO commandstats)");
    bench.flushall().await;
    bench.seed_duplicates().await;
    let mut counted = Vec::new();
    for (name, job) in [
        ("checker.process new event", Job::ProcessNew),
        ("checker.process duplicate", Job::ProcessDup),
        ("hand-written new event", Job::RefNew),
        ("hand-written duplicate", Job::RefDup),
        ("idempotent 0.3.0 new event", Job::PeerNew),
        ("idempotent 0.3.0 duplicate", Job::PeerDup),
    ] {
        counted.push((name, count(&bench, bench.worker(job), COUNTED_EVENTS).await));
    }

    let section = "Valkey";
    for (_, label, c) in &compared {
        report.row(
            section,
            format!("hand-written {label}"),
            per_s(c.median(Variant::Reference)),
            format!(
                "median of {VALKEY_ROUNDS} interleaved rounds; {}",
                c.cpu_note(Variant::Reference)
            ),
        );
        report.row(
            section,
            format!("checker.process {label}"),
            per_s(c.median(Variant::Process)),
            format!(
                "{:.3}x reference; {}",
                c.process_vs_reference(),
                c.cpu_note(Variant::Process)
            ),
        );
        peer_row(report, section, label, c);
    }
    for (name, c) in &counted {
        report.row(
            "round trips (Valkey)",
            *name,
            format!("{:.2}/event", c.round_trips()),
            c.describe(),
        );
    }

    for (kind, label, c) in &compared {
        if *kind != Kind::New {
            continue;
        }
        let floor = if label.ends_with("32-way") { 0.85 } else { 0.9 };
        let ratio = c.process_vs_reference();
        report.target(
            format!("Valkey 9 (IFEQ): {label} >= {floor:.2}x the hand-written unfenced client"),
            format!("{ratio:.3}x"),
            ratio >= floor,
        );
        let ratio = c.ratio(Variant::Process, Variant::Peer);
        report.target(
            format!("Valkey 9 (IFEQ): {label} >= 1.80x idempotent 0.3.0"),
            format!("{ratio:.3}x"),
            ratio >= 1.8,
        );
    }
    crate::redis_phases::client_cpu_targets(report, "Valkey 9 (IFEQ)", &compared, None);
    let by_name = |name: &str| {
        counted
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c)
            .expect("counted above")
    };
    let row = |what: &str| {
        [
            by_name(&format!("checker.process {what}")),
            by_name(&format!("idempotent 0.3.0 {what}")),
            by_name(&format!("hand-written {what}")),
        ]
    };
    side_by_side(
        report,
        &format!("Valkey {version}"),
        &compared,
        [row("new event"), row("duplicate")],
    );
    bench.server_cpu().await
}
