"""Small shared test helpers: run a coroutine on uvloop with a hard deadline."""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

import uvloop

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run `coro` to completion on a fresh uvloop loop; fail the test if it takes > `timeout` s."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return uvloop.run(bounded())
