//! AWS Powertools for Python (3.x) on the same Redis, one event at a time:
//! `powertools.py` (its `@idempotent_function` over the Redis persistence
//! layer) run by the venv's Python after the Redis comparisons, next to our
//! sequential medians of the same run. Not interleaved with ours: a Python
//! process of its own, measured once per phase.
//!
//! The venv is `scripts/pyenv.sh`'s (target/pyenv); the Powertools package
//! (pinned, with `redis` and `boto3`, which its idempotency module imports)
//! is installed into it on first use. Neither missing is skipped: the run
//! stops with what to do.

use std::path::Path;
use std::process::Command;

use idempotency_test_support::RedisServer;
use serde::Deserialize;

use crate::RESULT;
use crate::compare::Compared;
use crate::report::{Report, per_s};
use crate::workload::{Kind, Variant};

/// What `powertools.py` needs, pinned.
const PACKAGE: &str = "aws-lambda-powertools[redis,aws-sdk]==3.37.0";
/// Seconds per phase.
const SECONDS: &str = "2";

/// One phase as `powertools.py` reports it.
#[derive(Debug, Deserialize)]
struct Phase {
    per_second: f64,
    client_cpu_us: f64,
    server_cpu_us: f64,
}

#[derive(Debug, Deserialize)]
struct Measured {
    new: Phase,
    duplicate: Phase,
    /// The Python process's CPU seconds in all (imports included).
    process_cpu_s: f64,
}

/// The venv's Python, with Powertools installed.
fn python() -> String {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/target/pyenv/bin/python");
    assert!(
        Path::new(python).exists(),
        "{python} is missing: run `bash scripts/pyenv.sh` (it makes the venv the Valkey and \
         Powertools rows use)"
    );
    let has = |python: &str| {
        Command::new(python)
            .args(["-c", "import aws_lambda_powertools, boto3, redis"])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if !has(python) {
        eprintln!("installing {PACKAGE} into target/pyenv for the Powertools rows");
        let status = Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(PACKAGE)
            .status();
        assert!(
            status.is_ok_and(|s| s.success()) && has(python),
            "could not install {PACKAGE} into target/pyenv (is the package index reachable?)"
        );
    }
    python.to_owned()
}

/// Measures Powertools on `server` and adds its rows and its table next to
/// ours (`compared`, the Redis comparisons); returns the Python process's
/// CPU seconds, for the load check.
pub(crate) fn powertools_rows(
    server: &RedisServer,
    compared: &[(Kind, &'static str, Compared)],
    report: &mut Report,
) -> f64 {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/overhead/powertools.py"
    );
    let output = Command::new(python())
        .arg(script)
        .arg(server.port().to_string())
        .arg(SECONDS)
        .arg(RESULT)
        .output()
        .expect("the venv's Python runs");
    assert!(
        output.status.success(),
        "powertools.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let measured: Measured =
        serde_json::from_slice(&output.stdout).expect("powertools.py prints its JSON");
    let ours = |kind: Kind| {
        compared
            .iter()
            .find(|(k, label, _)| *k == kind && label.ends_with("sequential"))
            .map(|(_, _, c)| c)
            .expect("the sequential comparisons ran")
    };
    let mut rows = Vec::new();
    for (kind, label, phase) in [
        (Kind::New, "new events, sequential", &measured.new),
        (
            Kind::Duplicate,
            "duplicates, sequential",
            &measured.duplicate,
        ),
    ] {
        let c = ours(kind);
        let (client_us, redis_us) = c.cost[Variant::Process as usize].per_event_us();
        report.row(
            "Powertools",
            format!("AWS Powertools 3.37 (Python) {label}"),
            per_s(phase.per_second),
            format!(
                "checker.process {:.2}x it; CPU per event: client {:.0} us, Redis {:.1} us",
                c.median(Variant::Process) / phase.per_second,
                phase.client_cpu_us,
                phase.server_cpu_us
            ),
        );
        rows.push(vec![
            label.to_owned(),
            per_s(phase.per_second),
            per_s(c.median(Variant::Process)),
            format!("{:.2}x", c.median(Variant::Process) / phase.per_second),
            format!("{:.0} / {:.1}", phase.client_cpu_us, phase.server_cpu_us),
            format!("{client_us:.1} / {redis_us:.1}"),
        ]);
    }
    report.table(
        "AWS Powertools for Python 3.37 on the same Redis, one event at a time (its own \
         process after the comparisons, not interleaved; ours: the sequential medians above; \
         CPU per event in us, client / Redis main thread)"
            .to_owned(),
        [
            "workload",
            "Powertools",
            "ours",
            "ours / Powertools",
            "CPU Powertools",
            "CPU ours",
        ]
        .map(str::to_owned)
        .to_vec(),
        rows,
    );
    measured.process_cpu_s
}
