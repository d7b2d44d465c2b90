"""Single-flight: shared work survives its leader, and every waiter gets the same outcome."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from asgi_delegation._singleflight import SingleFlight


async def test_waiters_share_one_execution() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0
    release = anyio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    results: list[int] = []

    async def caller() -> None:
        results.append(await flight.run("k", work))

    async with anyio.create_task_group() as tasks:
        for _ in range(20):
            tasks.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert results == [42] * 20
    assert calls == 1
    assert not flight.in_flight("k")


async def test_leader_cancellation_does_not_cancel_the_shared_work() -> None:
    flight: SingleFlight[str] = SingleFlight()
    release = anyio.Event()
    calls = 0

    async def work() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "done"

    results: list[str] = []
    leader_scope = anyio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await flight.run("k", work)
            await (
                anyio.lowlevel.checkpoint()
            )  # the deferred cancellation lands here, after the work
            results.append("leader went on")

    async def follower() -> None:
        results.append(await flight.run("k", work))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(leader)
        await anyio.wait_all_tasks_blocked()
        for _ in range(5):
            tasks.start_soon(follower)
        await anyio.wait_all_tasks_blocked()
        leader_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert results == []  # the work goes on, shielded from the leader's cancellation
        assert flight.in_flight("k")
        release.set()
    assert results == ["done"] * 5
    assert calls == 1
    assert leader_scope.cancelled_caught


async def test_every_waiter_gets_the_same_error() -> None:
    flight: SingleFlight[int] = SingleFlight()
    release = anyio.Event()

    async def work() -> int:
        await release.wait()
        raise LookupError("boom")

    errors: list[BaseException] = []

    async def caller() -> None:
        try:
            await flight.run("k", work)
        except LookupError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tasks:
        for _ in range(4):
            tasks.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert len(errors) == 4
    assert all(e is errors[0] for e in errors)
    with pytest.raises(LookupError):  # and the key is free again
        await flight.run("k", work)
