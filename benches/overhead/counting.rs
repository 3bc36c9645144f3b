//! Counting round trips and Redis time per event (`INFO commandstats`).

use std::collections::BTreeMap;

use crate::bench::Bench;
use crate::workload::Worker;

#[derive(Debug, Default)]
pub(crate) struct Counted {
    /// EVALSHA + EVAL + SCRIPT + FCALL per event.
    pub(crate) script: f64,
    /// Client requests per event (`total_reads_processed`).
    pub(crate) requests: f64,
    /// Other commandstats entries per event (mostly called inside scripts).
    pub(crate) others: Vec<(String, f64)>,
    /// Microseconds Redis spent executing the client's commands, per event
    /// (commandstats `usec`; a script's time includes the calls it makes).
    /// With scripts, only the scripts' time: commandstats cannot tell a
    /// plain `SET` sent beside them from the scripts' own `SET`s.
    pub(crate) server_us: f64,
}

impl Counted {
    pub(crate) fn plain(&self) -> f64 {
        self.requests - self.script
    }

    pub(crate) fn round_trips(&self) -> f64 {
        self.script + self.plain()
    }

    pub(crate) fn describe(&self) -> String {
        let others: Vec<String> = self
            .others
            .iter()
            .map(|(name, n)| format!("{name} {n:.2}"))
            .collect();
        format!(
            "{:.2} script commands + {:.2} plain; {:.1} us of Redis time{}; commandstats \
             also shows: {}",
            self.script,
            self.plain(),
            self.server_us,
            if self.script > 0.0 { " in scripts" } else { "" },
            if others.is_empty() {
                "nothing else".to_owned()
            } else {
                others.join(", ")
            }
        )
    }
}

/// Commandstats (calls, usec) by command name, and `total_reads_processed`.
pub(crate) async fn counters(bench: &Bench) -> (BTreeMap<String, (u64, u64)>, u64) {
    let info = bench.info(&["commandstats", "stats"]).await;
    let field = |v: &str, name: &str| -> Option<u64> {
        v.split(',')
            .find_map(|f| f.strip_prefix(name))?
            .parse()
            .ok()
    };
    let calls = info
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("cmdstat_")?;
            Some((name.to_owned(), (field(v, "calls=")?, field(v, "usec=")?)))
        })
        .collect();
    let reads = info
        .get("total_reads_processed")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (calls, reads)
}

pub(crate) async fn resetstat(bench: &Bench) {
    let _: Option<redis::Value> = bench.command(redis::cmd("CONFIG").arg("RESETSTAT")).await;
}

/// Runs `events` operations of `worker` sequentially between a
/// `CONFIG RESETSTAT` and an `INFO`, and divides the counters by `events`.
pub(crate) async fn count(bench: &Bench, mut worker: Worker, events: u64) -> Counted {
    // Warm: the scripts are loaded and every code path has run.
    for i in 0..10 {
        worker.op((1 << 31) + i).await;
    }
    resetstat(bench).await;
    for i in 0..events {
        worker.op(i).await;
    }
    let (calls, reads) = counters(bench).await;
    let per = |n: u64| n as f64 / events as f64;
    let is_script = |name: &str| {
        name == "eval"
            || name == "evalsha"
            || name == "eval_ro"
            || name == "evalsha_ro"
            || name.starts_with("script")
            || name.starts_with("fcall")
    };
    let is_ours = |name: &str| name == "info" || name.starts_with("config");
    let sum = |script: bool, pick: fn(&(u64, u64)) -> u64| -> u64 {
        calls
            .iter()
            .filter(|(name, _)| is_script(name) == script && !is_ours(name))
            .map(|(_, v)| pick(v))
            .sum()
    };
    let (script_calls, script_usec) = (sum(true, |v| v.0), sum(true, |v| v.1));
    // With no script, every other command came from the client. With
    // scripts, the other commands mix the scripts' own calls (whose time is
    // already inside the script's) with plain ones sent beside them, which
    // commandstats does not tell apart: report the scripts' time alone.
    let usec = if script_calls == 0 {
        sum(false, |v| v.1)
    } else {
        script_usec
    };
    Counted {
        script: per(script_calls),
        requests: per(reads.saturating_sub(1)),
        others: calls
            .iter()
            .filter(|(name, _)| !is_script(name) && !is_ours(name))
            .map(|(name, v)| (name.clone(), per(v.0)))
            .collect(),
        server_us: per(usec),
    }
}

/// Checks on this server how commandstats and `total_reads_processed` count
/// script-internal calls; returns a sentence for the report.
pub(crate) async fn verify_counting(bench: &Bench) -> (bool, String) {
    resetstat(bench).await;
    let _: Option<String> = bench.command(&redis::cmd("PING")).await;
    let _: Option<Option<String>> = bench.command(redis::cmd("GET").arg("absent")).await;
    let _: Option<i64> = bench
        .command(redis::cmd("EVAL").arg("redis.call('PING') return 1").arg(0))
        .await;
    let (calls, reads) = counters(bench).await;
    let get = |name: &str| calls.get(name).map_or(0, |v| v.0);
    let lua_counted = get("ping") == 2 && get("eval") == 1;
    let reads_are_requests = reads == 4;
    (
        lua_counted && reads_are_requests,
        format!(
            "PING, GET, EVAL \"redis.call('PING')\", INFO after CONFIG RESETSTAT: cmdstat_ping \
             calls={} (1 client + 1 inside the script: script calls {} counted), cmdstat_eval \
             calls={}, total_reads_processed={} ({} the 4 client requests)",
            get("ping"),
            if lua_counted { "are" } else { "are NOT" },
            get("eval"),
            reads,
            if reads_are_requests { "exactly" } else { "NOT" },
        ),
    )
}
