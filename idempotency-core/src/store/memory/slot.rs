//! [`Slot`]: one record of the [`MemoryStore`](super::MemoryStore) in
//! compact form, the representation the benchmark's memory numbers rest on.
//! The store's logic, in `mod.rs`, only asks it for a [`RecordView`], a
//! public [`IdempotencyRecord`], and to trim itself to what `COMPLETED`
//! keeps.

use chrono::{DateTime, Utc};

use crate::record::{IdempotencyRecord, RecordStatus, RecordView};
use crate::store::ResultJson;

/// One record in compact form: every text field in one allocation, and the
/// fields each status keeps (see [`IdempotencyRecord`]) in its [`State`].
/// The public record is built only when a caller reads one.
pub(super) struct Slot {
    pub(super) hash: u64,
    /// The storage key, the fingerprint, the recorded key, the event id, the
    /// event type and the lease token, end to end; an absent field is empty.
    text: Box<str>,
    /// Where each of the first five fields of `text` ends.
    ends: [usize; 5],
    pub(super) attempts: u32,
    pub(super) expires_at: DateTime<Utc>,
    pub(super) state: State,
}

pub(super) enum State {
    Processing {
        first_seen_at: DateTime<Utc>,
        lease_expires_at: DateTime<Utc>,
    },
    Failed {
        first_seen_at: DateTime<Utc>,
        error: String,
    },
    Completed {
        completed_at: DateTime<Utc>,
        /// The result's JSON text as the checker wrote it (`None` when it
        /// could not be stored), parsed on each read: a key completes once
        /// and is read back only by its duplicates.
        result: Option<ResultJson<'static>>,
    },
}

/// The index of a field in [`Slot::text`].
#[derive(Clone, Copy)]
pub(super) enum Field {
    Key = 0,
    Fingerprint,
    RecordedKey,
    EventId,
    EventType,
    Token,
}

/// In a slot's text an absent field is empty.
pub(super) fn present(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl Slot {
    /// A slot holding `fields` (in [`Field`] order) in one allocation.
    pub(super) fn new(
        hash: u64,
        fields: [&str; 6],
        attempts: u32,
        expires_at: DateTime<Utc>,
        state: State,
    ) -> Self {
        let mut text = String::with_capacity(fields.iter().map(|f| f.len()).sum());
        let mut ends = [0; 5];
        for (i, field) in fields.iter().enumerate() {
            text.push_str(field);
            if let Some(end) = ends.get_mut(i) {
                *end = text.len();
            }
        }
        Self {
            hash,
            text: text.into_boxed_str(),
            ends,
            attempts,
            expires_at,
            state,
        }
    }

    pub(super) fn field(&self, field: Field) -> &str {
        let i = field as usize;
        let start = i.checked_sub(1).map_or(0, |j| self.ends[j]);
        let end = self.ends.get(i).copied().unwrap_or(self.text.len());
        self.text.get(start..end).unwrap_or_default()
    }

    pub(super) fn is(&self, key: &str) -> bool {
        self.field(Field::Key) == key
    }

    pub(super) fn status(&self) -> RecordStatus {
        match self.state {
            State::Processing { .. } => RecordStatus::Processing,
            State::Failed { .. } => RecordStatus::Failed,
            State::Completed { .. } => RecordStatus::Completed,
        }
    }

    pub(super) fn first_seen_at(&self) -> Option<DateTime<Utc>> {
        match self.state {
            State::Processing { first_seen_at, .. } | State::Failed { first_seen_at, .. } => {
                Some(first_seen_at)
            }
            State::Completed { .. } => None,
        }
    }

    pub(super) fn lease_expires_at(&self) -> Option<DateTime<Utc>> {
        match self.state {
            State::Processing {
                lease_expires_at, ..
            } => Some(lease_expires_at),
            _ => None,
        }
    }

    pub(super) fn view(&self) -> RecordView<'_> {
        RecordView {
            status: self.status(),
            attempts: self.attempts,
            lease_token: present(self.field(Field::Token)),
            lease_expires_at: self.lease_expires_at(),
            fingerprint: present(self.field(Field::Fingerprint)),
        }
    }

    /// Keeps only what a `COMPLETED` record keeps of the text: the key and
    /// the fingerprint.
    pub(super) fn trim_to_completed(&mut self) {
        let keep = self.ends[Field::Fingerprint as usize];
        let mut text = String::from(std::mem::take(&mut self.text));
        text.truncate(keep);
        self.text = text.into_boxed_str();
        for end in &mut self.ends[Field::RecordedKey as usize..] {
            *end = keep;
        }
    }

    /// The public record, with its expiry filled in.
    pub(super) fn snapshot(&self) -> IdempotencyRecord {
        let text = |field| present(self.field(field)).map(str::to_owned);
        let mut record = IdempotencyRecord {
            idempotency_key: text(Field::RecordedKey),
            event_id: text(Field::EventId),
            event_type: text(Field::EventType),
            status: self.status(),
            result: None,
            error: None,
            first_seen_at: self.first_seen_at(),
            completed_at: None,
            attempts: self.attempts,
            lease_token: text(Field::Token),
            lease_expires_at: self.lease_expires_at(),
            fingerprint: text(Field::Fingerprint),
            expires_at: Some(self.expires_at),
        };
        match &self.state {
            State::Processing { .. } => {}
            State::Failed { error, .. } => record.error = Some(error.clone()),
            State::Completed {
                completed_at,
                result,
            } => {
                record.completed_at = Some(*completed_at);
                // Text the store cannot read back (nested deeper than
                // serde_json reads, which the checker never writes) is no
                // result: never a made-up value.
                record.result = result
                    .as_ref()
                    .and_then(|json| serde_json::from_str(json.get()).ok());
            }
        }
        record
    }
}
