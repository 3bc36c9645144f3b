//! The seen-set rules: what every [`SeenSet`] does (`mark` / `contains`,
//! what `Deduplicator` is built on).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{LONG, acquire, claim_request, json_text};
use crate::{ClaimOutcome, RecordStatus, SeenSet};

/// `mark` answers `true` once per key, `false` after, in input order.
pub async fn marks_are_new_once_and_answer_in_order(store: &dyn SeenSet) {
    assert_eq!(
        store.mark(&[], LONG).await.expect("mark"),
        Vec::<bool>::new()
    );
    assert_eq!(
        store.mark(&["m:a", "m:b"], LONG).await.expect("mark"),
        [true, true]
    );
    assert_eq!(
        store
            .mark(&["m:b", "m:c", "m:a", "m:d"], LONG)
            .await
            .expect("mark"),
        [false, true, false, true]
    );
    assert_eq!(store.mark(&["m:c"], LONG).await.expect("mark"), [false]);
}

/// `mark` answers `false` for a key repeated within one batch.
pub async fn marks_detect_repeats_within_a_batch(store: &dyn SeenSet) {
    assert_eq!(
        store
            .mark(&["m:x", "m:y", "m:x", "m:z", "m:y", "m:x"], LONG)
            .await
            .expect("mark"),
        [true, true, false, true, false, false]
    );
}

/// `contains` only reads; any record counts as seen, and a mark never
/// overwrites one.
pub async fn contains_reads_without_marking(store: &dyn SeenSet) {
    assert_eq!(
        store.contains(&[]).await.expect("contains"),
        Vec::<bool>::new()
    );
    for _ in 0..2 {
        assert_eq!(
            store.contains(&["m:r1", "m:r2"]).await.expect("contains"),
            [false, false],
            "reading marks nothing"
        );
    }
    store.mark(&["m:r2"], LONG).await.expect("mark");
    assert_eq!(
        store
            .contains(&["m:r1", "m:r2", "m:r1"])
            .await
            .expect("contains"),
        [false, true, false]
    );
    // Any record counts as seen, and a mark never overwrites one.
    let lease = acquire(store, &claim_request("m:held", "t1")).await;
    assert_eq!(store.contains(&["m:held"]).await.expect("contains"), [true]);
    assert_eq!(store.mark(&["m:held"], LONG).await.expect("mark"), [false]);
    let record = store.get("m:held").await.expect("get").expect("record");
    assert_eq!(record.status, RecordStatus::Processing);
    store
        .complete(&lease, Some(&json_text(&json!("done"))), LONG)
        .await
        .expect("the holder still completes");
}

/// A mark lives its ttl, then the key is new again.
pub async fn marks_expire_after_ttl(store: &dyn SeenSet) {
    let short = Duration::from_millis(200);
    assert_eq!(store.mark(&["m:ttl"], short).await.expect("mark"), [true]);
    let record = store.get("m:ttl").await.expect("get").expect("record");
    let expires = record.expires_at.expect("a mark expires");
    assert!(expires <= chrono::Utc::now() + chrono::TimeDelta::milliseconds(250));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(store.contains(&["m:ttl"]).await.expect("contains"), [false]);
    assert_eq!(
        store.mark(&["m:ttl"], short).await.expect("mark"),
        [true],
        "an expired mark is new again"
    );
}

/// A mark is a `COMPLETED` record with a `null` result: a claim of it is a
/// `Duplicate`, and deleting it makes the key new again.
pub async fn a_mark_is_a_completed_record_claimed_as_duplicate(store: &dyn SeenSet) {
    store.mark(&["m:done"], LONG).await.expect("mark");
    let record = store.get("m:done").await.expect("get").expect("record");
    assert_eq!(record.status, RecordStatus::Completed);
    // A mark stores a null result: a claim of it replays `null`.
    assert_eq!(record.result, Some(serde_json::Value::Null));
    assert_eq!(record.attempts, 1);
    assert!(record.completed_at.is_some());
    assert_eq!(record.lease_expires_at, None);
    match store
        .claim(&claim_request("m:done", "t1"))
        .await
        .expect("claim")
    {
        ClaimOutcome::Duplicate(record) => {
            assert_eq!(record.status, RecordStatus::Completed);
            assert_eq!(record.result, Some(serde_json::Value::Null));
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    // With a fingerprint to compare too (a mark records none).
    let mut fingerprinted = claim_request("m:done", "t2");
    fingerprinted.fingerprint = Some("fp");
    assert!(matches!(
        store.claim(&fingerprinted).await.expect("claim"),
        ClaimOutcome::Duplicate(_)
    ));
    // Deleting a mark makes the key new again.
    assert!(store.delete("m:done").await.expect("delete"));
    assert_eq!(store.mark(&["m:done"], LONG).await.expect("mark"), [true]);
}

/// 16 tasks mark one key at once: exactly one is told it is new.
pub async fn concurrent_marks_have_one_winner(store: Arc<dyn SeenSet>) {
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.mark(&["m:race"], LONG).await.expect("mark")[0] })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.expect("task"));
    }
    assert_eq!(winners, 1);
}
