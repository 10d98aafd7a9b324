"""Event-loop plumbing: the private loop thread behind the sync face, and the helpers that
keep cancellation from leaving work running behind a caller."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class BackgroundLoop:
    """Runs coroutines on its own loop thread and waits for them from any other thread.

    Callers may themselves be inside a running event loop (a notebook, an async
    server): the work runs on this loop, so nothing deadlocks on theirs.
    """

    def __init__(self, name: str = "vua-s3-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the background loop and return its result."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a vua_s3 sync call was made from its own loop thread; use AsyncVUA there")
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("this VUA object is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Start ``coro`` on the background loop without waiting: work that must not
        hold up the caller (uploads behind an inference step)."""
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("this VUA object is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self, last: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Run ``last()`` (releasing what the loop's work opened), then stop. Quiet and
        idempotent, so it can run from a finalizer or at interpreter exit."""
        if self._loop.is_closed():
            return
        if threading.current_thread() is self._thread:  # collected on its own loop: cannot wait here
            self._loop.create_task(last())
            self._loop.call_soon(self._loop.stop)
            return
        try:
            self.run(last())
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the loop and its thread; later calls to :meth:`run` fail clearly."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def gather_or_cancel(*aws: Coroutine[Any, Any, _T]) -> list[_T]:
    """Run ``aws`` concurrently; on the first failure cancel the rest, wait, then raise.

    Unlike ``asyncio.gather``, nothing keeps running after the caller has failed
    (parts still uploading while a multipart upload is aborted, say).
    """
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """``asyncio.to_thread``, except that a cancelled caller still waits for the thread
    (which cannot be stopped), so the buffers it uses stay valid until it is done."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise
