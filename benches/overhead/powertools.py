"""AWS Powertools for Python's idempotency on Redis, one event at a time.

The benchmark's Powertools rows: `benches/overhead/powertools.rs` runs this
with the venv's Python (`scripts/pyenv.sh` installs the package) against the
benchmark's own redis-server, after the Redis phases.

    powertools.py <port> <seconds per phase> <result text>

The handler is `@idempotent_function` over `CachePersistenceLayer` (Redis), keyed
by the event's `order_id` (Powertools' documented flow), returning the result
text. Phases: new events (a fresh `order_id` each), then duplicates (the
first 1,000 ids again, round robin). Prints one JSON object: for each phase,
events per second, this process's CPU per event and redis-server's main
thread's, in microseconds; and this process's CPU seconds in all.
"""

import json
import sys
import time
import warnings

import redis
from aws_lambda_powertools.utilities.idempotency import (
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.persistence.cache import (
    CachePersistenceLayer,
)

DUPLICATE_KEYS = 1000
WARMUP_SECONDS = 0.3


def main() -> None:
    # Outside Lambda there is no context to read the remaining time from;
    # Powertools warns about that on every call.
    warnings.filterwarnings("ignore", message="Couldn't determine the remaining time")
    # `CachePersistenceLayer` (the name to use) still derives from the
    # deprecated `RedisCachePersistenceLayer` in 3.x, and warns.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    port, seconds, result = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    admin = redis.Redis(host="127.0.0.1", port=port)
    persistence = CachePersistenceLayer(host="127.0.0.1", port=port, ssl=False)
    config = IdempotencyConfig(event_key_jmespath="order_id", expires_after_seconds=86400)

    @idempotent_function(
        data_keyword_argument="order", config=config, persistence_store=persistence
    )
    def handle(order: dict) -> str:
        return result

    def server_cpu() -> float:
        info = admin.info("cpu")
        return info["used_cpu_user_main_thread"] + info["used_cpu_sys_main_thread"]

    next_id = 10**12  # clear of every id the rest of the benchmark uses

    def new_event() -> None:
        nonlocal next_id
        next_id += 1
        handle(order={"order_id": next_id, "amount_cents": 1200})

    seeded = [next_id + 1 + i for i in range(DUPLICATE_KEYS)]
    turn = 0

    def duplicate() -> None:
        nonlocal turn
        turn = (turn + 1) % DUPLICATE_KEYS
        handle(order={"order_id": seeded[turn], "amount_cents": 1200})

    def measure(op) -> dict:
        deadline = time.monotonic() + WARMUP_SECONDS
        while time.monotonic() < deadline:
            op()
        events = 0
        cpu0, server0, t0 = time.process_time(), server_cpu(), time.monotonic()
        deadline = t0 + seconds
        while time.monotonic() < deadline:
            op()
            events += 1
        elapsed = time.monotonic() - t0
        cpu, server = time.process_time() - cpu0, server_cpu() - server0
        return {
            "per_second": events / elapsed,
            "client_cpu_us": cpu * 1e6 / events,
            "server_cpu_us": server * 1e6 / events,
            "events": events,
        }

    # The duplicates' keys are completed by the first new events.
    for order_id in seeded:
        handle(order={"order_id": order_id, "amount_cents": 1200})
    next_id = seeded[-1]
    new, dup = measure(new_event), measure(duplicate)
    print(json.dumps({"new": new, "duplicate": dup, "process_cpu_s": time.process_time()}))


if __name__ == "__main__":
    main()
