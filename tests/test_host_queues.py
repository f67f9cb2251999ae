"""The host stand-in runs queue triggers as the Functions host's Queues extension does: each
message to the function with its metadata, deleted on success, retried with its dequeue count
one higher on failure, moved to the poison queue after maxDequeueCount failures, kept out of
sight while its function runs (the lease renewed), and delivered again when its worker dies."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient, TextBase64EncodePolicy

from local.azurite import Azurite
from local.queues import QueueOptions, timespan
from tests.harness import AppHost, host_env, unique_prefix, wait_until

pytestmark = pytest.mark.e2e
LEASE = 10.0  # seconds a running message stays out of sight (the host stand-in's setting)


class QueueHost:
    """A host whose worker runs tests/queue_function.py on a queue of its own."""

    def __init__(self, azurite: Azurite, log_dir: Path, tmp: Path, lease: float) -> None:
        self.queue_name = unique_prefix("q").replace("t", "q", 1)[:40] + "-jobs"
        self.log_path = tmp / "deliveries.jsonl"
        self.log_path.touch()
        env = host_env(
            azurite.connection_string,
            unique_prefix("queues"),
            AIPROXY_WORKER_PRELOAD="tests.queue_function",
            AzureWebJobsStorage=azurite.connection_string,
            TEST_QUEUE=self.queue_name,
            TEST_QUEUE_LOG=str(self.log_path),
            AIPROXY_HOST_QUEUE_LEASE_SECONDS=str(lease),
        )
        self.queue = QueueClient.from_connection_string(
            azurite.connection_string,
            self.queue_name,
            message_encode_policy=TextBase64EncodePolicy(),
        )
        self.poison = QueueClient.from_connection_string(
            azurite.connection_string, f"{self.queue_name}-poison"
        )
        self.queue.create_queue()  # as the app's sender does
        self.env, self.log_dir = env, log_dir
        self.host = AppHost(log_dir, env, name="queues")

    def send(self, **body: Any) -> str:
        return self.queue.send_message(json.dumps(body)).id

    def deliveries(self, message_id: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines() if line]
        return [d for d in lines if message_id is None or d["id"] == message_id]

    def poisoned(self) -> list[str]:
        try:
            messages = self.poison.peek_messages(max_messages=32)
            return [base64.b64decode(m.content).decode() for m in messages]  # as it was sent
        except ResourceNotFoundError:  # no poison queue yet
            return []

    def waiting(self) -> int:
        return self.queue.get_queue_properties().approximate_message_count

    def stop(self) -> None:
        self.host.stop()
        self.queue.close()
        self.poison.close()


@pytest.fixture(scope="module")
def queues(
    azurite: Azurite, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QueueHost]:
    # The host's lease is 10 minutes; 10 s here, renewed every 5 s: a renewal must reach
    # storage within 5 s of the last. On a busy machine renewals came more than 1 s late
    # (a 2 s lease), and 2 s (a 4 s lease): the message was taken again and delivered twice.
    server = QueueHost(azurite, log_dir, tmp_path_factory.mktemp("queues"), lease=LEASE)
    yield server
    server.stop()


def test_a_message_is_delivered_with_its_metadata_and_deleted_when_done(queues: QueueHost) -> None:
    sent = queues.send(do="ok", tag="first")
    delivered = wait_until(lambda: queues.deliveries(sent), timeout=30)
    assert delivered[0]["body"] == {"do": "ok", "tag": "first"}  # base64 on the queue, text here
    assert delivered[0]["dequeue_count"] == 1 and delivered[0]["pop_receipt"]
    assert delivered[0]["inserted"] and delivered[0]["expires"]
    wait_until(lambda: queues.waiting() == 0, timeout=10)
    assert len(queues.deliveries(sent)) == 1


def test_a_failing_message_is_retried_then_poisoned_after_max_dequeue_count(
    queues: QueueHost,
) -> None:
    most = QueueOptions.read(Path(__file__).resolve().parent.parent).max_dequeue_count
    sent = queues.send(do="fail")
    wait_until(lambda: len(queues.deliveries(sent)) >= most, timeout=60)
    poisoned = wait_until(queues.poisoned, timeout=30)
    assert [d["dequeue_count"] for d in queues.deliveries(sent)] == list(range(1, most + 1))
    assert any("fail" in content for content in poisoned)
    wait_until(lambda: queues.waiting() == 0, timeout=10)  # deleted once the copy is made


def test_the_lease_is_renewed_while_the_function_runs(queues: QueueHost) -> None:
    sent = queues.send(do="sleep", seconds=LEASE + 2)  # past its lease: renewed meanwhile
    wait_until(lambda: queues.deliveries(sent), timeout=30)
    wait_until(lambda: queues.waiting() == 0, timeout=30)
    assert [d["dequeue_count"] for d in queues.deliveries(sent)] == [1]


def test_a_new_batch_is_taken_while_at_most_new_batch_threshold_run(queues: QueueHost) -> None:
    options = QueueOptions.read(Path(__file__).resolve().parent.parent)
    assert options.new_batch_threshold >= options.batch_size  # long-running calls to meter
    count = options.batch_size + 4
    sent = [queues.send(do="sleep", seconds=4) for _ in range(count)]

    def running() -> int:
        [queue] = queues.host.status()["queues"]
        return queue["running"]

    wait_until(lambda: running() == count, timeout=30)  # more than one batch at once
    wait_until(lambda: queues.waiting() == 0, timeout=30)
    assert all(len(queues.deliveries(s)) == 1 for s in sent)


def test_a_message_whose_worker_died_comes_again(queues: QueueHost) -> None:
    restarts = queues.host.status()["worker"]["restarts"]
    sent = queues.send(do="die")
    wait_until(lambda: len(queues.deliveries(sent)) >= 2, timeout=60)
    assert [d["dequeue_count"] for d in queues.deliveries(sent)] == [1, 2]
    assert queues.host.status()["worker"]["restarts"] == restarts + 1
    wait_until(lambda: queues.waiting() == 0, timeout=30)


def test_a_message_whose_host_died_comes_again_once_its_lease_ends(queues: QueueHost) -> None:
    sent = queues.send(do="sleep", seconds=20, first_only=True)  # the next delivery ends at once
    wait_until(lambda: queues.deliveries(sent), timeout=30)
    dead = queues.host
    dead.proc.process.kill()  # the whole instance: nothing releases the message
    dead.proc.process.wait()
    dead.stop()
    queues.host = AppHost(queues.log_dir, queues.env, name="queues-again")
    wait_until(lambda: len(queues.deliveries(sent)) >= 2, timeout=60)  # its lease ended
    assert [d["dequeue_count"] for d in queues.deliveries(sent)] == [1, 2]
    wait_until(lambda: queues.waiting() == 0, timeout=30)  # done the second time: deleted


def test_host_json_time_spans_are_read_as_the_host_reads_them() -> None:
    assert timespan("00:00:02", 60) == 2.0
    assert timespan("1.02:00:00.5", 0) == 93600.5
    assert timespan(None, 60) == 60
    with pytest.raises(ValueError):
        timespan("2 minutes", 0)
    options = QueueOptions.of({"extensions": {"queues": {"batchSize": 4, "maxDequeueCount": 2}}})
    assert (options.batch_size, options.new_batch_threshold, options.max_dequeue_count) == (4, 2, 2)
    assert QueueOptions.of({}) == QueueOptions()
