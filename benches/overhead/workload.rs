//! The handlers under test, and the workers that run one operation of a
//! workload: ours, the hand-written reference and the peer (`idempotent`).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotency::{EventEnvelope, IdempotencyChecker, IdempotencyError, Processed, idempotent};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::peer::Peer;
use crate::problems::{ANOMALIES, ok, problem};
use crate::{CLAIM_VALUE, DONE_VALUE, LEAD_IN, PIPELINE, PREFIX, RESULT, TTL_MS};

/// The event payload (not serialized unless fingerprinting is on).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Payload {
    pub(crate) order_id: u64,
    pub(crate) amount_cents: u64,
}

/// The direct call: `checker.process` with a no-op handler.
pub(crate) async fn via_process(
    checker: &IdempotencyChecker,
    envelope: &EventEnvelope<Payload>,
) -> Result<Processed<String>, IdempotencyError> {
    checker
        .process(envelope, |_lease| async {
            Ok::<_, IdempotencyError>(RESULT.to_owned())
        })
        .await
}

/// The same no-op handler through the attribute.
#[idempotent(checker = checker)]
pub(crate) async fn via_macro(
    checker: &IdempotencyChecker,
    envelope: &EventEnvelope<Payload>,
) -> Result<String, IdempotencyError> {
    Ok(RESULT.to_owned())
}

/// Writes a UUID-shaped key for `n` (36 characters) after `prefix`: the
/// high 32 bits, then the low 32 bits, in hex. Hand-rolled (about 4x faster
/// than `write!`) so key generation stays small next to a MemoryStore call.
pub(crate) fn uuid_key(out: &mut String, prefix: &str, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hex = |out: &mut String, value: u64, digits: u32| {
        for shift in (0..digits).rev() {
            out.push(char::from(HEX[((value >> (shift * 4)) & 0xf) as usize]));
        }
    };
    out.clear();
    out.push_str(prefix);
    hex(out, n >> 32, 8);
    out.push_str("-0000-4000-8000-");
    hex(out, n & 0xffff_ffff, 12);
}

pub(crate) fn envelope(n: u64) -> EventEnvelope<Payload> {
    let mut id = String::new();
    uuid_key(&mut id, "", n);
    EventEnvelope::new(
        "order.placed",
        Payload {
            order_id: n,
            amount_cents: 1200,
        },
    )
    .with_event_id(id)
}

// ---------------------------------------------------------------------------
// Workers: one operation of one workload.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Job {
    Ping,
    Get,
    PipelinedGet,
    RefNew,
    /// The hand-written client, completing through a script that makes the
    /// same two calls as our Redis 7 compare script (`GET`, then `SET XX
    /// PX`) without comparing: the server's Lua cost with none of our
    /// client's work.
    RefNewScript,
    RefDup,
    ProcessNew,
    ProcessDup,
    MacroNew,
    MacroDup,
    /// `idempotent` 0.3.0: claim (`try_insert`), then `complete`.
    PeerNew,
    /// `idempotent` 0.3.0: `try_insert` finds the completed entry.
    PeerDup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    New,
    Duplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Reference,
    Process,
    Macro,
    /// The crate `idempotent` 0.3.0 with its Redis store.
    Peer,
    /// The hand-written client completing through a script that costs the
    /// server what our Redis 7 compare script does ([`Job::RefNewScript`]):
    /// new events only (its duplicates are the hand-written client's).
    ScriptedReference,
}

impl Variant {
    pub(crate) fn job(self, kind: Kind) -> Job {
        match (self, kind) {
            (Self::Reference, Kind::New) => Job::RefNew,
            (Self::Reference, Kind::Duplicate) => Job::RefDup,
            (Self::Process, Kind::New) => Job::ProcessNew,
            (Self::Process, Kind::Duplicate) => Job::ProcessDup,
            (Self::Macro, Kind::New) => Job::MacroNew,
            (Self::Macro, Kind::Duplicate) => Job::MacroDup,
            (Self::Peer, Kind::New) => Job::PeerNew,
            (Self::Peer, Kind::Duplicate) => Job::PeerDup,
            (Self::ScriptedReference, Kind::New) => Job::RefNewScript,
            (Self::ScriptedReference, Kind::Duplicate) => Job::RefDup,
        }
    }

    /// The name in progress lines.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Reference => "reference",
            Self::Process => "process",
            Self::Macro => "macro",
            Self::Peer => "idempotent",
            Self::ScriptedReference => "scripted reference",
        }
    }
}

/// Everything one task needs; cloned per task (the connection and the
/// checker are cheap handles to one shared connection).
#[derive(Debug, Clone)]
pub(crate) struct Worker {
    pub(crate) job: Job,
    pub(crate) task: u64,
    pub(crate) base: u64,
    pub(crate) conn: ConnectionManager,
    pub(crate) checker: IdempotencyChecker,
    pub(crate) key: String,
    pub(crate) envelope: EventEnvelope<Payload>,
    pub(crate) ref_keys: Arc<[String]>,
    pub(crate) dup_envelopes: Arc<[EventEnvelope<Payload>]>,
    pub(crate) peer: Peer,
    /// Iterations of a busy loop the hand-written client's duplicate spends
    /// after its reply (0 but in `spin` runs with `IDEMPOTENCY_BENCH_BURN`):
    /// client CPU added on purpose, to see what it does to batching.
    pub(crate) burn: u64,
}

impl Worker {
    pub(crate) fn pick(&self, i: u64, len: usize) -> usize {
        ((self.task.wrapping_mul(37).wrapping_add(i)) % len as u64) as usize
    }

    /// One operation; returns how many operations it counts for.
    pub(crate) async fn op(&mut self, i: u64) -> u64 {
        let fresh = self.base + (self.task << 32) + i;
        match self.job {
            Job::Ping => {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut self.conn).await;
                black_box(ok(pong));
                1
            }
            Job::Get => {
                let key = &self.ref_keys[self.pick(i, self.ref_keys.len())];
                let value: redis::RedisResult<Option<Vec<u8>>> =
                    redis::cmd("GET").arg(key).query_async(&mut self.conn).await;
                black_box(ok(value));
                1
            }
            Job::PipelinedGet => {
                let mut pipe = redis::pipe();
                for j in 0..PIPELINE as u64 {
                    let key =
                        &self.ref_keys[self.pick(i * PIPELINE as u64 + j, self.ref_keys.len())];
                    pipe.cmd("GET").arg(key);
                }
                let values: redis::RedisResult<Vec<Option<Vec<u8>>>> =
                    pipe.query_async(&mut self.conn).await;
                black_box(ok(values));
                PIPELINE as u64
            }
            Job::RefNew | Job::RefNewScript => {
                uuid_key(&mut self.key, PREFIX, fresh);
                let claimed: redis::RedisResult<Option<Vec<u8>>> =
                    claim_command(&self.key).query_async(&mut self.conn).await;
                match ok(claimed) {
                    Some(None) => {
                        // Nil: the key was absent and is ours. The no-op
                        // handler runs here; then complete.
                        let done: redis::RedisResult<redis::Value> = if self.job == Job::RefNew {
                            redis::cmd("SET")
                                .arg(&self.key)
                                .arg(DONE_VALUE)
                                .arg("XX")
                                .arg("PX")
                                .arg(TTL_MS)
                                .query_async(&mut self.conn)
                                .await
                        } else {
                            UNFENCED_SCRIPT
                                .key(&self.key)
                                .arg(DONE_VALUE)
                                .arg(TTL_MS)
                                .invoke_async(&mut self.conn)
                                .await
                        };
                        if let Some(redis::Value::Nil) = ok(done) {
                            problem(&ANOMALIES, "reference: SET XX found no key");
                        }
                    }
                    Some(Some(_)) => problem(&ANOMALIES, "reference: a fresh key existed"),
                    None => {}
                }
                1
            }
            Job::RefDup => {
                let key = &self.ref_keys[self.pick(i, self.ref_keys.len())];
                let existing: redis::RedisResult<Option<Vec<u8>>> =
                    claim_command(key).query_async(&mut self.conn).await;
                if let Some(None) = black_box(ok(existing)) {
                    problem(&ANOMALIES, "reference: a duplicate's key was absent");
                }
                let mut spent = 0u64;
                for j in 0..self.burn {
                    spent = black_box(spent.wrapping_add(j));
                }
                1
            }
            Job::ProcessNew | Job::MacroNew => {
                uuid_key(&mut self.envelope.event_id, "", fresh);
                if self.job == Job::ProcessNew {
                    if let Some(processed) = ok(via_process(&self.checker, &self.envelope).await)
                        && !processed.was_executed()
                    {
                        problem(&ANOMALIES, "process: a fresh key was replayed");
                    }
                } else {
                    black_box(ok(via_macro(&self.checker, &self.envelope).await));
                }
                1
            }
            Job::ProcessDup | Job::MacroDup => {
                let envelope = &self.dup_envelopes[self.pick(i, self.dup_envelopes.len())];
                if self.job == Job::ProcessDup {
                    if let Some(processed) = ok(via_process(&self.checker, envelope).await)
                        && !processed.was_replayed()
                    {
                        problem(&ANOMALIES, "process: a duplicate ran the handler");
                    }
                } else {
                    black_box(ok(via_macro(&self.checker, envelope).await));
                }
                1
            }
            Job::PeerNew => {
                uuid_key(&mut self.key, PREFIX, fresh);
                self.peer.new_event(&self.key).await;
                1
            }
            Job::PeerDup => {
                self.peer.duplicate(self.pick(i, self.ref_keys.len())).await;
                1
            }
        }
    }
}

/// Runs `worker` in `tasks` spawned tasks: a lead-in of [`LEAD_IN`], then
/// `duration` measured. Returns (all operations, lead-in included; operations
/// per second in the measured window). The lead-in keeps the spawn, the first
/// operations and whatever the previous measurement left behind out of the
/// rate.
pub(crate) async fn run(worker: &Worker, tasks: usize, duration: Duration) -> (u64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let mut worker = worker.clone();
            worker.task = task as u64;
            let (stop, counter) = (Arc::clone(&stop), Arc::clone(&counter));
            tokio::spawn(async move {
                let (mut done, mut i) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let n = worker.op(i).await;
                    counter.fetch_add(n, Ordering::Relaxed);
                    done += n;
                    i += 1;
                }
                done
            })
        })
        .collect();
    let rate = measure(&counter, &stop, duration).await;
    let mut total = 0;
    for handle in handles {
        total += ok(handle.await).unwrap_or(0);
    }
    (total, rate)
}

/// Waits out the lead-in of [`LEAD_IN`], then `duration`, and sets `stop`;
/// returns how fast `counter` grew per second in the measured window.
pub(crate) async fn measure(counter: &AtomicU64, stop: &AtomicBool, duration: Duration) -> f64 {
    tokio::time::sleep(LEAD_IN).await;
    let (from, start) = (counter.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(duration).await;
    let (to, elapsed) = (counter.load(Ordering::Relaxed), start.elapsed());
    stop.store(true, Ordering::Relaxed);
    (to - from) as f64 / elapsed.as_secs_f64()
}

/// [`Job::RefNewScript`]'s completion: our compare script's two calls,
/// with no comparison.
static UNFENCED_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "redis.call('GET', KEYS[1]) \
         return redis.call('SET', KEYS[1], ARGV[1], 'XX', 'PX', ARGV[2])",
    )
});

/// The reference's claim: `SET key <claim> NX PX ttl GET` (nil: the key was
/// absent and is ours; else the existing record).
fn claim_command(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(CLAIM_VALUE)
        .arg("NX")
        .arg("PX")
        .arg(TTL_MS)
        .arg("GET");
    cmd
}
