//! [`Deduplicator`]: the seen-set API for pure deduplication pipelines.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use std::time::Instant;
use tracing::Instrument;

use crate::config::IdempotencyConfig;
use crate::envelope::EventEnvelope;
use crate::error::{IdempotencyError, Result};
use crate::key::{canonical_json, fingerprint, sha256_hex, stored_key};
use crate::stats::store_latency;
use crate::store::SeenSet;

/// How a [`Deduplicator`] or the NATS dedup relay names an event: the one
/// place where keys are derived from events.
///
/// [`IdempotencyKey`](Self::IdempotencyKey) and [`EventId`](Self::EventId)
/// take the key the producer gave. The others *derive* a key from the
/// content, and a derived key longer than
/// [`MAX_DERIVED_KEY_LEN`](Self::MAX_DERIVED_KEY_LEN) characters is replaced
/// by its SHA-256 (64 lower-case hex digits), so any content gives a key
/// that passes validation (keep `max_key_len` at 64 or more).
///
/// ```
/// use idempotency_core::{EventEnvelope, KeyExtractor};
/// use serde_json::json;
///
/// let event = EventEnvelope::new("page.viewed", json!({"user": "u-7", "page": {"id": 42}}))
///     .with_event_id("evt-1");
/// assert_eq!(KeyExtractor::EventId.key_of(&event)?, "evt-1");
/// assert_eq!(
///     KeyExtractor::fields(["user", "/page/id"]).key_of(&event)?,
///     r#"["u-7",42]"#
/// );
/// assert_eq!(KeyExtractor::ContentHash.key_of(&event)?.len(), 64);
/// let custom = KeyExtractor::custom(|e| Ok(format!("{}:{}", e.event_type, e.payload["user"])));
/// assert_eq!(custom.key_of(&event)?, r#"page.viewed:"u-7""#);
///
/// // A long derived key is hashed.
/// let long = EventEnvelope::new("t", json!({"user": "u".repeat(300)}));
/// let key = KeyExtractor::fields(["user"]).key_of(&long)?;
/// assert_eq!(key.len(), 64);
/// assert!(key.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
/// # Ok::<(), idempotency_core::IdempotencyError>(())
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum KeyExtractor {
    /// The envelope's key by [`EventEnvelope::require_key`]: its
    /// `idempotency_key`, else its `event_id` (the default, and the key the
    /// checker uses). An empty `idempotency_key` is
    /// [`InvalidKey`](IdempotencyError::InvalidKey) and an envelope with
    /// neither is [`MissingKey`](IdempotencyError::MissingKey).
    #[default]
    IdempotencyKey,
    /// The envelope's `event_id`, whatever its `idempotency_key`; an empty
    /// one is [`MissingKey`](IdempotencyError::MissingKey).
    EventId,
    /// The SHA-256 hex of the payload's canonical JSON (object keys sorted
    /// at every level; [`fingerprint`](crate::fingerprint)), for events that
    /// carry no identity: equal payloads are the same event.
    ContentHash,
    /// Fields of the payload, for events identified by their content (e.g.
    /// `timestamp`, `user`, `event_name`). Each entry is a top-level field
    /// name, or a JSON pointer when it starts with `/` (`"/user/id"`). The
    /// key is the canonical JSON array of the values, e.g.
    /// `["2026-01-01T00:00:00Z","u-7",42]`: unambiguous whatever the values
    /// contain, and `42` differs from `"42"`; hashed when longer than
    /// [`MAX_DERIVED_KEY_LEN`](Self::MAX_DERIVED_KEY_LEN). A missing or null
    /// field is an [`IdempotencyError::MissingKeyField`].
    Fields(Vec<String>),
    /// Any function of the envelope (its payload as JSON); its key is
    /// hashed when longer than [`MAX_DERIVED_KEY_LEN`](Self::MAX_DERIVED_KEY_LEN).
    Custom(KeyFn),
}

/// The function of a [`KeyExtractor::Custom`].
pub type KeyFn = Arc<dyn Fn(&EventEnvelope) -> Result<String> + Send + Sync>;

impl std::fmt::Debug for KeyExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::IdempotencyKey => f.write_str("IdempotencyKey"),
            Self::EventId => f.write_str("EventId"),
            Self::ContentHash => f.write_str("ContentHash"),
            Self::Fields(fields) => f.debug_tuple("Fields").field(fields).finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// The keys an envelope's producer gave, read from any JSON object.
#[derive(Deserialize)]
struct ProducerKeys {
    #[serde(default)]
    event_id: String,
    #[serde(default)]
    idempotency_key: Option<String>,
}

impl KeyExtractor {
    /// The longest derived key ([`Fields`](Self::Fields),
    /// [`Custom`](Self::Custom)) used as it is, in characters; a longer one
    /// is replaced by its SHA-256 hex, which is 64 characters too.
    pub const MAX_DERIVED_KEY_LEN: usize = 64;

    /// [`KeyExtractor::Fields`] from field names or JSON pointers.
    pub fn fields<S: Into<String>>(fields: impl IntoIterator<Item = S>) -> Self {
        Self::Fields(fields.into_iter().map(Into::into).collect())
    }

    /// [`KeyExtractor::Custom`] from a function of the envelope.
    pub fn custom(f: impl Fn(&EventEnvelope) -> Result<String> + Send + Sync + 'static) -> Self {
        Self::Custom(Arc::new(f))
    }

    /// The key of `envelope` (not yet validated, prefixed or hashed by the
    /// store's rules; a long derived key is already hashed).
    pub fn key_of<P: Serialize>(&self, envelope: &EventEnvelope<P>) -> Result<String> {
        match self {
            Self::IdempotencyKey => envelope.require_key().map(str::to_owned),
            Self::EventId if envelope.event_id.is_empty() => Err(IdempotencyError::MissingKey),
            Self::EventId => Ok(envelope.event_id.clone()),
            Self::ContentHash => fingerprint(&envelope.payload),
            Self::Fields(fields) => {
                fields_key(fields, &serde_json::to_value(&envelope.payload)?).map(bounded)
            }
            Self::Custom(f) => f(&EventEnvelope {
                event_id: envelope.event_id.clone(),
                event_type: envelope.event_type.clone(),
                idempotency_key: envelope.idempotency_key.clone(),
                occurred_at: envelope.occurred_at,
                payload: serde_json::to_value(&envelope.payload)?,
                source: envelope.source.clone(),
                correlation_id: envelope.correlation_id.clone(),
            })
            .map(bounded),
        }
    }

    /// The key of a JSON document that is the event itself rather than an
    /// [`EventEnvelope`] around it, such as a raw message the dedup relay
    /// reads from a producer that knows nothing of envelopes:
    ///
    /// - [`IdempotencyKey`](Self::IdempotencyKey) and
    ///   [`EventId`](Self::EventId) read the document's `idempotency_key` and
    ///   `event_id` fields by the same rule as [`key_of`](Self::key_of)
    ///   (the document needs no other envelope field);
    /// - [`Fields`](Self::Fields) and [`ContentHash`](Self::ContentHash) read
    ///   the whole document, as they read an envelope's payload;
    /// - [`Custom`](Self::Custom) gets an envelope whose payload is the whole
    ///   document and whose other fields are empty (`occurred_at` the Unix
    ///   epoch).
    ///
    /// ```
    /// use idempotency_core::KeyExtractor;
    /// use serde_json::json;
    ///
    /// let raw = json!({"distinct_id": "u-7", "token": "t", "event_id": "e1"});
    /// assert_eq!(KeyExtractor::fields(["distinct_id", "token"]).key_of_document(&raw)?, r#"["u-7","t"]"#);
    /// assert_eq!(KeyExtractor::IdempotencyKey.key_of_document(&raw)?, "e1");
    /// # Ok::<(), idempotency_core::IdempotencyError>(())
    /// ```
    pub fn key_of_document(&self, document: &serde_json::Value) -> Result<String> {
        match self {
            Self::IdempotencyKey | Self::EventId => {
                let keys = ProducerKeys::deserialize(document)?;
                let envelope = EventEnvelope {
                    event_id: keys.event_id,
                    event_type: String::new(),
                    idempotency_key: keys.idempotency_key,
                    occurred_at: chrono::DateTime::default(),
                    payload: (),
                    source: None,
                    correlation_id: None,
                };
                self.key_of(&envelope)
            }
            Self::ContentHash => Ok(sha256_hex(canonical_json(document).as_bytes())),
            Self::Fields(fields) => fields_key(fields, document).map(bounded),
            Self::Custom(f) => f(&EventEnvelope {
                event_id: String::new(),
                event_type: String::new(),
                idempotency_key: None,
                occurred_at: chrono::DateTime::default(),
                payload: document.clone(),
                source: None,
                correlation_id: None,
            })
            .map(bounded),
        }
    }
}

/// The canonical JSON array of `fields` of `document`.
fn fields_key(fields: &[String], document: &serde_json::Value) -> Result<String> {
    let values = fields
        .iter()
        .map(|field| {
            let value = if field.starts_with('/') {
                document.pointer(field)
            } else {
                document.get(field)
            };
            match value {
                None | Some(serde_json::Value::Null) => Err(IdempotencyError::MissingKeyField {
                    field: field.clone(),
                }),
                Some(value) => Ok(value.clone()),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(canonical_json(&serde_json::Value::Array(values)))
}

/// A derived key as it is when short enough, else its SHA-256 hex.
fn bounded(key: String) -> String {
    if key.chars().count() > KeyExtractor::MAX_DERIVED_KEY_LEN {
        sha256_hex(key.as_bytes())
    } else {
        key
    }
}

/// The seen-set API for pure deduplication pipelines: "is this id new?",
/// answered and recorded in one atomic step, one id or a whole batch at a
/// time, with no handler and no result.
///
/// It shares the checker's stores and key hygiene: ids are validated like
/// idempotency keys (not empty, no control characters, at most
/// `max_key_len`), stored under the configured prefix (hashed with SHA-256
/// when `hash_keys` is on), and a mark lives the configured `ttl`. A mark is
/// an ordinary `COMPLETED` record with a null result, so a checker on the
/// same store and prefix sees a marked key as already processed (and
/// [`forget`](Self::forget) or [`IdempotencyChecker::delete_record`](crate::IdempotencyChecker::delete_record) undo
/// either). Any record under the key, whatever its status, counts as seen.
///
/// A batch is sent in chunks of [`chunk_size`](Self::chunk_size) ids, one
/// round trip per chunk on Redis (a pipeline of `SET key doc NX PX ttl`).
///
/// When a call fails with
/// [`StoreUnavailable`](IdempotencyError::StoreUnavailable), some of its
/// marks may have been written (earlier chunks, or a chunk whose reply was
/// lost after the store's own retries): marks are never rolled back, so a
/// retry reports those ids as seen. The store's internal retries recognise
/// their own marks; only a call that fails as a whole leaves this doubt.
///
/// ```
/// use idempotency_core::{Deduplicator, EventEnvelope, IdempotencyConfig, KeyExtractor, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idempotency_core::IdempotencyError> {
/// let config = IdempotencyConfig::builder().ttl("1h").key_prefix("seen:").build()?;
/// let dedup = Deduplicator::with_config(MemoryStore::new(), config);
///
/// assert!(dedup.check_and_mark("evt-1").await?); // new, and now marked
/// assert!(!dedup.check_and_mark("evt-1").await?); // seen before
///
/// // A batch: answers in input order; a repeat inside the batch is a duplicate.
/// let fresh = dedup.check_and_mark_batch(&["evt-1", "evt-2", "evt-3", "evt-2"]).await?;
/// assert_eq!(fresh, [false, true, true, false]);
/// assert_eq!(dedup.batch_check(&["evt-3", "evt-4"]).await?, [true, false]);
///
/// // Events keyed by their content.
/// let by_content = dedup.clone().with_extractor(KeyExtractor::ContentHash);
/// let event = EventEnvelope::new("click", serde_json::json!({"user": 7, "x": 1}));
/// let same = EventEnvelope::new("click", serde_json::json!({"x": 1, "user": 7}));
/// assert!(by_content.check_and_mark_event(&event).await?);
/// assert!(!by_content.check_and_mark_event(&same).await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Deduplicator {
    store: Arc<dyn SeenSet>,
    config: Arc<IdempotencyConfig>,
    extractor: KeyExtractor,
    chunk_size: usize,
}

impl std::fmt::Debug for Deduplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deduplicator")
            .field("store", &self.store)
            .field("config", &self.config)
            .field("extractor", &self.extractor)
            .field("chunk_size", &self.chunk_size)
            .finish()
    }
}

impl Deduplicator {
    /// The default [`chunk_size`](Self::chunk_size).
    pub const DEFAULT_CHUNK_SIZE: usize = 1000;

    /// A deduplicator over `store` with the default configuration.
    pub fn new(store: impl SeenSet + 'static) -> Self {
        Self::with_config(store, IdempotencyConfig::default())
    }

    /// A deduplicator over `store` with `config` (its `ttl`, `key_prefix`,
    /// `hash_keys` and `max_key_len` apply).
    pub fn with_config(store: impl SeenSet + 'static, config: IdempotencyConfig) -> Self {
        Self::from_shared(Arc::new(store), config)
    }

    /// A deduplicator over a store shared with checkers or other deduplicators.
    pub fn from_shared(store: Arc<dyn SeenSet>, config: IdempotencyConfig) -> Self {
        Self {
            store,
            config: Arc::new(config),
            extractor: KeyExtractor::default(),
            chunk_size: Self::DEFAULT_CHUNK_SIZE,
        }
    }

    /// How the `*_event(s)` methods name an envelope. Default
    /// [`KeyExtractor::IdempotencyKey`].
    #[must_use]
    pub fn with_extractor(mut self, extractor: KeyExtractor) -> Self {
        self.extractor = extractor;
        self
    }

    /// How many ids one round trip carries in the batch methods (at least
    /// 1). Default [`DEFAULT_CHUNK_SIZE`](Self::DEFAULT_CHUNK_SIZE).
    #[must_use]
    pub fn chunk_size(mut self, ids: usize) -> Self {
        self.chunk_size = ids.max(1);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SeenSet> {
        &self.store
    }

    /// The storage key for `id` (prefix, optional hashing), after validating
    /// it: the same key [`IdempotencyChecker::storage_key`](crate::IdempotencyChecker::storage_key) gives.
    pub fn storage_key(&self, id: &str) -> Result<String> {
        Ok(stored_key(id, &self.config)?.storage)
    }

    fn storage_keys<S: AsRef<str>>(&self, ids: &[S]) -> Result<Vec<String>> {
        ids.iter().map(|id| self.storage_key(id.as_ref())).collect()
    }

    /// Whether `id` is new: `true` the first time (and `id` is now marked
    /// for `ttl`), `false` when it was seen before. Atomic: of any number of
    /// concurrent calls for one id, across processes sharing the store,
    /// exactly one gets `true`.
    pub async fn check_and_mark(&self, id: &str) -> Result<bool> {
        let key = self.storage_key(id)?;
        Ok(self
            .mark_chunk(&[key])
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// [`check_and_mark`](Self::check_and_mark) for many ids: one answer per
    /// id, in input order; of repeats within `ids`, only the first is new.
    /// Every id is validated before the store is asked (one invalid id fails
    /// the whole batch, marking nothing); then one round trip per chunk.
    pub async fn check_and_mark_batch<S: AsRef<str>>(&self, ids: &[S]) -> Result<Vec<bool>> {
        let keys = self.storage_keys(ids)?;
        let mut answers = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.chunk_size) {
            answers.extend(self.mark_chunk(chunk).await?);
        }
        Ok(answers)
    }

    /// Whether `id` was seen (a read: marks nothing).
    pub async fn is_seen(&self, id: &str) -> Result<bool> {
        let key = self.storage_key(id)?;
        Ok(self
            .contains_chunk(&[key])
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// [`is_seen`](Self::is_seen) for many ids, in input order,
    /// one round trip per chunk (marks nothing).
    pub async fn batch_check<S: AsRef<str>>(&self, ids: &[S]) -> Result<Vec<bool>> {
        let keys = self.storage_keys(ids)?;
        let mut answers = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.chunk_size) {
            answers.extend(self.contains_chunk(chunk).await?);
        }
        Ok(answers)
    }

    /// Forgets `id`, so it is new again; returns whether it was marked (or
    /// had any record).
    pub async fn forget(&self, id: &str) -> Result<bool> {
        let key = self.storage_key(id)?;
        let started = Instant::now();
        let deleted = self.store.delete(&key).await;
        store_latency("delete", started);
        deleted
    }

    /// The id of `envelope`, by this deduplicator's [`KeyExtractor`].
    pub fn key_of<P: Serialize>(&self, envelope: &EventEnvelope<P>) -> Result<String> {
        self.extractor.key_of(envelope)
    }

    /// [`check_and_mark`](Self::check_and_mark) for the envelope's id (see
    /// [`with_extractor`](Self::with_extractor)).
    pub async fn check_and_mark_event<P: Serialize>(
        &self,
        envelope: &EventEnvelope<P>,
    ) -> Result<bool> {
        self.check_and_mark(&self.key_of(envelope)?).await
    }

    /// [`check_and_mark_batch`](Self::check_and_mark_batch) for the
    /// envelopes' ids.
    pub async fn check_and_mark_events<P: Serialize>(
        &self,
        envelopes: &[EventEnvelope<P>],
    ) -> Result<Vec<bool>> {
        let ids = envelopes
            .iter()
            .map(|e| self.key_of(e))
            .collect::<Result<Vec<_>>>()?;
        self.check_and_mark_batch(&ids).await
    }

    /// One store call marking `keys`.
    async fn mark_chunk(&self, keys: &[String]) -> Result<Vec<bool>> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let started = Instant::now();
        let answers = self
            .store
            .mark(&refs, self.config.ttl)
            .instrument(tracing::debug_span!("idempotency.mark", keys = keys.len()))
            .await;
        store_latency("mark", started);
        let answers = self.checked(keys.len(), answers?)?;
        let new = answers.iter().filter(|&&new| new).count();
        metrics::counter!("idempotency_dedup_new_total").increment(new as u64);
        metrics::counter!("idempotency_dedup_duplicates_total")
            .increment((answers.len() - new) as u64);
        Ok(answers)
    }

    /// One store call reading `keys`.
    async fn contains_chunk(&self, keys: &[String]) -> Result<Vec<bool>> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let started = Instant::now();
        let answers = self
            .store
            .contains(&refs)
            .instrument(tracing::debug_span!(
                "idempotency.contains",
                keys = keys.len()
            ))
            .await;
        store_latency("contains", started);
        self.checked(keys.len(), answers?)
    }

    /// A store's answers, refused unless there is one per key.
    fn checked(&self, keys: usize, answers: Vec<bool>) -> Result<Vec<bool>> {
        if answers.len() == keys {
            Ok(answers)
        } else {
            Err(IdempotencyError::store_unavailable(
                self.store.name(),
                format!("{} answers for {keys} keys", answers.len()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use crate::key::validate_key;
    use serde_json::json;

    #[test]
    fn field_keys_are_unambiguous_and_never_invented() {
        let fields = KeyExtractor::fields(["a", "b"]);
        let key = |payload| fields.key_of(&EventEnvelope::new("t", payload));
        // Joining with a separator would make these two the same key.
        let one = key(json!({"a": "x:y", "b": "z"})).expect("key");
        let two = key(json!({"a": "x", "b": "y:z"})).expect("key");
        assert_ne!(one, two);
        assert_ne!(
            key(json!({"a": 1, "b": 2})).expect("key"),
            key(json!({"a": "1", "b": 2})).expect("key")
        );
        // Objects as values are canonical.
        assert_eq!(
            key(json!({"a": {"y": 1, "x": 2}, "b": true})).expect("key"),
            r#"[{"x":2,"y":1},true]"#
        );
        for (payload, field) in [
            (json!({"a": 1}), "b"),
            (json!({"a": 1, "b": null}), "b"),
            (json!([1, 2]), "a"),
        ] {
            assert!(matches!(
                key(payload),
                Err(IdempotencyError::MissingKeyField { field: f }) if f == field
            ));
        }
        let pointer = KeyExtractor::fields(["/user/id", "/items/0"]);
        let event = EventEnvelope::new("t", json!({"user": {"id": "u"}, "items": [3]}));
        assert_eq!(pointer.key_of(&event).expect("key"), r#"["u",3]"#);
    }

    #[test]
    fn envelope_extractors() {
        let event = EventEnvelope::new("t", json!({"n": 1})).with_event_id("e");
        assert_eq!(KeyExtractor::default().key_of(&event).expect("key"), "e");
        let keyed = event.clone().with_idempotency_key("k");
        assert_eq!(
            KeyExtractor::IdempotencyKey.key_of(&keyed).expect("key"),
            "k"
        );
        assert_eq!(KeyExtractor::EventId.key_of(&keyed).expect("key"), "e");
        assert_eq!(
            KeyExtractor::ContentHash.key_of(&keyed).expect("key"),
            fingerprint(&json!({"n": 1})).expect("fp")
        );
        // Typed payloads work too.
        #[derive(Serialize)]
        struct Click {
            user: u32,
        }
        let typed = EventEnvelope::new("click", Click { user: 9 });
        assert_eq!(
            KeyExtractor::fields(["user"]).key_of(&typed).expect("key"),
            "[9]"
        );
        let custom =
            KeyExtractor::custom(|e| Ok(format!("{}/{}", e.event_type, e.payload["user"])));
        assert_eq!(custom.key_of(&typed).expect("key"), "click/9");
    }

    #[test]
    fn long_derived_keys_are_hashed_and_short_ones_kept() {
        let fields = KeyExtractor::fields(["user"]);
        let at_limit = "u".repeat(KeyExtractor::MAX_DERIVED_KEY_LEN - 4);
        let event = EventEnvelope::new("t", json!({ "user": at_limit }));
        assert_eq!(
            fields.key_of(&event).expect("key"),
            format!(r#"["{at_limit}"]"#)
        );
        let long = "u".repeat(300);
        let event = EventEnvelope::new("t", json!({ "user": long }));
        let key = fields.key_of(&event).expect("key");
        assert_eq!(key, sha256_hex(format!(r#"["{long}"]"#).as_bytes()));
        assert!(validate_key(&key, &IdempotencyConfig::default()).is_ok());
        let custom = KeyExtractor::custom(|e| Ok(e.payload["user"].to_string()));
        assert_eq!(custom.key_of(&event).expect("key").len(), 64);
        assert_eq!(
            fields
                .key_of_document(&json!({ "user": long }))
                .expect("key"),
            key,
            "a document and an envelope payload give one key"
        );
    }

    #[test]
    fn documents_follow_the_envelope_key_rule() {
        let key = |extractor: &KeyExtractor, document| extractor.key_of_document(&document);
        let by_key = KeyExtractor::IdempotencyKey;
        assert_eq!(
            key(&by_key, json!({"event_id": "e", "idempotency_key": "k"})).expect("key"),
            "k"
        );
        assert_eq!(key(&by_key, json!({"event_id": "e"})).expect("key"), "e");
        assert!(matches!(
            key(&by_key, json!({"event_id": "e", "idempotency_key": ""})),
            Err(IdempotencyError::InvalidKey {
                reason: crate::InvalidKeyReason::Empty
            })
        ));
        for keyless in [json!({"event_type": "t"}), json!({"event_id": ""})] {
            assert!(matches!(
                key(&by_key, keyless.clone()),
                Err(IdempotencyError::MissingKey)
            ));
            assert!(matches!(
                key(&KeyExtractor::EventId, keyless),
                Err(IdempotencyError::MissingKey)
            ));
        }
        assert!(matches!(
            key(&by_key, json!({"idempotency_key": 5})),
            Err(IdempotencyError::Serialization(_))
        ));
        assert!(matches!(
            key(&by_key, json!([1])),
            Err(IdempotencyError::Serialization(_))
        ));
        assert_eq!(
            key(&KeyExtractor::ContentHash, json!({"b": 1, "a": 2})).expect("key"),
            key(&KeyExtractor::ContentHash, json!({"a": 2, "b": 1})).expect("key"),
        );
        let custom = KeyExtractor::custom(|e| Ok(format!("{}|{}", e.event_id, e.payload["n"])));
        assert_eq!(key(&custom, json!({"n": 3})).expect("key"), "|3");
    }

    #[test]
    fn envelopes_without_a_key_are_refused() {
        let keyless: EventEnvelope =
            serde_json::from_value(json!({"event_type": "t", "payload": {}})).expect("parses");
        for extractor in [KeyExtractor::IdempotencyKey, KeyExtractor::EventId] {
            assert!(matches!(
                extractor.key_of(&keyless),
                Err(IdempotencyError::MissingKey)
            ));
        }
        let empty = keyless.clone().with_event_id("e").with_idempotency_key("");
        assert!(matches!(
            KeyExtractor::IdempotencyKey.key_of(&empty),
            Err(IdempotencyError::InvalidKey { .. })
        ));
    }

    #[tokio::test]
    async fn batches_are_chunked_and_answer_in_order() {
        let dedup = Deduplicator::new(MemoryStore::new()).chunk_size(2);
        let ids = ["a", "b", "a", "c", "d", "c", "e"];
        assert_eq!(
            dedup.check_and_mark_batch(&ids).await.expect("marks"),
            [true, true, false, true, true, false, true]
        );
        assert_eq!(
            dedup.batch_check(&["e", "x", "a"]).await.expect("reads"),
            [true, false, true]
        );
        assert!(dedup.forget("a").await.expect("clear"));
        assert!(!dedup.is_seen("a").await.expect("read"));
        assert!(dedup.check_and_mark("a").await.expect("mark"));
        let invalid = dedup.check_and_mark_batch(&["z", ""]).await;
        assert!(matches!(invalid, Err(IdempotencyError::InvalidKey { .. })));
        assert!(!dedup.is_seen("z").await.expect("read"), "nothing marked");
    }
}
