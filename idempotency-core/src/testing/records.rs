//! The record rules: what every [`IdempotencyStore`] does.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{LONG, acquire, claim_request, json_text};
use crate::{ClaimOutcome, IdempotencyError, IdempotencyStore, Lease, RecordStatus};

/// A claim of an absent key acquires it as attempt 1 and writes a `PROCESSING`
/// record with the request's token, event id, event type and recorded key.
pub async fn absent_key_is_acquired_as_attempt_one(store: &dyn IdempotencyStore) {
    let lease = acquire(store, &claim_request("c:absent", "t1")).await;
    assert_eq!(lease.attempt, 1);
    assert_eq!(lease.token(), "t1");
    assert_eq!(lease.key(), "c:absent");
    assert!(lease.expires_at > chrono::Utc::now());
    let record = store.get("c:absent").await.expect("get").expect("record");
    assert_eq!(record.status, RecordStatus::Processing);
    assert_eq!(record.attempts, 1);
    assert_eq!(record.lease_token.as_deref(), Some("t1"));
    assert_eq!(record.event_id.as_deref(), Some("evt-1"));
    assert_eq!(record.event_type.as_deref(), Some("test.event"));
    assert_eq!(record.idempotency_key.as_deref(), Some("c:absent"));
}

/// A claim of a key held under a live lease by another token is `InProgress`.
pub async fn live_lease_is_in_progress(store: &dyn IdempotencyStore) {
    acquire(store, &claim_request("c:live", "t1")).await;
    match store
        .claim(&claim_request("c:live", "t2"))
        .await
        .expect("claim")
    {
        ClaimOutcome::InProgress(record) => {
            assert_eq!(record.status, RecordStatus::Processing);
            assert_eq!(record.attempts, 1);
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
}

/// A claim of a `COMPLETED` key is a `Duplicate` carrying the exact result
/// (big integers, nesting, escapes), a lean record and its expiry.
pub async fn completed_is_duplicate_with_exact_result(store: &dyn IdempotencyStore) {
    let lease = acquire(store, &claim_request("c:done", "t1")).await;
    // Big integers and nested values must survive byte for byte.
    let result = json!({"id": 9_007_199_254_740_993_u64, "neg": -12, "f": 0.1,
                        "nested": {"list": [1, "two", null, true]}, "text": "é\"\\\n"});
    store
        .complete(&lease, Some(&json_text(&result)), LONG)
        .await
        .expect("complete");
    match store
        .claim(&claim_request("c:done", "t2"))
        .await
        .expect("claim")
    {
        ClaimOutcome::Duplicate(record) => {
            assert_eq!(record.status, RecordStatus::Completed);
            assert_eq!(record.result, Some(result));
            assert!(record.completed_at.is_some());
            assert_eq!(record.attempts, 1);
            // COMPLETED records are lean: no lease, no copy of the key.
            assert_eq!(record.lease_expires_at, None);
            assert_eq!(record.lease_token, None);
            assert_eq!(record.first_seen_at, None);
            assert_eq!(record.idempotency_key, None);
            // The store reports when the record expires: within its ttl.
            let expires_at = record.expires_at.expect("the store reports the expiry");
            let left = expires_at - chrono::Utc::now();
            assert!(
                left > chrono::TimeDelta::seconds(50) && left <= chrono::TimeDelta::seconds(61),
                "expires in {left}"
            );
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
}

/// A handler whose result is JSON `null` (a unit, a `None`) has a stored
/// result: reads and duplicates see `Some(Null)`, on every store alike
/// (`None` means no result was stored).
pub async fn a_null_result_is_stored_as_null(store: &dyn IdempotencyStore) {
    let lease = acquire(store, &claim_request("c:null", "t1")).await;
    store
        .complete(&lease, Some(&json_text(&serde_json::Value::Null)), LONG)
        .await
        .expect("complete");
    let record = store.get("c:null").await.expect("get").expect("record");
    assert_eq!(record.result, Some(serde_json::Value::Null));
    match store
        .claim(&claim_request("c:null", "t2"))
        .await
        .expect("claim")
    {
        ClaimOutcome::Duplicate(record) => {
            assert_eq!(record.result, Some(serde_json::Value::Null));
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
}

/// A `FAILED` key is claimed again as the next attempt, not as a takeover;
/// `first_seen_at` survives and the error is cleared.
pub async fn failed_is_reclaimed_with_next_attempt(store: &dyn IdempotencyStore) {
    let first = acquire(store, &claim_request("c:failed", "t1")).await;
    store.fail(&first, "boom", LONG).await.expect("fail");
    let record = store.get("c:failed").await.expect("get").expect("record");
    assert_eq!(record.status, RecordStatus::Failed);
    assert_eq!(record.error.as_deref(), Some("boom"));
    let first_seen = record.first_seen_at;

    let second = acquire(store, &claim_request("c:failed", "t2")).await;
    assert_eq!(second.attempt, 2);
    assert!(
        !second.taken_over,
        "retrying a FAILED attempt is no takeover"
    );
    let record = store.get("c:failed").await.expect("get").expect("record");
    assert!(first_seen.is_some());
    assert_eq!(
        record.first_seen_at, first_seen,
        "first_seen_at survives retries"
    );
    assert_eq!(record.error, None);
    store
        .complete(&second, Some(&json_text(&json!("ok"))), LONG)
        .await
        .expect("complete");
    let record = store.get("c:failed").await.expect("get").expect("record");
    assert_eq!(record.status, RecordStatus::Completed);
    assert_eq!(record.attempts, 2);
    assert_eq!(record.error, None);
}

/// A `PROCESSING` key whose lease ran out is taken over (attempt 2,
/// `taken_over`); the stale holder's `complete`, `fail` and `renew` are `LeaseLost`.
pub async fn expired_lease_is_taken_over_and_stale_holder_cannot_write(
    store: &dyn IdempotencyStore,
) {
    let mut short = claim_request("c:takeover", "old");
    short.lease = Duration::from_millis(150);
    let old = acquire(store, &short).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let new = acquire(store, &claim_request("c:takeover", "new")).await;
    assert_eq!(new.attempt, 2);
    assert!(new.taken_over, "the claim reports the takeover");
    assert!(!old.taken_over, "a first claim takes nothing over");

    for stale in [
        store
            .complete(&old, Some(&json_text(&json!("stale"))), LONG)
            .await,
        store.fail(&old, "stale", LONG).await,
        store.renew(&old, LONG).await.map(|_| ()),
    ] {
        assert!(
            matches!(stale, Err(IdempotencyError::LeaseLost { .. })),
            "stale holder must get LeaseLost, got {stale:?}"
        );
    }
    store
        .complete(&new, Some(&json_text(&json!("fresh"))), LONG)
        .await
        .expect("complete");
    let record = store.get("c:takeover").await.expect("get").expect("record");
    assert_eq!(record.result, Some(json!("fresh")));
    assert_eq!(record.attempts, 2);
}

/// Renewals keep a short lease alive well past its first expiry.
pub async fn renew_keeps_the_lease_alive(store: &dyn IdempotencyStore) {
    let mut short = claim_request("c:renew", "t1");
    short.lease = Duration::from_millis(300);
    let mut lease = acquire(store, &short).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let renewed = store
            .renew(&lease, Duration::from_millis(300))
            .await
            .expect("renew");
        assert!(renewed.expires_at >= lease.expires_at);
        lease = renewed;
        // 600ms after the claim, the 300ms lease is alive only thanks to renewals.
        assert!(matches!(
            store
                .claim(&claim_request("c:renew", "t2"))
                .await
                .expect("claim"),
            ClaimOutcome::InProgress(_)
        ));
    }
    store
        .complete(&lease, Some(&json_text(&json!(1))), LONG)
        .await
        .expect("complete after renewals");
}

/// A claim repeated with the token that holds the key acquires it again,
/// same attempt.
pub async fn retried_claim_with_own_token_is_acquired(store: &dyn IdempotencyStore) {
    let first = acquire(store, &claim_request("c:retry", "mine")).await;
    let again = acquire(store, &claim_request("c:retry", "mine")).await;
    assert_eq!(again.attempt, first.attempt);
    assert_eq!(again.token(), "mine");
}

/// Nothing writes over a `COMPLETED` record; a repeated `fail` by the same
/// token succeeds, and a `complete` after it is `LeaseLost`.
pub async fn repeated_fail_succeeds_and_completed_takes_no_write(store: &dyn IdempotencyStore) {
    // A COMPLETED record keeps no token: nothing, not even its own holder
    // calling again, writes over it. (A store's own retry of a `complete`
    // whose reply was lost is recognised inside the store.)
    let lease = acquire(store, &claim_request("c:twice", "t1")).await;
    store
        .complete(&lease, Some(&json_text(&json!(1))), LONG)
        .await
        .expect("complete");
    for again in [
        store
            .complete(&lease, Some(&json_text(&json!(2))), LONG)
            .await,
        store.fail(&lease, "late", LONG).await,
    ] {
        assert!(
            matches!(again, Err(IdempotencyError::LeaseLost { .. })),
            "a write after COMPLETED is refused, got {again:?}"
        );
    }
    let record = store.get("c:twice").await.expect("get").expect("record");
    assert_eq!(record.status, RecordStatus::Completed);
    assert_eq!(record.result, Some(json!(1)));

    // A FAILED record keeps the token of its last attempt: a repeated `fail`
    // is recognised and succeeds; a `complete` after it is refused.
    let lease = acquire(store, &claim_request("c:twice-fail", "t1")).await;
    store.fail(&lease, "e", LONG).await.expect("fail");
    store
        .fail(&lease, "e", LONG)
        .await
        .expect("repeated fail succeeds");
    assert!(matches!(
        store
            .complete(&lease, Some(&json_text(&json!(1))), LONG)
            .await,
        Err(IdempotencyError::LeaseLost { .. })
    ));
    let record = store
        .get("c:twice-fail")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.status, RecordStatus::Failed);
    assert_eq!(record.lease_token.as_deref(), Some("t1"));
    assert_eq!(record.lease_expires_at, None);
}

/// A lease the store never handed out completes nothing and creates no record.
pub async fn unknown_lease_writes_nothing(store: &dyn IdempotencyStore) {
    let forged = Lease {
        taken_over: false,
        version: None,
        key: "c:forged".into(),
        token: "nobody".into(),
        attempt: 1,
        expires_at: chrono::Utc::now(),
    };
    assert!(matches!(
        store
            .complete(&forged, Some(&json_text(&json!(1))), LONG)
            .await,
        Err(IdempotencyError::LeaseLost { .. })
    ));
    assert!(store.get("c:forged").await.expect("get").is_none());
}

/// A claim with a different fingerprint fails with `FingerprintMismatch` in
/// every status; the same fingerprint, or none, is allowed.
pub async fn fingerprints_guard_key_reuse(store: &dyn IdempotencyStore) {
    let mut req = claim_request("c:fp", "t1");
    req.fingerprint = Some("aaa");
    let lease = acquire(store, &req).await;

    let mut other = claim_request("c:fp", "t2");
    other.fingerprint = Some("bbb");
    assert!(matches!(
        store.claim(&other).await,
        Err(IdempotencyError::FingerprintMismatch { .. })
    ));
    store.fail(&lease, "x", LONG).await.expect("fail");
    assert!(matches!(
        store.claim(&other).await,
        Err(IdempotencyError::FingerprintMismatch { .. })
    ));
    // Same fingerprint, or none on the request: allowed.
    let mut same = claim_request("c:fp", "t3");
    same.fingerprint = Some("aaa");
    let lease = acquire(store, &same).await;
    store
        .complete(&lease, Some(&json_text(&json!(1))), LONG)
        .await
        .expect("complete");
    let record = store.get("c:fp").await.expect("get").expect("record");
    assert_eq!(record.fingerprint.as_deref(), Some("aaa"));
    assert!(matches!(
        store.claim(&other).await,
        Err(IdempotencyError::FingerprintMismatch { .. })
    ));
    assert!(matches!(
        store.claim(&claim_request("c:fp", "t4")).await,
        Ok(ClaimOutcome::Duplicate(_))
    ));
}

/// A completed record is gone after its ttl, and the key starts over at attempt 1.
pub async fn records_expire_after_ttl(store: &dyn IdempotencyStore) {
    let mut req = claim_request("c:ttl", "t1");
    req.ttl = Duration::from_millis(200);
    req.lease = Duration::from_millis(100);
    let lease = acquire(store, &req).await;
    store
        .complete(
            &lease,
            Some(&json_text(&json!(1))),
            Duration::from_millis(200),
        )
        .await
        .expect("complete");
    assert!(store.get("c:ttl").await.expect("get").is_some());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(store.get("c:ttl").await.expect("get").is_none());
    let again = acquire(store, &claim_request("c:ttl", "t2")).await;
    assert_eq!(again.attempt, 1, "an expired record starts over");
}

/// A `PROCESSING` record lives as long as its lease even when the ttl is shorter.
pub async fn processing_record_outlives_a_short_ttl(store: &dyn IdempotencyStore) {
    // ttl shorter than the lease: the PROCESSING record must not vanish
    // while its lease is live, or a duplicate could run.
    let mut req = claim_request("c:shortttl", "t1");
    req.ttl = Duration::from_millis(50);
    req.lease = Duration::from_secs(5);
    acquire(store, &req).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(matches!(
        store
            .claim(&claim_request("c:shortttl", "t2"))
            .await
            .expect("claim"),
        ClaimOutcome::InProgress(_)
    ));
}

/// `get` and `delete` of absent and present keys; `health` answers.
pub async fn get_and_delete(store: &dyn IdempotencyStore) {
    assert!(store.get("c:gd").await.expect("get").is_none());
    assert!(!store.delete("c:gd").await.expect("delete"));
    let lease = acquire(store, &claim_request("c:gd", "t1")).await;
    store
        .complete(&lease, Some(&json_text(&json!(1))), LONG)
        .await
        .expect("complete");
    assert!(store.delete("c:gd").await.expect("delete"));
    assert!(store.get("c:gd").await.expect("get").is_none());
    let again = acquire(store, &claim_request("c:gd", "t2")).await;
    assert_eq!(again.attempt, 1);
    store.health().await.expect("health");
}

/// 64 tasks claim one key at once: exactly one acquires it.
pub async fn concurrent_claims_have_one_winner(store: Arc<dyn IdempotencyStore>) {
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let token = format!("t{i}");
            let outcome = store
                .claim(&claim_request("c:race", &token))
                .await
                .expect("claim");
            matches!(outcome, ClaimOutcome::Acquired(_))
        }));
    }
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.expect("task"));
    }
    assert_eq!(winners, 1);
}

/// After its lease runs out, a record lives on for its ttl: the next claim
/// is attempt 2, not a fresh key.
pub async fn renewed_record_outlives_its_first_lease(store: &dyn IdempotencyStore) {
    let mut req = claim_request("c:outlive", "t1");
    req.lease = Duration::from_millis(100);
    let lease = acquire(store, &req).await;
    store
        .renew(&lease, Duration::from_millis(100))
        .await
        .expect("renew");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The lease is over, but the record (attempts, fingerprint, first_seen_at)
    // lives its ttl: the next claim is a takeover, attempt 2, not a fresh key.
    let record = store
        .get("c:outlive")
        .await
        .expect("get")
        .expect("record survives");
    assert_eq!(record.attempts, 1);
    let next = acquire(store, &claim_request("c:outlive", "t2")).await;
    assert_eq!(next.attempt, 2);
}

/// Keys are opaque text: spaces, punctuation, glob and hash-tag characters
/// and non-ASCII letters are all fine, case matters, and each key has its
/// own record (a store that encodes keys for its backend encodes them
/// injectively).
pub async fn keys_are_opaque_text(store: &dyn IdempotencyStore) {
    let keys = [
        "c:text with spaces/slashes:colons",
        "c:glob*?[chars]\\",
        "c:{hash}tag",
        "c:ünïcødé ✓",
        "c:Case",
        "c:case",
        "c:dots.and=equals",
        "c:dots_and=equals",
    ];
    for (i, key) in keys.iter().enumerate() {
        let lease = acquire(store, &claim_request(key, &format!("t{i}"))).await;
        store
            .complete(&lease, Some(&json_text(&json!(key))), LONG)
            .await
            .expect("complete");
    }
    for key in keys {
        let record = store.get(key).await.expect("get").expect("record");
        assert_eq!(record.result, Some(json!(key)), "{key} has its own record");
    }
}
