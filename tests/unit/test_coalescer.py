import asyncio

import pytest

from recsvc.aio import Coalescer


def test_concurrent_requests_share_a_batch_and_later_ones_wait_for_the_next():
    async def main():
        batches = []
        gate = asyncio.Event()

        async def send(batch):
            batches.append(list(batch))
            await gate.wait()
            return [request * 10 for request in batch]

        coalescer = Coalescer(send)
        first = [asyncio.ensure_future(coalescer.submit(n)) for n in (1, 2, 3)]
        await asyncio.sleep(0)  # the first batch is now in flight
        later = [asyncio.ensure_future(coalescer.submit(n)) for n in (4, 5)]
        await asyncio.sleep(0)
        assert batches == [[1, 2, 3]]
        gate.set()
        assert await asyncio.gather(*first, *later) == [10, 20, 30, 40, 50]
        assert batches == [[1, 2, 3], [4, 5]]

    asyncio.run(main())


def test_batches_are_capped_and_errors_reach_every_caller_of_their_batch():
    async def main():
        batches = []

        async def send(batch):
            batches.append(list(batch))
            if 0 in batch:
                raise ConnectionError("redis went away")
            return batch

        coalescer = Coalescer(send, max_batch=2)
        results = await asyncio.gather(
            *(coalescer.submit(n) for n in (0, 1, 2, 3)), return_exceptions=True
        )
        assert batches == [[0, 1], [2, 3]]
        assert [type(r) for r in results[:2]] == [ConnectionError, ConnectionError]
        assert results[2:] == [2, 3]

    asyncio.run(main())


@pytest.mark.parametrize("steps_before_cancel", [1, 3])  # sender not started / in flight
def test_cancel_fails_every_waiting_caller_and_later_requests_still_go(steps_before_cancel):
    async def main():
        calls = []

        async def send(batch):
            calls.append(batch)
            if len(calls) == 1:
                await asyncio.sleep(10)  # the first batch hangs until cancelled
            return batch

        coalescer = Coalescer(send)
        waiting = asyncio.ensure_future(coalescer.submit(1))
        for _ in range(steps_before_cancel):
            await asyncio.sleep(0)
        coalescer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 5)
        calls.append("cancelled")  # the next send returns at once, whether or not [1] was sent
        assert await asyncio.wait_for(coalescer.submit(2), 5) == 2

    asyncio.run(main())
