//! One workload measured in interleaved rounds for every contender.

use std::time::Instant;

use crate::bench::Bench;
use crate::cpu::{TICKS_PER_SECOND, cpu_sample};
use crate::problems::{ANOMALIES, problem};
use crate::report::per_s;
use crate::workload::{Kind, Variant, run};
use crate::{MEASURE, WARMUP};

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// How many [`Variant`]s there are.
const VARIANT_COUNT: usize = 5;

/// One workload measured interleaved for every variant.
#[derive(Debug, Default)]
pub(crate) struct Compared {
    /// Operations per second in each round, per variant (indexed by
    /// `Variant as usize`; empty for a variant not measured).
    pub(crate) rates: [Vec<f64>; VARIANT_COUNT],
    /// Redis main-thread CPU use during each measurement (1.0 = one core
    /// saturated), per variant.
    pub(crate) redis_cpu: [Vec<f64>; VARIANT_COUNT],
    /// CPU time per variant, summed over the rounds.
    pub(crate) cost: [Cost; VARIANT_COUNT],
}

/// CPU spent on a variant's measured rounds: by this process (the client)
/// and by Redis's main thread.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Cost {
    pub(crate) events: u64,
    pub(crate) client_ticks: u64,
    pub(crate) redis_seconds: f64,
    /// Reads from client sockets by the server (`total_reads_processed`):
    /// fewer per event means requests arrive in larger batches.
    pub(crate) reads: u64,
}

impl Cost {
    /// The server's socket reads per event.
    pub(crate) fn reads_per_event(self) -> f64 {
        self.reads as f64 / self.events.max(1) as f64
    }

    /// Microseconds of client CPU and of Redis CPU per event.
    pub(crate) fn per_event_us(self) -> (f64, f64) {
        let events = self.events.max(1) as f64;
        (
            1e6 * self.client_ticks as f64 / TICKS_PER_SECOND / events,
            1e6 * self.redis_seconds / events,
        )
    }
}

impl Compared {
    /// The per-round rates of `variant`.
    pub(crate) fn rates(&self, variant: Variant) -> &[f64] {
        &self.rates[variant as usize]
    }

    /// The median rate of `variant`.
    pub(crate) fn median(&self, variant: Variant) -> f64 {
        median(self.rates(variant))
    }

    /// The median of the per-round ratios `a / b`.
    pub(crate) fn ratio(&self, a: Variant, b: Variant) -> f64 {
        ratios(self.rates(a), self.rates(b))
    }

    pub(crate) fn process_vs_reference(&self) -> f64 {
        self.ratio(Variant::Process, Variant::Reference)
    }

    pub(crate) fn macro_vs_process(&self) -> f64 {
        self.ratio(Variant::Macro, Variant::Process)
    }

    /// Client CPU per event of `a` over `b`'s.
    pub(crate) fn client_cpu_ratio(&self, a: Variant, b: Variant) -> f64 {
        self.cost[a as usize].per_event_us().0 / self.cost[b as usize].per_event_us().0
    }

    /// "Redis CPU x%; CPU per event: client .. us, Redis .. us" for `variant`.
    /// "Redis CPU" is the median share of one core Redis's main thread used
    /// during the measurements: near 100%, Redis is the bottleneck.
    pub(crate) fn cpu_note(&self, variant: Variant) -> String {
        let cost = self.cost[variant as usize];
        let (client_us, redis_us) = cost.per_event_us();
        format!(
            "Redis CPU {:.0}%; CPU per event: client {client_us:.1} us, Redis {redis_us:.1} us; \
             socket reads per event {:.2}",
            100.0 * median(&self.redis_cpu[variant as usize]),
            cost.reads_per_event()
        )
    }
}

/// The median of the per-round ratios `a[i] / b[i]`.
pub(crate) fn ratios(a: &[f64], b: &[f64]) -> f64 {
    let per_round: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    median(&per_round)
}

/// Every order of three variants: each runs first, second and third, and
/// after each other one, equally often (an A/A test showed a variant that
/// always follows the same one measuring a few percent low).
pub(crate) const fn orders_of_three(v: [Variant; 3]) -> [[Variant; 3]; 6] {
    let [a, b, c] = v;
    [
        [a, b, c],
        [b, c, a],
        [c, a, b],
        [a, c, b],
        [c, b, a],
        [b, a, c],
    ]
}

/// Four variants in a balanced Latin square (Williams design): in 4 rounds
/// each runs in every position once and right after each other one once.
pub(crate) const fn orders_of_four(v: [Variant; 4]) -> [[Variant; 4]; 4] {
    let [a, b, c, d] = v;
    [[a, b, d, c], [b, c, a, d], [c, d, b, a], [d, a, c, b]]
}

/// Measures `kind` with `tasks` tasks for every variant of `orders[0]`, in
/// `rounds` rounds that cycle through `orders`.
pub(crate) async fn compare<const N: usize>(
    bench: &Bench,
    kind: Kind,
    tasks: usize,
    label: &str,
    orders: &[[Variant; N]],
    rounds: usize,
) -> Compared {
    if kind == Kind::Duplicate {
        bench.flushall().await;
        bench.seed_duplicates().await;
    }
    for variant in orders[0] {
        let worker = bench.worker(variant.job(kind));
        run(&worker, tasks, WARMUP).await;
    }
    let mut compared = Compared::default();
    for round in 0..rounds {
        for variant in orders[round % orders.len()] {
            if kind == Kind::New {
                bench.flushall().await;
            }
            let worker = bench.worker(variant.job(kind));
            let before = bench.checker.stats();
            let (cpu_before, reads_before) = bench.redis_cpu().await;
            let own_before = cpu_sample().own;
            let started = Instant::now();
            let (ops, rate) = run(&worker, tasks, MEASURE).await;
            let elapsed = started.elapsed().as_secs_f64();
            let own = cpu_sample().own.saturating_sub(own_before);
            let (cpu_after, reads_after) = bench.redis_cpu().await;
            let redis_seconds = cpu_after - cpu_before;
            let cpu = redis_seconds / elapsed;
            let cost = &mut compared.cost[variant as usize];
            cost.events += ops;
            cost.client_ticks += own;
            cost.redis_seconds += redis_seconds;
            // Less the INFO call that read the counter.
            cost.reads += reads_after.saturating_sub(reads_before).saturating_sub(1);
            let after = bench.checker.stats();
            if matches!(variant, Variant::Process | Variant::Macro) {
                let (counted, what) = match kind {
                    Kind::New => (after.executed - before.executed, "executed"),
                    Kind::Duplicate => (after.replayed - before.replayed, "replayed"),
                };
                if counted != ops {
                    problem(
                        &ANOMALIES,
                        format_args!("{label} {variant:?}: {ops} calls but {counted} {what}"),
                    );
                }
            }
            compared.rates[variant as usize].push(rate);
            compared.redis_cpu[variant as usize].push(cpu);
        }
        let rates: Vec<String> = orders[0]
            .iter()
            .map(|&v| format!("{} {}", v.name(), per_s(compared.rates(v)[round])))
            .collect();
        bench.progress(format_args!(
            "{label}, round {}/{rounds}: {}",
            round + 1,
            rates.join(", ")
        ));
    }
    compared
}
