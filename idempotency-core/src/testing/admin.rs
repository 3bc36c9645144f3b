//! The operator's rules: what every [`StoreAdmin`] does (what the
//! `idempotency` tool runs on).

use std::time::Duration;

use serde_json::json;

use super::{LONG, acquire, claim_request, json_text};
use crate::{ClaimRequest, IdempotencyError, RecordStatus, StoreAdmin};

/// A claim of `key` whose lease runs out after `lease`.
fn short_lease<'a>(key: &'a str, token: &'a str, lease: Duration) -> ClaimRequest<'a> {
    ClaimRequest {
        lease,
        ..claim_request(key, token)
    }
}

/// `stuck` lists the `PROCESSING` records under the prefix whose lease ran
/// out, sorted by key, and nothing else.
pub async fn admin_lists_stuck_records_under_a_prefix(store: &dyn StoreAdmin) {
    let short = Duration::from_millis(100);
    acquire(store, &short_lease("a:stuck:2", "t1", short)).await;
    acquire(store, &short_lease("a:stuck:1", "t2", short)).await;
    acquire(store, &claim_request("a:stuck:live", "t3")).await;
    acquire(store, &short_lease("a:stuckx", "t4", short)).await;
    let done = acquire(store, &short_lease("a:stuck:done", "t5", short)).await;
    store.complete(&done, None, LONG).await.expect("complete");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let stuck = store.stuck("a:stuck:").await.expect("stuck");
    let keys: Vec<&str> = stuck.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(keys, ["a:stuck:1", "a:stuck:2"]);
    assert_eq!(stuck[0].1.status, RecordStatus::Processing);
    assert_eq!(stuck[0].1.lease_token.as_deref(), Some("t2"));
}

/// `summary` counts the records under the prefix by status, a `PROCESSING`
/// record with a run-out lease as stuck.
pub async fn admin_summarizes_records_by_status(store: &dyn StoreAdmin) {
    let short = Duration::from_millis(100);
    acquire(store, &claim_request("a:sum:live", "t1")).await;
    acquire(store, &short_lease("a:sum:stuck", "t2", short)).await;
    let done = acquire(store, &claim_request("a:sum:done", "t3")).await;
    store
        .complete(&done, Some(&json_text(&json!(1))), LONG)
        .await
        .expect("complete");
    let failed = acquire(store, &claim_request("a:sum:failed", "t4")).await;
    store.fail(&failed, "boom", LONG).await.expect("fail");
    acquire(store, &claim_request("a:sumx", "t5")).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let summary = store.summary("a:sum:").await.expect("summary");
    assert_eq!(
        (
            summary.processing,
            summary.stuck,
            summary.completed,
            summary.failed,
            summary.corrupt
        ),
        (1, 1, 1, 1, 0),
        "{summary:?}"
    );
    assert_eq!(summary.total(), 4);
    assert_eq!(store.summary("a:none:").await.expect("summary").total(), 0);
}

/// `clear_prefix` deletes every record whose key starts with the prefix,
/// taken literally (`*` is a character), and refuses an empty prefix.
pub async fn admin_clears_exactly_the_prefix(store: &dyn StoreAdmin) {
    for key in ["a:g*1", "a:g*2", "a:gx1", "a:h1"] {
        acquire(store, &claim_request(key, "t1")).await;
    }
    assert_eq!(store.clear_prefix("a:g*").await.expect("clear"), 2);
    assert!(store.get("a:g*1").await.expect("get").is_none());
    assert!(store.get("a:gx1").await.expect("get").is_some());
    assert!(store.get("a:h1").await.expect("get").is_some());
    assert!(matches!(
        store.clear_prefix("").await,
        Err(IdempotencyError::Config {
            option: "prefix",
            ..
        })
    ));
    assert!(store.get("a:h1").await.expect("get").is_some());
}
