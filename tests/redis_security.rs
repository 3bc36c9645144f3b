//! Redis AUTH and ACL users: credentials come from the URL, and wrong or
//! missing credentials are a clear, fast error, never a hang. TLS
//! (`rediss://`) against a server with a certificate from a test CA.

mod common;

use std::time::{Duration, Instant};

use common::{RedisServer, TlsRedisServer};
use idempotency::{EventEnvelope, IdempotencyChecker, IdempotencyError, RedisStore};
use serde_json::json;

async fn processes_once(url: &str) {
    let store = RedisStore::connect(url)
        .await
        .expect("connect with credentials");
    let checker = IdempotencyChecker::new(store);
    let e = EventEnvelope::new("test.event", json!({})).with_idempotency_key("auth-1");
    for _ in 0..2 {
        checker
            .process(&e, |_| async { Ok::<_, IdempotencyError>(1) })
            .await
            .expect("process");
    }
    assert_eq!(checker.stats().executed, 1);
    assert_eq!(checker.stats().replayed, 1);
    assert!(
        checker.delete_record("auth-1").await.expect("delete"),
        "DEL works under these credentials too"
    );
}

/// Connecting with `url` fails at once with a typed error that says the
/// credentials were refused.
async fn refused(url: &str) {
    let started = Instant::now();
    let outcome = RedisStore::connect(url).await;
    let elapsed = started.elapsed();
    match outcome {
        Err(IdempotencyError::Config(message)) => {
            assert!(
                message.contains("credentials"),
                "the message names the cause: {message}"
            );
        }
        other => panic!("expected a Config error for refused credentials, got {other:?}"),
    }
    assert!(
        elapsed < Duration::from_secs(2),
        "refused credentials fail fast, not after retries ({elapsed:?})"
    );
}

#[tokio::test]
async fn requirepass_is_honoured_and_wrong_passwords_are_clear_errors() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let port = server.port();
    processes_once(&format!("redis://:s3cret@127.0.0.1:{port}")).await;
    refused(&format!("redis://:wrong@127.0.0.1:{port}")).await;
    refused(&format!("redis://127.0.0.1:{port}")).await;
}

#[tokio::test]
async fn a_least_privilege_acl_user_is_enough() {
    // The default user is off; `idem` may run exactly the commands the store
    // sends (the scripts' own GET/SET/PTTL/TIME included), on its prefix only.
    let mut args = vec![
        "--user",
        "default",
        "off",
        "--user",
        "idem",
        "on",
        ">idem-pass",
    ];
    args.extend(
        "~idempotency:* resetchannels -@all +evalsha +eval +script|load +get +set +del \
         +pttl +time +ping"
            .split_whitespace(),
    );
    let server = RedisServer::start_with(&args);
    let port = server.port();
    processes_once(&format!("redis://idem:idem-pass@127.0.0.1:{port}")).await;
    refused(&format!("redis://idem:wrong@127.0.0.1:{port}")).await;
    refused(&format!("redis://nobody:idem-pass@127.0.0.1:{port}")).await;
}

/// `rediss://` with the test CA trusted: the whole protocol runs over TLS.
#[tokio::test]
async fn tls_with_the_servers_ca_works() {
    let server = TlsRedisServer::start();
    let store = RedisStore::builder(server.url())
        .tls_root_certificate(server.ca_pem())
        .connect()
        .await
        .expect("connect over TLS");
    let checker = IdempotencyChecker::new(store);
    let e = EventEnvelope::new("test.event", json!({})).with_idempotency_key("tls-1");
    for _ in 0..2 {
        let done = checker
            .process(&e, |_| async { Ok::<_, IdempotencyError>(7) })
            .await
            .expect("process over TLS");
        assert_eq!(*done.value(), 7);
    }
    assert_eq!(checker.stats().executed, 1);
    assert_eq!(checker.stats().replayed, 1);
}

/// A certificate from a CA we do not trust, or a plain-text client on the
/// TLS port: a fast error, never a hang and never an unverified connection.
#[tokio::test]
async fn tls_refuses_an_untrusted_certificate_and_plain_text() {
    let server = TlsRedisServer::start();
    for (what, builder) in [
        (
            "another CA",
            RedisStore::builder(server.url()).tls_root_certificate(server.other_ca_pem()),
        ),
        ("the system's roots", RedisStore::builder(server.url())),
        (
            "plain text",
            RedisStore::builder(format!("redis://127.0.0.1:{}", server.port())),
        ),
    ] {
        let started = Instant::now();
        let outcome = builder
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await;
        assert!(
            matches!(outcome, Err(IdempotencyError::StoreUnavailable { .. })),
            "{what}: {outcome:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
}
