"""The Python producer (examples/python/producer.py) against the real Rust
examples: a nats-server started here on a free port and the example binaries
built by `cargo build --workspace --examples --all-features`.

Run: `bash scripts/pyenv.sh && target/pyenv/bin/python -m pytest tests/python`
(scripts/check.sh does both, after building the examples).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import nats
import pytest

from envelope_schema import errors, validator

ROOT = Path(__file__).resolve().parents[2]
PRODUCER = ROOT / "examples" / "python" / "producer.py"
sys.path.insert(0, str(PRODUCER.parent))

import producer  # noqa: E402

TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
EXAMPLES = TARGET / "debug" / "examples"
DEADLINE = 30.0


def example(name: str) -> Path:
    path = EXAMPLES / name
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: build the examples first with "
            "`cargo build --workspace --examples --all-features`"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Output:
    """The lines a process writes (stdout and stderr merged), read by a
    thread, with a way to wait for a line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        """The first line matching `pattern`, waiting for it to be written."""
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                remaining = end - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._thread.is_alive()):
                    pytest.fail(f"no line matching {pattern!r} in:\n{self.text()}")
                self._changed.wait(remaining)

    def finish(self) -> str:
        self._thread.join(timeout=DEADLINE)
        return self.text()

    def text(self) -> str:
        return "\n".join(self.lines)


def start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], Output]:
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return process, Output(process)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=DEADLINE)


@pytest.fixture
def nats_url():
    """A `nats-server -js` on a free loopback port with a temporary store."""
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(binary).is_file():
        pytest.fail("nats-server is not installed (scripts/check.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="idem-pytest-nats-") as store:
        for _ in range(3):
            port = free_port()
            process, output = start(
                [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store]
            )
            try:
                output.wait_for(r"Server is ready|address already in use")
            except BaseException:
                stop(process)
                raise
            if "Server is ready" in output.text():
                try:
                    yield f"nats://127.0.0.1:{port}"
                finally:
                    stop(process)
                return
            stop(process)
        pytest.fail(f"nats-server did not start:\n{output.text()}")


def run_producer(*args: str) -> list[dict]:
    """Runs producer.py as a program; its JSON lines."""
    done = subprocess.run(
        [sys.executable, str(PRODUCER), *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 0, f"producer {args} failed:\n{done.stdout}\n{done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines()]


async def until(condition: Callable[[], object], what: str) -> object:
    """Polls an async `condition` until it returns something truthy."""
    end = time.monotonic() + DEADLINE
    while True:
        try:
            value = await condition()
        except Exception as error:  # noqa: BLE001: not there yet
            value, last = None, error
        else:
            last = None
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what} (last error: {last!r})")
        await asyncio.sleep(0.05)


ORDERS = [101, 102, 103]


def test_producer_envelopes_follow_the_schema():
    v = validator()
    for document in producer.orders(ORDERS):
        assert errors(v, document) == [], document
    minimal = producer.envelope("t", None)
    assert errors(v, minimal) == []
    assert producer.effective_key(minimal) == minimal["event_id"]
    offset = producer.envelope(
        "t",
        {},
        idempotency_key="é" * 255,
        occurred_at=producer.datetime(2026, 1, 1, 9, tzinfo=producer.timezone.utc),
        correlation_id="c",
    )
    assert offset["occurred_at"] == "2026-01-01T09:00:00.000Z"
    assert errors(v, offset) == []


@pytest.mark.parametrize("key", ["", "k" * 256, "order-1\n", "evt\x851"])
def test_producer_refuses_keys_the_consumer_would_reject(key):
    with pytest.raises(ValueError):
        producer.envelope("t", {}, idempotency_key=key)
    with pytest.raises(ValueError):
        producer.envelope("t", {}, event_id=key)
    # The schema agrees.
    document = {"event_type": "t", "payload": {}, "idempotency_key": key}
    assert errors(validator(), document) != []


def test_idempotency_key_header_is_an_sf_string():
    assert producer.sf_string('a"b\\c') == '"a\\"b\\\\c"'
    with pytest.raises(ValueError):
        producer.sf_string("é")


def test_publish_refuses_an_envelope_over_max_payload(nats_url):
    async def scenario():
        client = await nats.connect(nats_url)
        try:
            # nats-server's default max_payload: 1 MB.
            assert client.max_payload == 1024 * 1024
            big = producer.envelope("t", "x" * client.max_payload, idempotency_key="big")
            with pytest.raises(ValueError, match="max_payload"):
                await producer.publish_jetstream(
                    client.jetstream(), "orders.big", big, max_payload=client.max_payload
                )
        finally:
            await client.close()

    asyncio.run(scenario())


def charged(text: str, order: int) -> int:
    return len(re.findall(rf"charging order {order}\b", text))


def test_jetstream_consumer_runs_each_python_event_once(nats_url):
    consumer, output = start(
        [str(example("jetstream_consumer")), "--forever"],
        env={"NATS_URL": nats_url, "RUST_LOG": "info"},
    )
    try:

        async def prepare():
            client = await nats.connect(nats_url)
            try:
                js = client.jetstream()
                # The example creates the stream and its consumer at start.
                await until(lambda: js.consumer_info("ORDERS", "billing"), "the consumer")
            finally:
                await client.close()

        asyncio.run(prepare())

        first = run_producer("nats", "--url", nats_url, "--orders", "101,102,103")
        second = run_producer("nats", "--url", nats_url, "--orders", "101,102,103")
        assert [line["key"] for line in first] == [f"order-{n}" for n in ORDERS]
        assert [line["duplicate"] for line in first] == [False] * 3
        # Nats-Msg-Id = the key: JetStream's duplicate window drops the re-publish.
        assert [line["duplicate"] for line in second] == [True] * 3
        assert [line["seq"] for line in second] == [line["seq"] for line in first]

        async def copies_and_drain():
            client = await nats.connect(nats_url)
            try:
                js = client.jetstream()
                # A copy outside JetStream's dedup (another message id, as a
                # producer that restarted after the window would send): the
                # consumer's checker must drop it.
                document = producer.orders([101])[0]
                ack = await js.publish(
                    "orders.placed",
                    producer.encode(document),
                    headers={"Nats-Msg-Id": "another-id-for-order-101"},
                )
                assert not ack.duplicate

                async def drained():
                    info = await js.consumer_info("ORDERS", "billing")
                    return (
                        info.ack_floor.stream_seq >= ack.seq
                        and info.num_ack_pending == 0
                        and info.num_pending == 0
                    )

                await until(drained, "the consumer to ack every message")
            finally:
                await client.close()

        asyncio.run(copies_and_drain())
        consumer.send_signal(signal.SIGINT)
        assert consumer.wait(timeout=DEADLINE) == 0, output.finish()
        text = output.finish()
        for order in ORDERS:
            assert charged(text, order) == 1, f"order {order}:\n{text}"
    finally:
        stop(consumer)


def test_webhook_runs_each_python_event_once():
    server, output = start(
        [str(example("webhook"))], env={"PORT": "0", "RUST_LOG": "info"}
    )
    try:
        base = output.wait_for(r"listening on (http://\S+)").group(1)
        url = f"{base}/webhooks/events"
        first = run_producer("webhook", "--url", url, "--orders", "101,102,103")
        second = run_producer("webhook", "--url", url, "--orders", "101,102,103")
        assert [line["status"] for line in first] == [200] * 3, first
        assert sorted(line["body"]["processed"] for line in first) == [1, 2, 3]
        # The first answer back, byte for byte, without running again.
        assert [line["body"] for line in second] == [line["body"] for line in first]
        assert [line["status"] for line in second] == [200] * 3

        # An envelope with neither key nor event id is refused, never run.
        keyless = {"event_type": "order.placed", "payload": {"order": 9, "cents": 900}}
        for _ in range(2):
            response = httpx.post(url, json=keyless, timeout=10)
            assert response.status_code == 400, response.text

        stats = httpx.get(f"{base}/stats", timeout=10).json()
        assert stats["webhook_events_executed"] == 3, stats
    finally:
        stop(server)
