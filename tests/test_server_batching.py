"""`DynamicBatcher` on its own: batches, slots, and what a caller that gives up leaves behind."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest

from server.batching import BatcherClosed, DynamicBatcher


class Payload:
    """Stands for a job's decoded image: something whose lifetime the test can watch."""


class Incomparable:
    """Stands for a job holding tensors: `==` on two of them raises, as on two embeddings' tensors."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("values were compared")

    __hash__ = object.__hash__


def test_results_go_to_their_callers_in_batches_of_at_most_max_size() -> None:
    sizes: list[int] = []

    def process(values: list[int]) -> list[int]:
        sizes.append(len(values))
        return [v * 10 for v in values]

    async def main() -> list[int]:
        batcher = DynamicBatcher(process, max_batch_size=3, max_wait_s=0.05, max_queue=16)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(7)))
        await batcher.close(timeout_s=1)
        return list(results)

    assert asyncio.run(main()) == [i * 10 for i in range(7)]
    assert max(sizes) <= 3 and sum(sizes) == 7 and len(sizes) < 7


async def busy_batcher(max_batch_size: int) -> tuple[DynamicBatcher, asyncio.Future, threading.Event]:
    """A started batcher (queue of 4) whose first batch, one `Payload`, runs in the worker until the event is set;
    and that batch's future."""
    release = threading.Event()

    def process(values: list[object]) -> list[object]:
        release.wait(timeout=10)
        return values

    batcher = DynamicBatcher(process, max_batch_size=max_batch_size, max_wait_s=0.0, max_queue=4)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit(Payload()))
    await asyncio.sleep(0.05)  # the first batch is running in the worker thread
    return batcher, running, release


def test_a_caller_that_gives_up_while_a_batch_runs_leaves_nothing_queued() -> None:
    """Cancelled submits free their slot and their value at once, not when the running batch ends."""

    async def main() -> tuple[int, int, int]:
        batcher, first, release = await busy_batcher(max_batch_size=2)
        watched = []
        for _ in range(20):  # more than max_queue: each frees its slot before the next comes
            payload = Payload()
            watched.append(weakref.ref(payload))
            task = asyncio.ensure_future(batcher.submit(payload))
            del payload
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        gc.collect()
        alive = sum(ref() is not None for ref in watched[:-1])  # the last call's frame is still in a traceback here
        depth = batcher.depth
        release.set()
        await first
        await batcher.close(timeout_s=1)
        return alive, depth, batcher.depth

    alive, depth_while_running, depth_after = asyncio.run(main())
    assert alive == 0, f"{alive} values of cancelled calls are still held while the batch runs"
    assert depth_while_running == 1 and depth_after == 0


def test_a_failure_nobody_waits_for_any_more_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A caller that timed out (504) or left (499) while its batch ran gets no 500 to log its model error: the
    batcher logs it, traceback and all."""
    release = threading.Event()

    def process(values: list[object]) -> list[object]:
        release.wait(timeout=10)
        raise RuntimeError("CUDA out of memory")

    async def main() -> None:
        batcher = DynamicBatcher(process, max_batch_size=1, max_wait_s=0.0, max_queue=4)
        batcher.start()
        task = asyncio.ensure_future(batcher.submit(Payload()))
        await asyncio.sleep(0.05)  # the batch is running in the worker thread
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        release.set()
        await asyncio.sleep(0.2)  # the batch ends (close does not wait for work whose callers are gone)
        await batcher.close(timeout_s=1)

    with caplog.at_level("ERROR", logger="server.batching"):
        asyncio.run(main())
    (record,) = [r for r in caplog.records if r.name == "server.batching"]
    assert record.getMessage() == "model call failed for a request no longer waiting"
    assert "CUDA out of memory" in str(record.exc_info[1])


def test_a_cancelled_caller_is_dropped_by_identity_not_by_comparing_values() -> None:
    async def main() -> tuple[object, int, object]:
        batcher, running, release = await busy_batcher(max_batch_size=1)
        kept_value = Incomparable()
        kept = asyncio.ensure_future(batcher.submit(kept_value))
        dropped = asyncio.ensure_future(batcher.submit(Incomparable()))
        await asyncio.sleep(0)
        dropped.cancel()
        (outcome,) = await asyncio.gather(dropped, return_exceptions=True)
        depth = batcher.depth
        release.set()
        await running
        result = await kept
        await batcher.close(timeout_s=1)
        return outcome, depth, result is kept_value

    outcome, depth, kept_answered = asyncio.run(main())
    assert isinstance(outcome, asyncio.CancelledError), outcome
    assert depth == 2 and kept_answered


def test_a_held_slot_is_answered_while_closing_and_refused_once_closed() -> None:
    """A request takes its slot before decoding its image (`hold`), then submits with `held`: while the batcher
    closes it is still answered (it came in before); once closed (the worker stopped), it is refused at once
    instead of waiting in a queue nobody reads."""

    async def main() -> tuple[int, BaseException]:
        batcher = DynamicBatcher(lambda values: [v * 10 for v in values], max_batch_size=2, max_wait_s=0.0, max_queue=4)
        batcher.start()
        release = batcher.hold()
        closing = asyncio.ensure_future(batcher.close(timeout_s=5))
        await asyncio.sleep(0.05)
        answered = await asyncio.wait_for(batcher.submit(4, held=True), 2)
        release()
        await closing
        with pytest.raises(BatcherClosed) as refused:
            await asyncio.wait_for(batcher.submit(5, held=True), 2)
        return answered, refused.value

    answered, refused = asyncio.run(main())
    assert answered == 40 and isinstance(refused, BatcherClosed)
