"""``NextBatch``: callers that arrive while a batch is on its way share the next one, and each gets its
own outcome, whatever happens to the batch."""

from __future__ import annotations

import asyncio

import pytest

from keel.platform.adapters.batching import BatchAbandoned, NextBatch


async def test_callers_arriving_during_a_batch_share_the_next_one_and_get_their_own_outcomes() -> None:
    sent: list[list[int]] = []
    release = asyncio.Event()

    async def send(items: list[int]) -> list[int | BaseException]:
        sent.append(items)
        if len(sent) == 1:
            await release.wait()  # the first batch is on its way while the others arrive
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    batches: NextBatch[int, int] = NextBatch(send)
    first = asyncio.create_task(batches.submit(1))
    await asyncio.sleep(0)
    others = [asyncio.create_task(batches.submit(i)) for i in (2, -3, 4)]
    await asyncio.sleep(0)
    release.set()
    assert await first == 10
    outcomes = await asyncio.gather(*others, return_exceptions=True)
    assert outcomes[0] == 20
    assert isinstance(outcomes[1], ValueError)
    assert outcomes[2] == 40
    assert sent == [[1], [2, -3, 4]]


async def test_an_error_of_the_whole_batch_reaches_every_caller_and_the_next_batch_still_runs() -> None:
    async def send(items: list[int]) -> list[int | BaseException]:
        if 0 in items:
            raise ConnectionError("down")
        return list(items)

    batches: NextBatch[int, int] = NextBatch(send)
    with pytest.raises(ConnectionError, match="down"):
        await batches.submit(0)
    assert await batches.submit(5) == 5


async def test_a_cancelled_batch_abandons_its_callers_instead_of_leaving_them_waiting() -> None:
    started = asyncio.Event()

    async def send(items: list[int]) -> list[int | BaseException]:
        started.set()
        await asyncio.sleep(3600)
        return list(items)

    batches: NextBatch[int, int] = NextBatch(send)
    waiting = asyncio.create_task(batches.submit(1))
    await started.wait()
    later = asyncio.create_task(batches.submit(2))
    await asyncio.sleep(0)
    runner = batches._runner
    assert runner is not None
    runner.cancel()
    for caller in (waiting, later):
        with pytest.raises(BatchAbandoned):
            await asyncio.wait_for(caller, timeout=5)


def test_a_new_event_loop_gets_its_own_runner() -> None:
    async def send(items: list[int]) -> list[int | BaseException]:
        return [i + 1 for i in items]

    batches: NextBatch[int, int] = NextBatch(send)
    assert asyncio.run(batches.submit(1)) == 2
    assert asyncio.run(batches.submit(2)) == 3  # the first loop is closed: a runner on the new one
