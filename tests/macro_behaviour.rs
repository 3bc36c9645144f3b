//! `#[idempotent]` behaves exactly like `checker.process`: the same handler run
//! both ways against one Redis gives the same answers, the same number of
//! executions, and leaves the same records.

mod common;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::Duration;

use common::RedisServer;
use futures_util::FutureExt;
use futures_util::future::join_all;
use idempotency::{
    EventEnvelope, IdempotencyChecker, IdempotencyConfig, IdempotencyError, IdempotencyRecord,
    Processed, RedisStore, idempotent,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Action {
    Succeed,
    FailFirst,
    PanicFirst,
    Slow,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: String,
    action: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: String,
    run: usize,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("declined on run {0}")]
    Declined(usize),
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

/// Executions per job id, counted by the handler body itself.
#[derive(Default)]
struct Runs(Mutex<HashMap<String, usize>>);

impl Runs {
    fn bump(&self, id: &str) -> usize {
        let mut runs = self.0.lock().expect("lock");
        let n = runs.entry(id.to_owned()).or_default();
        *n += 1;
        *n
    }

    fn snapshot(&self) -> HashMap<String, usize> {
        self.0.lock().expect("lock").clone()
    }
}

async fn handler_body(runs: &Runs, job: &Job) -> Result<Receipt, AppError> {
    let run = runs.bump(&job.id);
    match job.action {
        Action::FailFirst if run == 1 => return Err(AppError::Declined(run)),
        Action::PanicFirst if run == 1 => panic!("handler exploded on run {run}"),
        Action::Slow => tokio::time::sleep(Duration::from_millis(100)).await,
        _ => {}
    }
    Ok(Receipt {
        id: job.id.clone(),
        run,
    })
}

#[idempotent(checker = checker, ttl = "1h")]
async fn via_macro(
    checker: &IdempotencyChecker,
    runs: &Runs,
    envelope: EventEnvelope<Job>,
) -> Result<Receipt, AppError> {
    handler_body(runs, &envelope.payload).await
}

/// The same handler taking the envelope by reference: the call borrows the
/// envelope's text instead of copying it.
#[idempotent(checker = checker, ttl = "1h")]
async fn via_macro_borrowed(
    checker: &IdempotencyChecker,
    runs: &Runs,
    envelope: &EventEnvelope<Job>,
) -> Result<Receipt, AppError> {
    handler_body(runs, &envelope.payload).await
}

/// By reference, with a key of its own.
#[idempotent(checker = checker, ttl = "1h", key = format!("tenant-7:{}", envelope.payload.id))]
async fn via_macro_keyed(
    checker: &IdempotencyChecker,
    runs: &Runs,
    envelope: &EventEnvelope<Job>,
) -> Result<Receipt, AppError> {
    handler_body(runs, &envelope.payload).await
}

async fn via_process(
    checker: &IdempotencyChecker,
    runs: &Runs,
    envelope: EventEnvelope<Job>,
) -> Result<Receipt, AppError> {
    checker
        .process_request(
            idempotency::KeyedRequest::new(envelope.effective_key())
                .event_id(&envelope.event_id)
                .event_type(&envelope.event_type)
                .ttl(Duration::from_secs(3600)),
            |_| handler_body(runs, &envelope.payload),
        )
        .await
        .map(Processed::into_inner)
}

/// What a caller saw, without run-specific details.
fn describe(outcome: std::thread::Result<Result<Receipt, AppError>>) -> String {
    match outcome {
        Ok(Ok(receipt)) => format!("ok {} run {}", receipt.id, receipt.run),
        Ok(Err(AppError::Declined(run))) => format!("declined run {run}"),
        Ok(Err(AppError::Idempotency(IdempotencyError::InProgress { .. }))) => "in progress".into(),
        Ok(Err(AppError::Idempotency(e))) => format!("idempotency error: {e}"),
        Err(_) => "panicked".into(),
    }
}

fn job(id: &str, action: Action) -> EventEnvelope<Job> {
    EventEnvelope::new(
        "job.requested",
        Job {
            id: id.into(),
            action,
        },
    )
    .with_event_id(format!("evt-{id}"))
}

/// Runs the whole scenario through one entry point; returns the transcript.
async fn scenario<F, Fut>(call: F) -> Vec<String>
where
    F: Fn(EventEnvelope<Job>) -> Fut,
    Fut: std::future::Future<Output = Result<Receipt, AppError>>,
{
    let once = async |envelope| describe(AssertUnwindSafe(call(envelope)).catch_unwind().await);
    let mut transcript = Vec::new();
    // First run, then a duplicate replayed.
    transcript.push(once(job("a", Action::Succeed)).await);
    transcript.push(once(job("a", Action::Succeed)).await);
    // A failure, its retry, then a replay; the same for a panic.
    for _ in 0..3 {
        transcript.push(once(job("b", Action::FailFirst)).await);
    }
    for _ in 0..3 {
        transcript.push(once(job("c", Action::PanicFirst)).await);
    }
    // 32 concurrent duplicates of a slow job: one execution.
    let racing = (0..32).map(|_| AssertUnwindSafe(call(job("d", Action::Slow))).catch_unwind());
    let mut racing: Vec<String> = join_all(racing).await.into_iter().map(describe).collect();
    racing.sort();
    racing.dedup();
    transcript.push(format!("32 concurrent: {racing:?}"));
    transcript.push(once(job("d", Action::Slow)).await);
    transcript
}

fn normalized(record: Option<IdempotencyRecord>) -> Option<serde_json::Value> {
    let mut record = record?;
    record.lease_token = None;
    record.lease_expires_at = None;
    record.first_seen_at = record.first_seen_at.map(|_| chrono::DateTime::UNIX_EPOCH);
    record.completed_at = record.completed_at.map(|_| chrono::DateTime::UNIX_EPOCH);
    Some(serde_json::to_value(record).expect("serializes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn macro_and_process_behave_identically_on_redis() {
    let server = RedisServer::start();
    let checker_for = |prefix: &str| {
        let url = server.url();
        let config = IdempotencyConfig::builder()
            .key_prefix(prefix)
            .build()
            .expect("config");
        async move {
            IdempotencyChecker::with_config(
                RedisStore::connect(&url).await.expect("connect"),
                config,
            )
        }
    };
    let macro_checker = checker_for("macro:").await;
    let process_checker = checker_for("process:").await;
    let (macro_runs, process_runs) = (Runs::default(), Runs::default());

    let with_macro = scenario(|e| via_macro(&macro_checker, &macro_runs, e)).await;
    let with_process = scenario(|e| via_process(&process_checker, &process_runs, e)).await;

    assert_eq!(
        with_macro,
        [
            "ok a run 1",
            "ok a run 1",
            "declined run 1",
            "ok b run 2",
            "ok b run 2",
            "panicked",
            "ok c run 2",
            "ok c run 2",
            r#"32 concurrent: ["in progress", "ok d run 1"]"#,
            "ok d run 1",
        ]
    );
    assert_eq!(with_macro, with_process);
    let expected_runs: HashMap<String, usize> = [("a", 1), ("b", 2), ("c", 2), ("d", 1)]
        .map(|(k, v)| (k.to_owned(), v))
        .into();
    assert_eq!(macro_runs.snapshot(), expected_runs);
    assert_eq!(process_runs.snapshot(), expected_runs);

    for key in ["evt-a", "evt-b", "evt-c", "evt-d"] {
        let from_macro = normalized(macro_checker.get_record(key).await.expect("get"));
        let from_process = normalized(process_checker.get_record(key).await.expect("get"));
        assert!(from_macro.is_some(), "{key} has a record");
        assert_eq!(from_macro, from_process, "records for {key}");
    }
    let record = macro_checker
        .get_record("evt-b")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_borrowed_envelope_is_recorded_and_replayed_like_an_owned_one() {
    let server = RedisServer::start();
    let checker =
        IdempotencyChecker::new(RedisStore::connect(&server.url()).await.expect("connect"));
    let runs = Runs::default();
    let call = |outcome| describe(Ok(outcome));

    let first = job("f", Action::FailFirst);
    assert_eq!(
        call(via_macro_borrowed(&checker, &runs, &first).await),
        "declined run 1"
    );
    let failed = checker
        .get_record("evt-f")
        .await
        .expect("get")
        .expect("a FAILED record");
    assert_eq!(
        (
            failed.idempotency_key.as_deref(),
            failed.event_id.as_deref(),
            failed.event_type.as_deref()
        ),
        (Some("evt-f"), Some("evt-f"), Some("job.requested"))
    );
    // The by-value handler shares the key, and each replays the other's result.
    assert_eq!(
        call(via_macro(&checker, &runs, first.clone()).await),
        "ok f run 2"
    );
    assert_eq!(
        call(via_macro_borrowed(&checker, &runs, &first).await),
        "ok f run 2"
    );

    let keyed = job("g", Action::FailFirst);
    assert_eq!(
        call(via_macro_keyed(&checker, &runs, &keyed).await),
        "declined run 1"
    );
    let failed = checker
        .get_record("tenant-7:g")
        .await
        .expect("get")
        .expect("a FAILED record under the attribute's key");
    assert_eq!(
        (
            failed.idempotency_key.as_deref(),
            failed.event_id.as_deref()
        ),
        (Some("tenant-7:g"), Some("evt-g"))
    );
    assert_eq!(
        call(via_macro_keyed(&checker, &runs, &keyed).await),
        "ok g run 2"
    );
    assert_eq!(
        call(via_macro_keyed(&checker, &runs, &keyed).await),
        "ok g run 2"
    );
    assert_eq!(runs.snapshot().values().sum::<usize>(), 4);
}

/// `#[idempotent]` applies the envelope's one key rule: an envelope read
/// from JSON with neither an `idempotency_key` nor an `event_id` is
/// `MissingKey` every time, and the handler never runs.
#[tokio::test]
async fn a_keyless_envelope_is_missing_key_through_the_attribute() {
    let server = RedisServer::start();
    let checker =
        IdempotencyChecker::new(RedisStore::connect(&server.url()).await.expect("connect"));
    let runs = Runs::default();
    let keyless: EventEnvelope<Job> = serde_json::from_str(
        r#"{"event_type":"job.requested","payload":{"id":"k","action":"Succeed"}}"#,
    )
    .expect("parses");
    for _ in 0..2 {
        let by_value = via_macro(&checker, &runs, keyless.clone()).await;
        assert!(
            matches!(
                by_value,
                Err(AppError::Idempotency(IdempotencyError::MissingKey))
            ),
            "{by_value:?}"
        );
        let borrowed = via_macro_borrowed(&checker, &runs, &keyless).await;
        assert!(
            matches!(
                borrowed,
                Err(AppError::Idempotency(IdempotencyError::MissingKey))
            ),
            "{borrowed:?}"
        );
    }
    assert_eq!(runs.snapshot().values().sum::<usize>(), 0);
}
