//! `schema/event-envelope.schema.json`, the JSON Schema that producers in
//! other languages validate against, and the Rust `EventEnvelope` agree.
//!
//! The first tests compare the schema with what the Rust type writes and
//! reads (a renamed, added or removed field fails them). The last one hands
//! documents built by `EventEnvelope::new` and broken variants of them to
//! Python's `jsonschema` (the venv `scripts/pyenv.sh` makes under
//! `target/pyenv`; `IDEMPOTENCY_PYTHON` overrides the interpreter), and
//! checks each verdict against what the checker does with the same document.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use idempotency::{
    EventEnvelope, IdempotencyChecker, IdempotencyError, InvalidKeyReason, MemoryStore,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn schema() -> Value {
    let path = root().join("schema/event-envelope.schema.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("the schema is JSON")
}

fn object(value: &Value) -> &Map<String, Value> {
    value.as_object().expect("a JSON object")
}

fn names(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .expect("a list of names")
        .iter()
        .map(|n| n.as_str().expect("a name").to_owned())
        .collect()
}

/// An envelope with every field set, as the Rust type writes it.
fn full_envelope() -> Value {
    let envelope = EventEnvelope::new("order.placed", json!({"order": 1, "cents": 100}))
        .with_idempotency_key("order-1:charge")
        .with_source("shop")
        .with_correlation_id("checkout-9");
    serde_json::to_value(&envelope).expect("serializes")
}

fn without(document: &Value, field: &str) -> Value {
    let mut document = document.clone();
    document
        .as_object_mut()
        .expect("an object")
        .remove(field)
        .unwrap_or_else(|| panic!("the document has no `{field}`"));
    document
}

#[test]
fn schema_names_exactly_the_fields_the_envelope_writes() {
    let schema = schema();
    let properties: BTreeSet<String> = object(&schema["properties"]).keys().cloned().collect();
    let written: BTreeSet<String> = object(&full_envelope()).keys().cloned().collect();
    assert_eq!(
        properties, written,
        "schema/event-envelope.schema.json and EventEnvelope disagree on the field names"
    );
    assert_eq!(schema["additionalProperties"], json!(false));
    assert_eq!(
        schema["$schema"],
        json!("https://json-schema.org/draft/2020-12/schema")
    );
}

#[test]
fn schema_requires_the_fields_the_reader_cannot_do_without() {
    let schema = schema();
    let required = names(&schema["required"]);
    let full = full_envelope();
    for field in object(&full).keys() {
        let parsed = serde_json::from_value::<EventEnvelope>(without(&full, field));
        assert_eq!(
            parsed.is_err(),
            required.contains(field),
            "`{field}`: the schema's `required` and the reader disagree ({parsed:?})"
        );
    }
}

#[test]
fn schema_asks_for_one_of_the_two_fields_the_key_comes_from() {
    let schema = schema();
    let branches: Vec<BTreeSet<String>> = schema["anyOf"]
        .as_array()
        .expect("anyOf")
        .iter()
        .map(|branch| names(&branch["required"]))
        .collect();
    let expected: Vec<BTreeSet<String>> = vec![
        BTreeSet::from(["idempotency_key".to_owned()]),
        BTreeSet::from(["event_id".to_owned()]),
    ];
    assert_eq!(branches, expected);

    // The reader: either field alone gives a key, neither gives MissingKey.
    let full = full_envelope();
    let key_only: EventEnvelope =
        serde_json::from_value(without(&full, "event_id")).expect("parses");
    assert_eq!(key_only.require_key().expect("a key"), "order-1:charge");
    let id_only: EventEnvelope =
        serde_json::from_value(without(&full, "idempotency_key")).expect("parses");
    assert_eq!(
        id_only.require_key().expect("a key"),
        full["event_id"].as_str().expect("an id")
    );
    let neither: EventEnvelope =
        serde_json::from_value(without(&without(&full, "event_id"), "idempotency_key"))
            .expect("parses");
    assert!(matches!(
        neither.require_key(),
        Err(IdempotencyError::MissingKey)
    ));
}

#[test]
fn schema_types_match_the_values_the_envelope_writes() {
    let schema = schema();
    let full = full_envelope();
    for (field, property) in object(&schema["properties"]) {
        let value = &full[field];
        let resolved = match property.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let name = reference
                    .strip_prefix("#/$defs/")
                    .unwrap_or_else(|| panic!("`{field}`: unexpected $ref {reference}"));
                &schema["$defs"][name]
            }
            None => property,
        };
        let Some(kind) = resolved.get("type") else {
            assert_eq!(field, "payload", "only the payload may be any JSON value");
            continue;
        };
        let actual = match value {
            Value::String(_) => "string",
            Value::Object(_) => "object",
            other => panic!("`{field}` was written as {other}"),
        };
        assert_eq!(kind, &json!(actual), "`{field}`");
    }
}

/// What the framework does with a document: the outcome of one `process`
/// call on a fresh checker with the default configuration.
#[derive(Debug, PartialEq)]
enum Reader {
    /// Parsed and processed: the handler ran.
    Runs,
    /// The JSON is not an `EventEnvelope`.
    ParseError,
    /// `MissingKey`.
    MissingKey,
    /// `InvalidKey` for this reason.
    InvalidKey(InvalidKeyReason),
}

async fn reader(document: &Value) -> Reader {
    let Ok(envelope) = serde_json::from_value::<EventEnvelope>(document.clone()) else {
        return Reader::ParseError;
    };
    let checker = IdempotencyChecker::new(MemoryStore::new());
    match checker
        .process(&envelope, |_lease| async { Ok::<_, IdempotencyError>(()) })
        .await
    {
        Ok(processed) if processed.was_executed() => Reader::Runs,
        Ok(other) => panic!("a fresh checker replayed {other:?}"),
        Err(IdempotencyError::MissingKey) => Reader::MissingKey,
        Err(IdempotencyError::InvalidKey { reason }) => Reader::InvalidKey(reason),
        Err(other) => panic!("unexpected error {other:?}"),
    }
}

fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("IDEMPOTENCY_PYTHON") {
        return PathBuf::from(python);
    }
    let python = root().join("target/pyenv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing. This test validates against the schema with Python's jsonschema: \
         create the environment with `bash scripts/pyenv.sh` (scripts/check.sh does), or set \
         IDEMPOTENCY_PYTHON to a python that has jsonschema and rfc3339-validator.",
        python.display()
    );
    python
}

/// The schema's verdict on each document, by Python's `jsonschema`: the
/// error messages, empty when the document is valid.
fn validate(documents: &[Value]) -> Vec<Vec<String>> {
    let mut child = Command::new(python())
        .arg(root().join("tests/python/envelope_schema.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python starts");
    let input = serde_json::to_vec(&json!({ "documents": documents })).expect("serializes");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&input)
        .expect("writes the documents");
    let output = child.wait_with_output().expect("python runs");
    assert!(
        output.status.success(),
        "the validator failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one list of errors per document")
}

#[derive(Serialize, Deserialize)]
struct Order {
    order: u32,
    cents: u64,
}

fn with(document: &Value, field: &str, value: Value) -> Value {
    let mut document = document.clone();
    document
        .as_object_mut()
        .expect("an object")
        .insert(field.to_owned(), value);
    document
}

#[tokio::test]
async fn envelopes_built_in_rust_are_valid_and_broken_ones_are_rejected() {
    let full = full_envelope();
    let id_only =
        serde_json::to_value(EventEnvelope::new("order.placed", json!(null))).expect("serializes");
    let typed = serde_json::to_value(
        EventEnvelope::new(
            "order.placed",
            Order {
                order: 7,
                cents: 700,
            },
        )
        .with_event_id("evt-7"),
    )
    .expect("serializes");
    let longest_key = serde_json::to_value(
        EventEnvelope::new("t", json!([1, 2])).with_idempotency_key("é".repeat(255)),
    )
    .expect("serializes");
    let key_only = without(&full, "event_id");

    // (what, document, what the reader does with it); the schema accepts these.
    let valid = [
        ("every field", full.clone(), Reader::Runs),
        ("EventEnvelope::new alone", id_only.clone(), Reader::Runs),
        ("a typed payload", typed, Reader::Runs),
        (
            "a key of 255 non-ASCII characters",
            longest_key,
            Reader::Runs,
        ),
        ("a key and no event id", key_only.clone(), Reader::Runs),
        (
            "an offset other than Z, with fractions",
            with(&full, "occurred_at", json!("2026-03-01T09:30:00.25+02:00")),
            Reader::Runs,
        ),
        (
            "no occurred_at",
            without(&full, "occurred_at"),
            Reader::Runs,
        ),
    ];
    // (what, document, what the reader does); the schema rejects these. Where
    // the reader accepts one, the schema is deliberately stricter.
    let invalid = [
        (
            "no event_type",
            without(&full, "event_type"),
            Reader::ParseError,
        ),
        ("no payload", without(&full, "payload"), Reader::ParseError),
        (
            "a numeric event_type",
            with(&full, "event_type", json!(5)),
            Reader::ParseError,
        ),
        (
            "neither key nor event id",
            without(&key_only, "idempotency_key"),
            Reader::MissingKey,
        ),
        (
            "an empty explicit key, with an event id",
            with(&full, "idempotency_key", json!("")),
            Reader::InvalidKey(InvalidKeyReason::Empty),
        ),
        (
            "a 256-character key",
            with(&full, "idempotency_key", json!("k".repeat(256))),
            Reader::InvalidKey(InvalidKeyReason::TooLong { len: 256, max: 255 }),
        ),
        (
            "a 256-character event id as the key",
            with(&id_only, "event_id", json!("e".repeat(256))),
            Reader::InvalidKey(InvalidKeyReason::TooLong { len: 256, max: 255 }),
        ),
        (
            "a newline at the end of the key",
            with(&full, "idempotency_key", json!("order-1\n")),
            Reader::InvalidKey(InvalidKeyReason::ControlCharacter),
        ),
        (
            "a C1 control character in the event id",
            with(&id_only, "event_id", json!("evt\u{85}1")),
            Reader::InvalidKey(InvalidKeyReason::ControlCharacter),
        ),
        (
            "occurred_at without an offset",
            with(&full, "occurred_at", json!("2026-03-01T09:30:00")),
            Reader::ParseError,
        ),
        (
            "occurred_at as a date only",
            with(&full, "occurred_at", json!("2026-03-01")),
            Reader::ParseError,
        ),
        (
            "occurred_at in month 13",
            with(&full, "occurred_at", json!("2026-13-01T09:30:00Z")),
            Reader::ParseError,
        ),
        (
            "occurred_at as a Unix time",
            with(&full, "occurred_at", json!(1_767_225_600)),
            Reader::ParseError,
        ),
        // Stricter than the reader: these would run, keyed differently or not
        // at all as the producer meant.
        (
            "a misspelt idempotencyKey (the reader ignores it and keys by event_id)",
            with(
                &without(&full, "idempotency_key"),
                "idempotencyKey",
                json!("order-1:charge"),
            ),
            Reader::Runs,
        ),
        (
            "a null idempotency_key (the reader keys by event_id)",
            with(&full, "idempotency_key", Value::Null),
            Reader::Runs,
        ),
        (
            "an empty event_type",
            with(&full, "event_type", json!("")),
            Reader::Runs,
        ),
    ];

    let documents: Vec<Value> = valid
        .iter()
        .chain(invalid.iter())
        .map(|(_, document, _)| document.clone())
        .collect();
    let verdicts = validate(&documents);
    assert_eq!(verdicts.len(), documents.len());

    let mut problems = Vec::new();
    for ((what, document, expected), errors) in valid.iter().zip(&verdicts) {
        if !errors.is_empty() {
            problems.push(format!(
                "valid `{what}` was rejected: {errors:?}\n  {document}"
            ));
        }
        let read = reader(document).await;
        if &read != expected {
            problems.push(format!(
                "`{what}`: the reader gave {read:?}, not {expected:?}"
            ));
        }
    }
    for ((what, document, expected), errors) in invalid.iter().zip(&verdicts[valid.len()..]) {
        if errors.is_empty() {
            problems.push(format!("invalid `{what}` was accepted\n  {document}"));
        }
        let read = reader(document).await;
        if &read != expected {
            problems.push(format!(
                "`{what}`: the reader gave {read:?}, not {expected:?}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
