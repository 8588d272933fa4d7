"""IoWorkers: jobs on plain threads, completions delivered on the event loop in bursts.

How this works: each test runs a coroutine on a fresh event loop (uvloop when installed, except
where a test must count the loop's thread-safe wakeups, which needs asyncio's own loop class).
Jobs record which thread ran them and when; ``done`` callbacks record which thread delivered
them.  Timing assertions use generous bounds (a ratio of the serial time), never tight ones.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from volkeeper.io.workers import IoWorkers

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` on a fresh loop (uvloop if importable), with a deadline."""
    factory = uvloop.new_event_loop if uvloop is not None else asyncio.new_event_loop
    loop = factory()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), timeout=20))
    finally:
        loop.close()


@pytest.fixture
def workers() -> Iterator[Callable[[int], IoWorkers]]:
    """``workers(n)`` makes an IoWorkers pool that is shut down after the test."""
    pools: list[IoWorkers] = []

    def make(threads: int) -> IoWorkers:
        pool = IoWorkers(threads, f"test-{len(pools)}")
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


class Collector:
    """``done`` callbacks that record (result, error, thread) and wake a waiter at ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.results: list[tuple[Any, BaseException | None, int]] = []
        self.all_done = asyncio.get_running_loop().create_future()

    def done(self, result: Any, error: BaseException | None) -> None:
        self.results.append((result, error, threading.get_ident()))
        if len(self.results) == self.n and not self.all_done.done():
            self.all_done.set_result(None)

    async def wait(self, timeout: float = 10) -> list[tuple[Any, BaseException | None, int]]:
        await asyncio.wait_for(asyncio.shield(self.all_done), timeout)
        return self.results


def test_completions_arrive_on_the_loop_thread_and_jobs_run_elsewhere(workers: Any) -> None:
    async def main() -> None:
        pool = workers(4)
        loop_thread = threading.get_ident()
        collector = Collector(50)
        for i in range(50):
            pool.submit(lambda i: (i, threading.get_ident()), (i,), collector.done)
        results = await collector.wait()
        assert sorted(result[0] for result, _, _ in results) == list(range(50))
        assert all(error is None for _, error, _ in results)
        assert {thread for _, _, thread in results} == {loop_thread}
        assert loop_thread not in {result[1] for result, _, _ in results}

    run(main)


def test_results_and_exceptions_reach_done(workers: Any) -> None:
    class Boom(Exception):
        pass

    def job(x: int) -> int:
        if x % 3 == 0:
            raise Boom(f"job {x}")
        return x * 10

    async def main() -> None:
        pool = workers(2)
        collector = Collector(30)
        for x in range(30):
            pool.submit(job, (x,), lambda r, e, x=x: collector.done((x, r), e))
        results = await collector.wait()
        for (x, result), error, _ in results:
            if x % 3 == 0:
                assert result is None
                assert isinstance(error, Boom) and str(error) == f"job {x}"
            else:
                assert (result, error) == (x * 10, None)

    run(main)


def test_a_worker_survives_a_job_that_raises(workers: Any) -> None:
    def explode() -> None:
        raise RuntimeError("disk on fire")

    async def main() -> None:
        pool = workers(1)  # one thread: if it died, the next job would never run
        collector = Collector(3)
        pool.submit(explode, (), collector.done)
        pool.submit(threading.current_thread, (), collector.done)
        pool.submit(lambda: 42, (), collector.done)
        (r0, e0, _), (r1, e1, _), (r2, e2, _) = await collector.wait()
        assert r0 is None and isinstance(e0, RuntimeError)
        assert e1 is None and r1.is_alive() and r1.name.startswith("test-")
        assert (r2, e2) == (42, None)

    run(main)


def test_one_thread_runs_jobs_strictly_in_submission_order(workers: Any) -> None:
    ran: list[int] = []
    threads: set[int] = set()
    rng = random.Random(7)
    delays = [rng.choice((0, 0, 0.0001, 0.0005, 0.001)) for _ in range(300)]

    def job(i: int) -> int:
        time.sleep(delays[i])
        ran.append(i)
        threads.add(threading.get_ident())
        return i

    async def main() -> None:
        pool = workers(1)
        collector = Collector(len(delays))
        for i in range(len(delays)):
            pool.submit(job, (i,), collector.done)
            if i % 50 == 0:
                await asyncio.sleep(0)  # let completions interleave with submissions
        results = await collector.wait()
        assert ran == list(range(len(delays)))
        assert [result for result, _, _ in results] == list(range(len(delays)))
        assert len(threads) == 1

    run(main)


def test_many_threads_run_jobs_concurrently(workers: Any) -> None:
    jobs, sleep = 16, 0.05
    lock = threading.Lock()
    running = peak = 0

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(sleep)
        with lock:
            running -= 1

    async def main() -> None:
        pool = workers(8)
        collector = Collector(jobs)
        started = time.perf_counter()
        for _ in range(jobs):
            pool.submit(job, (), collector.done)
        await collector.wait()
        elapsed = time.perf_counter() - started
        # serial: 0.8 s; 8 threads: ~0.1 s.  Half the serial time is a generous bound.
        assert elapsed < jobs * sleep / 2, f"{jobs} x {sleep}s jobs took {elapsed:.3f}s"
        assert peak >= 4, f"at most {peak} jobs ever ran at once on 8 threads"

    run(main)


class CountingLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, counting the cross-thread wakeups (``call_soon_threadsafe``)."""

    wakeups = 0

    def call_soon_threadsafe(  # type: ignore[override]
        self, callback: Any, *args: Any, context: Any = None
    ) -> Any:
        self.wakeups += 1
        return super().call_soon_threadsafe(callback, *args, context=context)


@pytest.mark.parametrize("threads", [1, 8])
def test_a_burst_of_completions_costs_far_fewer_wakeups_than_jobs(
    workers: Any, threads: int
) -> None:
    """1000 jobs finish while the loop is busy: they must arrive in a handful of drains.

    The loop thread is kept busy (a blocking sleep) while the workers finish every job, so
    an implementation that woke the loop once per completion would make 1000 wakeups here;
    one that coalesces makes one (a few if workers race on the "drain pending" flag).
    """
    jobs = 1000
    loop = CountingLoop()
    all_finished = threading.Event()
    finished = 0
    finished_lock = threading.Lock()

    def job(i: int) -> int:
        nonlocal finished
        with finished_lock:
            finished += 1
            if finished == jobs:
                all_finished.set()
        return i

    async def main() -> None:
        pool = workers(threads)
        collector = Collector(jobs)
        before = loop.wakeups
        for i in range(jobs):
            pool.submit(job, (i,), collector.done)
        assert all_finished.wait(10), "the workers did not finish the burst"  # loop blocked
        time.sleep(0.05)  # the last completions are appended after ``finished`` counts them
        results = await collector.wait()
        wakeups = loop.wakeups - before
        assert sorted(r for r, _, _ in results) == list(range(jobs))
        if threads == 1:
            assert [r for r, _, _ in results] == list(range(jobs))
        assert 1 <= wakeups <= 20, f"{jobs} completions woke the loop {wakeups} times"

    try:
        loop.run_until_complete(asyncio.wait_for(main(), timeout=20))
    finally:
        loop.close()


def test_completions_keep_flowing_across_many_bursts(workers: Any) -> None:
    """No completion is ever stranded between a drain and the next one (the flag race)."""

    async def main() -> None:
        pool = workers(4)
        for burst in range(200):
            collector = Collector(burst % 7 + 1)
            for i in range(collector.n):
                pool.submit(lambda i: i, (i,), collector.done)
            results = await collector.wait(timeout=5)
            assert sorted(r for r, _, _ in results) == list(range(collector.n))

    run(main)


def test_shutdown_finishes_queued_jobs(workers: Any) -> None:
    ran: list[int] = []

    def job(i: int) -> None:
        time.sleep(0.005)
        ran.append(i)

    async def main() -> None:
        pool = IoWorkers(2, "shutdown-test")
        for i in range(40):
            pool.submit(job, (i,), lambda r, e: None)
        pool.shutdown()  # blocks the loop on purpose: nothing else needs it
        assert sorted(ran) == list(range(40))
        alive = [t.name for t in threading.enumerate() if t.name.startswith("shutdown-test-")]
        assert alive == []

    run(main)


def test_shutdown_finishes_queued_jobs_even_after_the_loop_has_closed() -> None:
    """``shutdown`` promises to finish queued jobs; a closed loop only drops *completions*.

    (VolumeService.close relies on this: "let queued mutations finish, flush, close".)
    """
    ran: list[int] = []
    pool = IoWorkers(1, "closed-loop-test")

    def job(i: int) -> None:
        time.sleep(0.01)
        ran.append(i)

    async def main() -> None:
        for i in range(10):
            pool.submit(job, (i,), lambda r, e: None)

    run(main)  # returns (and closes its loop) while the jobs are still queued
    pool.shutdown()
    assert ran == list(range(10)), f"jobs run before shutdown returned: {ran}"
