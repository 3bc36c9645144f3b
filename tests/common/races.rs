//! The worker half of the cross-process races.

use std::time::Duration;

/// The worker half of the cross-process races: processes the events
/// `xproc-0..keys` through `checker`, starting at a point that depends on
/// `worker`, retrying retryable errors. Each handler run counts itself on
/// `counter` (`test:executions:{key}` and `test:executions`).
pub async fn process_each_key(
    checker: &idempotency::IdempotencyChecker,
    counter: &redis::aio::MultiplexedConnection,
    worker: usize,
    keys: usize,
) {
    use redis::AsyncCommands;
    let mut tasks = Vec::new();
    for i in 0..keys {
        let key = (i + worker * keys / 4) % keys;
        let (checker, counter) = (checker.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let event =
                idempotency::EventEnvelope::new("test.event", serde_json::json!({"key": key}))
                    .with_idempotency_key(format!("xproc-{key}"));
            loop {
                let mut counter = counter.clone();
                let outcome = checker
                    .process(&event, |_| async move {
                        let _: i64 = counter.incr(format!("test:executions:{key}"), 1).await?;
                        let _: i64 = counter.incr("test:executions", 1).await?;
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(key)
                    })
                    .await;
                match outcome {
                    Ok(done) => return *done.value() == key,
                    Err(e)
                        if e.downcast_ref::<idempotency::IdempotencyError>()
                            .is_some_and(idempotency::IdempotencyError::is_retryable) =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("worker error: {e}"),
                }
            }
        }));
    }
    for task in tasks {
        assert!(task.await.expect("task"));
    }
}
