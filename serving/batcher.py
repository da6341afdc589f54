"""Cross-task micro-batching in front of the engine: concurrent requests, for any tasks, run as
one mixed batch (:meth:`mutask.serving.engine.Engine.run`) in one worker thread, so each task's
graph runs once over the rows of every request for it (BentoML's adaptive batching batches one
API's calls only).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

log = logging.getLogger("mutask.serving")

# A lone request (nothing else queued or being decoded) whose last such run took under this
# runs on the event loop: handing it to the worker thread and back costs more than it does
INLINE_SECONDS = 0.001


class MicroBatcher:
    """``await submit_tasks([(task, x), ...])`` queues a request (its items stay together); one
    collector task per event loop takes the first, then keeps collecting while more are coming
    (requests still being decoded, :meth:`expect`) for up to ``max_wait_ms``, or until
    ``max_batch`` rows; a lone request runs at once. ``on_batch(rows, seconds)`` follows each batch."""

    def __init__(self, engine, *, max_batch: int = 32, max_wait_ms: float = 2.0, on_batch=None):
        self.engine = engine
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.on_batch = on_batch
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mutask-infer")
        self._loop = self._queue = self._collector = self._arrived = None
        self.incoming = 0  # requests being decoded that will submit soon
        self._lone_seconds = float("inf")  # how long the last lone request's run took

    def _ensure(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._collector is None or self._collector.done():
            self._loop, self._queue, self._arrived = loop, asyncio.Queue(), asyncio.Event()
            self._collector = loop.create_task(self._collect(), name="mutask-batcher")

    def expect(self) -> "MicroBatcher":
        """``with batcher.expect():`` around a request's decoding: while it runs, the collector
        waits (up to max_wait_ms) for it instead of running a smaller batch."""
        return self

    def __enter__(self) -> None:
        self.incoming += 1

    def __exit__(self, *exc) -> None:
        self.incoming -= 1
        if self._arrived is not None:
            self._arrived.set()

    async def submit_tasks(self, items: list) -> list:
        """Logits for each (task, x) of ``items``, batched with concurrent requests as one unit
        (items that pass the same array count its rows once, see :meth:`Engine.run`)."""
        self._ensure()
        fut = self._loop.create_future()
        self._queue.put_nowait((items, sum(x.shape[0] for x in {id(x): x for _, x in items}.values()), fut))
        self._arrived.set()
        return await fut

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        queue, carry = self._queue, None
        while True:
            item, carry = carry or await queue.get(), None
            batch, rows = [item], item[1]
            deadline = loop.time() + self.max_wait
            while rows < self.max_batch:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if self.incoming <= 0 or remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
                    continue
                if rows + nxt[1] > self.max_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                rows += nxt[1]
            live = [b for b in batch if not b[2].done()]
            if live:
                await self._run(loop, live)

    async def _run(self, loop, live: list) -> None:
        flat = [item for items, _, _ in live for item in items]
        lone = len(live) == 1 and self.incoming <= 0 and self._queue.empty()
        t0 = time.perf_counter()
        try:
            if lone and self._lone_seconds < INLINE_SECONDS:
                outs = self.engine.run(flat)
            else:
                outs = await loop.run_in_executor(self._executor, self.engine.run, flat)
            if lone:
                self._lone_seconds = time.perf_counter() - t0
        except Exception as e:  # an engine failure fails this batch only
            log.exception("inference failed for a batch of %d requests", len(live))
            for _, _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            return
        pos = 0
        for items, _, fut in live:
            if not fut.done():
                fut.set_result(outs[pos : pos + len(items)])
            pos += len(items)
        if self.on_batch is not None:
            try:
                self.on_batch([(t, x.shape[0]) for t, x in flat], time.perf_counter() - t0)
            except Exception:
                log.exception("batch metrics callback failed")

    def close(self) -> None:
        if self._collector is not None and not self._collector.done():
            try:
                self._collector.cancel()
            except RuntimeError:  # its loop is closed
                pass
        self._executor.shutdown(wait=False)
