"""The shared micro-batcher: who shares a batch, who gets which row, what happens on errors, the metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from services.common.batching import BatchMetrics, ImageBatcher, MicroBatcher


class Recorder:
    """A batched function that records its batches; ``hold`` keeps the first batch running until released,
    so that later items queue behind it deterministically."""

    def __init__(self, *, hold: bool = False, fn: Callable[[int], object] = lambda x: x * 10):
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.fn = fn
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, items: list[int]) -> list[object]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(10)
        return [self.fn(item) for item in items]


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"service": "svc", **labels})


async def test_concurrent_items_share_batches_up_to_max_batch_and_each_caller_gets_its_row() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    assert [len(b) for b in run.batches] == [4, 4, 2]
    assert [i for b in run.batches for i in b] == list(range(10))  # arrival order is kept
    assert run.threads == {"batcher-default"}  # run in the batcher's worker, not the event loop


async def test_items_queued_while_a_batch_runs_form_the_next_batch() -> None:
    run = Recorder(hold=True)
    batcher = MicroBatcher(run, max_batch=16, max_wait_s=0.0)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.to_thread(run.started.wait, 10)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    assert batcher.queue_depth == 5
    run.release.set()
    assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
    assert run.batches == [[0], [1, 2, 3, 4, 5]]


def test_blocking_callers_in_threads_are_batched_together() -> None:
    run = Recorder(hold=True)
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.0)
    results: dict[int, list[object]] = {}

    def call(i: int) -> None:
        results[i] = batcher.submit_blocking([i, 100 + i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    threads[0].start()
    run.started.wait(10)
    for t in threads[1:]:
        t.start()
    wait_until(lambda: batcher.queue_depth == 6)
    run.release.set()
    for t in threads:
        t.join(10)
    assert results == {i: [i * 10, (100 + i) * 10] for i in range(4)}
    assert [len(b) for b in run.batches] == [2, 6]


def test_max_batch_one_runs_each_item_alone_in_the_callers_thread() -> None:
    run = Recorder()
    registry = CollectorRegistry()
    batcher = MicroBatcher(run, max_batch=1, metrics=BatchMetrics.on(registry, service="svc"))
    assert not batcher.enabled
    assert batcher.submit_blocking([1, 2, 3]) == [10, 20, 30]
    assert run.batches == [[1], [2], [3]]
    assert run.threads == {threading.current_thread().name}
    assert batcher._worker is None  # no queue, no worker thread
    assert sample(registry, "mmedrag_batch_size_count", batcher="default") == 3
    assert sample(registry, "mmedrag_batch_size_sum", batcher="default") == 3


async def test_max_batch_one_from_async_code_runs_in_worker_threads() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=1)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 10, 20]
    assert sorted(run.batches) == [[0], [1], [2]]
    assert threading.current_thread().name not in run.threads


async def test_items_with_different_keys_never_share_a_batch() -> None:
    run = Recorder(hold=True)
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.0, key=lambda i: i % 2)
    first = asyncio.ensure_future(batcher.submit(100))
    await asyncio.to_thread(run.started.wait, 10)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
    await asyncio.sleep(0)
    run.release.set()
    assert await asyncio.gather(first, *rest) == [1000, 10, 20, 30, 40, 50, 60]
    # the oldest waiting item's key goes first; the others keep their order for the next batch
    assert run.batches == [[100], [1, 3, 5], [2, 4, 6]]


async def test_a_key_equal_to_nothing_else_runs_its_item_alone() -> None:
    run = Recorder()
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.02, key=lambda i: object() if i < 0 else "shared")
    await asyncio.gather(*(batcher.submit(i) for i in (-1, 1, -2, 2)))
    assert sorted(run.batches) == [[-2], [-1], [1, 2]]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_worker_lives_on() -> None:
    def broken(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("boom")
        return items

    batcher = MicroBatcher(broken, max_batch=8, max_wait_s=0.02)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, 13, 2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results)
    assert await batcher.submit(5) == 5


def test_a_wrong_number_of_results_is_an_error_not_a_misrouted_row() -> None:
    batcher = MicroBatcher(lambda items: items[:-1], max_batch=4, max_wait_s=0.02)
    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        batcher.submit_blocking([1, 2])


async def test_a_cancelled_caller_is_dropped_from_its_batch() -> None:
    run = Recorder(hold=True)
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.0)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.to_thread(run.started.wait, 10)
    gone = asyncio.ensure_future(batcher.submit(1))
    kept = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    for _ in range(3):  # let the cancellation reach the queued item
        await asyncio.sleep(0)
    run.release.set()
    assert await asyncio.gather(first, kept) == [0, 20]
    assert run.batches == [[0], [2]]


def test_metrics_record_sizes_waits_and_queue_depth_on_the_apps_registry() -> None:
    registry = CollectorRegistry()
    metrics = BatchMetrics.on(registry, service="svc")
    assert BatchMetrics.on(registry, service="svc") is metrics  # a second attach registers nothing twice
    run = Recorder(hold=True)
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.0, name="radiology", metrics=metrics)
    done: list[list[object]] = []
    first = threading.Thread(target=lambda: done.append(batcher.submit_blocking([1])))
    first.start()
    run.started.wait(10)
    second = threading.Thread(target=lambda: done.append(batcher.submit_blocking([2, 3, 4])))
    second.start()
    wait_until(lambda: batcher.queue_depth == 3)
    assert sample(registry, "mmedrag_batch_queue_depth", batcher="radiology") == 3
    run.release.set()
    first.join(10)
    second.join(10)
    assert sample(registry, "mmedrag_batch_queue_depth", batcher="radiology") == 0
    assert sample(registry, "mmedrag_batch_size_count", batcher="radiology") == 2
    assert sample(registry, "mmedrag_batch_size_sum", batcher="radiology") == 4
    assert sample(registry, "mmedrag_batch_size_bucket", batcher="radiology", le="1.0") == 1
    assert sample(registry, "mmedrag_batch_wait_seconds_count", batcher="radiology") == 4
    assert sample(registry, "mmedrag_batch_wait_seconds_sum", batcher="radiology") > 0  # 2-4 queued


def test_each_registry_gets_its_own_metrics() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    assert BatchMetrics.on(first, service="a") is not BatchMetrics.on(second, service="b")
    batcher = MicroBatcher(lambda items: items, max_batch=1, name="x")
    batcher.attach_metrics(BatchMetrics.on(first, service="a"))
    batcher.attach_metrics(BatchMetrics.on(second, service="b"))  # the newest app wins
    batcher.submit_blocking([1])
    assert first.get_sample_value("mmedrag_batch_size_count", {"service": "a", "batcher": "x"}) is None
    assert second.get_sample_value("mmedrag_batch_size_count", {"service": "b", "batcher": "x"}) == 1


def test_close_runs_what_is_queued_then_refuses_new_items() -> None:
    run = Recorder(hold=True)
    batcher = MicroBatcher(run, max_batch=2, max_wait_s=0.0)
    results: list[list[object]] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(batcher.submit_blocking([i]))) for i in range(3)
    ]
    threads[0].start()
    run.started.wait(10)
    for t in threads[1:]:
        t.start()
    wait_until(lambda: batcher.queue_depth == 2)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    run.release.set()
    for t in [*threads, closer]:
        t.join(10)
    assert sorted(results) == [[0], [10], [20]]
    assert not batcher._worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit_blocking([4])


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"max_batch": 0}, "max_batch"), ({"max_wait_s": -1}, "max_wait_s")]
)
def test_bad_limits_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MicroBatcher(lambda items: items, **kwargs)


async def test_image_batcher_encodes_one_row_per_image() -> None:
    def encode(images: Sequence[Image.Image]) -> list[tuple[int, int]]:
        return [image.size for image in images]

    batcher = ImageBatcher(encode, max_batch=4, max_wait_s=0.02, name="radiology")
    sizes = [(8, 8), (9, 10), (16, 12)]
    assert await asyncio.gather(*(batcher.encode(Image.new("RGB", s)) for s in sizes)) == sizes
