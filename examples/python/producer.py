"""Publish idempotency event envelopes from Python.

Two transports, each to a Rust example of this repository:

- JetStream (nats-py), to `examples/jetstream_consumer.rs`: the body is the
  envelope as JSON, and the `Nats-Msg-Id` header is the envelope's effective
  key, so JetStream's own duplicate window drops a re-publish before any
  consumer sees it; the consumer's checker catches every other copy.
- HTTP (httpx), to `POST /webhooks/events` of `examples/webhook.rs`: the body
  is the envelope, the `Idempotency-Key` header its effective key (an RFC 8941
  sf-string, as the IETF draft asks); a failed or unanswered request is
  retried with the same key.

What to send is `schema/event-envelope.schema.json` (JSON Schema draft
2020-12): `event_type` and `payload` are required, plus an `idempotency_key`
or an `event_id` (the key: 1 to 255 characters, no control characters);
`occurred_at` is RFC 3339 with an offset; optional fields are left out rather
than sent as null. A retry must resend the *same* envelope: a fresh key per
send makes every copy a new event.

Run (after `pip install -r examples/python/requirements.txt`):

    nats-server -js &
    cargo run --example jetstream_consumer --features nats,redis -- --forever &
    python examples/python/producer.py nats --url nats://127.0.0.1:4222

    cargo run --example webhook --features http,macros,redis &
    python examples/python/producer.py webhook --url http://127.0.0.1:3000/webhooks/events

Each run sends the same orders (keys `order-<n>`), so a second run sends
duplicates: JetStream answers `"duplicate": true`, the webhook replays the
first receipt. One JSON line per event is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx
import nats

#: The consumer's default `max_key_len`, in characters (code points).
MAX_KEY_LEN = 255

#: Derives stable event ids from business facts (uuid5), so a re-sent event
#: carries the same id.
EVENT_ID_NAMESPACE = uuid.UUID("5f1d7c3e-8a4b-4d6e-9c2f-0b7a1e3d5c9f")


def _is_control(ch: str) -> bool:
    """Rust's `char::is_control`: U+0000-U+001F and U+007F-U+009F."""
    code = ord(ch)
    return code <= 0x1F or 0x7F <= code <= 0x9F


def check_key(key: str) -> str:
    """Raises ValueError unless `key` follows the consumer's key rules."""
    if not isinstance(key, str) or key == "":
        raise ValueError("an idempotency key is a non-empty string")
    if len(key) > MAX_KEY_LEN:
        raise ValueError(f"the key is {len(key)} characters long, more than {MAX_KEY_LEN}")
    if any(_is_control(ch) for ch in key):
        raise ValueError("the key contains a control character")
    return key


def rfc3339(moment: datetime) -> str:
    """`moment` as RFC 3339 with an offset (`Z` for UTC), in milliseconds."""
    if moment.tzinfo is None:
        raise ValueError("occurred_at needs a time zone: use datetime.now(timezone.utc)")
    text = moment.isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


def envelope(
    event_type: str,
    payload: Any,
    *,
    idempotency_key: str | None = None,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    source: str | None = None,
    correlation_id: str | None = None,
) -> dict[str, Any]:
    """An envelope as `schema/event-envelope.schema.json` describes it.

    Without `event_id` a fresh UUID is made, as Rust's `EventEnvelope::new`
    does: build the envelope once per *event* and resend that same dict on
    every retry. Optional fields that are None are left out.
    """
    if not event_type:
        raise ValueError("event_type is required")
    document: dict[str, Any] = {
        "event_id": event_id if event_id is not None else str(uuid.uuid4()),
        "event_type": event_type,
        "occurred_at": rfc3339(occurred_at or datetime.now(timezone.utc)),
        "payload": payload,
    }
    if idempotency_key is not None:
        document["idempotency_key"] = check_key(idempotency_key)
    else:
        check_key(document["event_id"])
    if source is not None:
        document["source"] = source
    if correlation_id is not None:
        document["correlation_id"] = correlation_id
    return document


def effective_key(document: dict[str, Any]) -> str:
    """The key the consumer deduplicates by: `idempotency_key`, else `event_id`."""
    if "idempotency_key" in document:
        return document["idempotency_key"]
    return document["event_id"]


def encode(document: dict[str, Any]) -> bytes:
    """The envelope as compact UTF-8 JSON."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sf_string(key: str) -> str:
    """`key` as an RFC 8941 sf-string (the `Idempotency-Key` header's form).

    An sf-string holds printable ASCII only; a key with other characters
    cannot travel in the header (send it in the envelope instead).
    """
    if not all(" " <= ch <= "~" for ch in key):
        raise ValueError("an Idempotency-Key header holds printable ASCII only")
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def publish_jetstream(
    js: Any, subject: str, document: dict[str, Any], *, max_payload: int
) -> Any:
    """Publishes `document` to JetStream with `Nats-Msg-Id` = its effective key.

    Waits for the stream's ack (a PubAck; `duplicate` is true when the
    stream's duplicate window dropped this copy). Refuses a body larger than
    the server's `max_payload` (1 MB by default) with ValueError.
    """
    body = encode(document)
    if len(body) > max_payload:
        raise ValueError(
            f"the envelope is {len(body)} bytes, more than the server's max_payload "
            f"of {max_payload}: send a reference to the data instead"
        )
    return await js.publish(subject, body, headers={"Nats-Msg-Id": effective_key(document)})


def post_webhook(
    client: httpx.Client, url: str, document: dict[str, Any], *, attempts: int = 5
) -> httpx.Response:
    """POSTs `document` with `Idempotency-Key`, retrying with the same key.

    A request that fails to connect or gets no answer, a 5xx, or a 409
    (another attempt is running) or 429 that carries `Retry-After` is retried
    after `Retry-After` (or a short back-off): the key makes the retry safe.
    Any other answer, and the last one, is returned.
    """
    key = effective_key(document)
    headers = {"Content-Type": "application/json"}
    try:
        headers["Idempotency-Key"] = sf_string(key)
    except ValueError:
        pass  # the envelope's own key is used
    body = encode(document)
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            response = client.post(url, content=body, headers=headers)
        except httpx.TransportError:
            if attempt == attempts:
                raise
        else:
            retry_after = response.headers.get("Retry-After", "")
            retryable = response.status_code >= 500 or (
                response.status_code in (409, 429) and retry_after != ""
            )
            if not retryable or attempt == attempts:
                return response
            if retry_after.isdigit():
                delay = float(retry_after)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def orders(numbers: list[int]) -> list[dict[str, Any]]:
    """The demo events: one `order.placed` per number, in the payload shape
    of `examples/jetstream_consumer.rs` (`{"order": n, "cents": n * 100}`),
    with keys and event ids derived from the order, the same on every run."""
    return [
        envelope(
            "order.placed",
            {"order": n, "cents": n * 100},
            idempotency_key=f"order-{n}",
            event_id=str(uuid.uuid5(EVENT_ID_NAMESPACE, f"order-{n}:placed")),
            source="python-producer",
        )
        for n in numbers
    ]


async def run_nats(url: str, subject: str, numbers: list[int]) -> None:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        for document in orders(numbers):
            ack = await publish_jetstream(js, subject, document, max_payload=client.max_payload)
            print(
                json.dumps(
                    {
                        "key": effective_key(document),
                        "stream": ack.stream,
                        "seq": ack.seq,
                        "duplicate": bool(ack.duplicate),
                    }
                ),
                flush=True,
            )
    finally:
        await client.drain()


def run_webhook(url: str, numbers: list[int]) -> None:
    with httpx.Client(timeout=10.0) as client:
        for document in orders(numbers):
            response = post_webhook(client, url, document)
            print(
                json.dumps(
                    {
                        "key": effective_key(document),
                        "status": response.status_code,
                        "body": response.json(),
                    }
                ),
                flush=True,
            )
            response.raise_for_status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="transport", required=True)
    to_nats = commands.add_parser("nats", help="publish to JetStream")
    to_nats.add_argument("--url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    to_nats.add_argument("--subject", default="orders.placed")
    to_webhook = commands.add_parser("webhook", help="POST to the webhook example")
    to_webhook.add_argument(
        "--url",
        default=os.environ.get("WEBHOOK_URL", "http://127.0.0.1:3000/webhooks/events"),
    )
    for command in (to_nats, to_webhook):
        command.add_argument(
            "--orders",
            default="101,102,103",
            help="comma-separated order numbers (default 101,102,103)",
        )
    args = parser.parse_args(argv)
    numbers = [int(n) for n in args.orders.split(",") if n]
    if args.transport == "nats":
        asyncio.run(run_nats(args.url, args.subject, numbers))
    else:
        run_webhook(args.url, numbers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
