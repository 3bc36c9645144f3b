//! Redis AUTH and ACL users: credentials come from the URL, and wrong or
//! missing credentials are a clear, fast error, never a hang. TLS
//! (`rediss://`) against a server with a certificate from a test CA.

mod common;

use std::time::{Duration, Instant};

use common::{RedisServer, ServerKind, TlsRedisServer};
use idempotency::{EventEnvelope, IdempotencyChecker, IdempotencyError, RedisStore};
use serde_json::json;

/// Processes `e` twice: it runs once and is replayed once.
async fn run_twice(checker: &IdempotencyChecker, e: &EventEnvelope) {
    for _ in 0..2 {
        checker
            .process(e, |_| async { Ok::<_, IdempotencyError>(1) })
            .await
            .expect("process");
    }
    assert_eq!(checker.stats().executed, 1);
    assert_eq!(checker.stats().replayed, 1);
}

async fn processes_once(url: &str) {
    let store = RedisStore::connect(url)
        .await
        .expect("connect with credentials");
    let checker = IdempotencyChecker::new(store);
    let e = EventEnvelope::new("test.event", json!({})).with_idempotency_key("auth-1");
    run_twice(&checker, &e).await;
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
        Err(IdempotencyError::Config {
            option: "url",
            reason: message,
        }) => {
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

/// The documented least-privilege rules: the store's key prefix, and the
/// commands of [`RedisStore::ACL_COMMANDS`].
fn acl_rules() -> String {
    format!(
        "~idempotency:* ~c:* ~m:* ~a:* resetchannels -@all {}",
        RedisStore::ACL_COMMANDS
    )
}

/// What the guide adds for the admin operations (`StoreAdmin`, the
/// `idempotency` tool).
const ADMIN_ACL_COMMANDS: &str = "+scan +unlink +memory|usage";

/// A server whose default user is off, and whose `idem` user (password
/// `idem-pass`) has exactly `rules`.
fn server_with_acl(rules: &str) -> RedisServer {
    kind_with_acl(ServerKind::Redis, rules)
}

/// [`server_with_acl`] on a server of `kind`.
fn kind_with_acl(kind: ServerKind, rules: &str) -> RedisServer {
    let mut args = vec![
        "--user",
        "default",
        "off",
        "--user",
        "idem",
        "on",
        ">idem-pass",
    ];
    args.extend(rules.split_whitespace());
    RedisServer::start_kind_with(kind, &args)
}

fn idem_url(server: &RedisServer) -> String {
    format!("redis://idem:idem-pass@127.0.0.1:{}", server.port())
}

/// The guide quotes the rules the tests run under, so the documented ACL
/// cannot fall behind the commands the store sends.
#[test]
fn the_guide_documents_the_tested_acl() {
    let guide = include_str!("../docs/guide/04-configuration.md");
    let documented = format!(
        "ACL SETUSER idem on >password ~idempotency:* resetchannels -@all {}",
        RedisStore::ACL_COMMANDS
    );
    assert!(
        guide.contains(&documented),
        "docs/guide/04-configuration.md must quote: {documented}"
    );
    assert!(
        guide.contains(ADMIN_ACL_COMMANDS),
        "docs/guide/04-configuration.md must name the admin commands: {ADMIN_ACL_COMMANDS}"
    );
    for rule in ["+pexpiretime", "+info", "+exists"] {
        assert!(RedisStore::ACL_COMMANDS.contains(rule), "{rule}");
    }
}

#[tokio::test]
async fn a_least_privilege_acl_user_is_enough() {
    // The default user is off; `idem` may run exactly the commands the store
    // sends (the scripts' own included), on its prefixes only.
    let server = server_with_acl(&acl_rules());
    let port = server.port();
    processes_once(&format!("redis://idem:idem-pass@127.0.0.1:{port}")).await;
    refused(&format!("redis://idem:wrong@127.0.0.1:{port}")).await;
    refused(&format!("redis://nobody:idem-pass@127.0.0.1:{port}")).await;
}

/// On Valkey 9 the documented ACL is enough for the `SET ... IFEQ`
/// completion too: the connect-time probe (on `idempotency:capability-probe`)
/// finds it; a user whose key patterns exclude the probe's key still gets
/// it, decided by the first completion.
#[tokio::test]
async fn the_documented_acl_is_enough_for_set_ifeq_on_valkey() {
    let server = kind_with_acl(ServerKind::Valkey, &acl_rules());
    let store = RedisStore::connect(&idem_url(&server))
        .await
        .expect("connect as the ACL user");
    assert_eq!(store.completes_with_set_ifeq(), Some(true));
    processes_once(&idem_url(&server)).await;

    let narrow = acl_rules().replace("~idempotency:*", "~idempotency:events:*");
    let server = kind_with_acl(ServerKind::Valkey, &narrow);
    let store = RedisStore::connect(&idem_url(&server))
        .await
        .expect("connect as the ACL user");
    assert_eq!(
        store.completes_with_set_ifeq(),
        None,
        "the probe could not tell"
    );
    let checker = IdempotencyChecker::new(store.clone());
    let e = EventEnvelope::new("test.event", json!({})).with_idempotency_key("narrow-1");
    run_twice(&checker, &e).await;
    assert_eq!(
        store.completes_with_set_ifeq(),
        Some(true),
        "the completion decided"
    );
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

/// A command the ACL refuses is `StoreRefused { PermissionDenied }` naming
/// the command, not "unavailable": at connect (`INFO`, for the eviction
/// check), and inside a script, where Redis itself does not say which
/// command it refused.
#[tokio::test]
async fn a_missing_acl_permission_is_a_permission_error_naming_the_command() {
    use idempotency::StoreRefusal;
    let server = server_with_acl(&acl_rules().replace(" +info", ""));
    match RedisStore::connect(&idem_url(&server)).await {
        Err(IdempotencyError::StoreRefused {
            store: "redis",
            reason: StoreRefusal::PermissionDenied,
            source,
        }) => assert!(source.to_string().contains("'info'"), "{source}"),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }

    // The ACL the guide documented before: no PEXPIRETIME, which the
    // scripts call on a fresh claim (here: failing it).
    let server = server_with_acl(&acl_rules().replace(" +pexpiretime", ""));
    let store = RedisStore::connect(&idem_url(&server))
        .await
        .expect("connect");
    let checker = IdempotencyChecker::new(store);
    let e = EventEnvelope::new("test.event", json!({})).with_idempotency_key("perm-1");
    let lease = match checker.claim(&e).await.expect("claim") {
        idempotency::ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    };
    match checker.fail(&lease, "boom").await {
        Err(IdempotencyError::StoreRefused {
            reason: StoreRefusal::PermissionDenied,
            source,
            ..
        }) => assert!(
            source.to_string().contains("may not run +pexpiretime"),
            "{source}"
        ),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    // The server is still up and answering (the probe is safe).
    checker.health_check().await.expect("healthy");
}

/// The whole store conformance suite passes under the
/// documented least-privilege ACL user.
macro_rules! acl_conformance {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                // The admin rules run with the admin commands the guide
                // documents on top; every other rule with the store's alone.
                let mut rules = acl_rules();
                if stringify!($name).starts_with("admin_") {
                    rules = format!("{rules} {ADMIN_ACL_COMMANDS}");
                }
                let server = server_with_acl(&rules);
                let store = RedisStore::connect(&idem_url(&server))
                    .await
                    .expect("connect as the ACL user");
                idempotency_core::testing::$name(&store).await;
            }
        )*
    };
}

mod conformance_under_the_documented_acl {
    use super::*;

    idempotency_core::for_each_conformance_rule!(acl_conformance);

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_have_one_winner() {
        let server = server_with_acl(&acl_rules());
        let store = RedisStore::connect(&idem_url(&server))
            .await
            .expect("connect as the ACL user");
        idempotency_core::testing::concurrent_claims_have_one_winner(std::sync::Arc::new(store))
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_marks_have_one_winner() {
        let server = server_with_acl(&acl_rules());
        let store = RedisStore::connect(&idem_url(&server))
            .await
            .expect("connect as the ACL user");
        idempotency_core::testing::concurrent_marks_have_one_winner(std::sync::Arc::new(store))
            .await;
    }
}
