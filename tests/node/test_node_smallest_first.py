"""The gate prompts pass to reach a tokenizer thread: at most N at once, the smallest waiting first."""

from __future__ import annotations

import asyncio

import pytest

from node.smallest_first import SmallestFirst


async def _hold(gate: SmallestFirst, size: int, order: list[int], release: asyncio.Event) -> None:
    async with gate.slot(size):
        order.append(size)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_waiters_go_smallest_first_and_ties_in_arrival_order():
    gate, order, release = SmallestFirst(1), [], asyncio.Event()
    first = asyncio.create_task(_hold(gate, 500, order, release))
    await _settle()
    waiters = []
    for size in (331_776, 12, 4_000, 12, 90):
        waiters.append(asyncio.create_task(_hold(gate, size, order, release)))
        await _settle()
    assert order == [500]          # one slot: everyone else waits
    release.set()
    await asyncio.gather(first, *waiters)
    assert order == [500, 12, 12, 90, 4_000, 331_776]


@pytest.mark.asyncio
async def test_at_most_n_hold_the_gate_at_once():
    gate, order, release = SmallestFirst(2), [], asyncio.Event()
    tasks = [asyncio.create_task(_hold(gate, size, order, release)) for size in (7, 5, 3, 1)]
    await _settle()
    assert order == [7, 5]
    release.set()
    await asyncio.gather(*tasks)
    assert sorted(order[2:]) == [1, 3]


@pytest.mark.asyncio
async def test_a_waiter_that_leaves_gives_up_its_place_and_a_granted_one_passes_the_slot_on():
    gate, order, release = SmallestFirst(1), [], asyncio.Event()
    tasks: dict[int, asyncio.Task] = {}

    async def holder() -> None:
        async with gate.slot(100):
            order.append(100)
            await release.wait()
        # The slot has just gone to size 2, which has not run yet: its client leaves now.
        tasks[2].cancel()

    first = asyncio.create_task(holder())
    await _settle()
    for size in (1, 2, 3):
        tasks[size] = asyncio.create_task(_hold(gate, size, order, release))
    await _settle()
    tasks[1].cancel()              # a client gone while waiting
    await asyncio.gather(tasks[1], return_exceptions=True)
    release.set()
    await first
    await asyncio.wait_for(tasks[3], timeout=5)
    assert tasks[2].cancelled()
    assert order == [100, 3]
    async with gate.slot(0):       # the gate is free again: no slot leaked
        pass
