"""The tasks of a small application, tested in ../tests with dbtask's pytest plugin."""

import asyncio

from dbtask import Chain, task


@task
def add(x: int, y: int) -> int:
    return x + y


@task
async def slow_double(x: int) -> int:
    await asyncio.sleep(0.05)
    return 2 * x


@task
def checkout(cart: list) -> dict:
    """Fails on an empty cart: the caller sees the exception."""
    if not cart:
        raise ValueError("the cart is empty")
    return {"items": len(cart), "total": sum(price for _, price in cart)}


def double_then_add(x: int, y: int) -> Chain:
    """A workflow the application builds: (2x) + y."""
    return slow_double.s(x) | add.s(y)
