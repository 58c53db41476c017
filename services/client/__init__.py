"""Corral's public API: talk to a Corral fleet over NATS, without HTTP.

    from corral.client import AsyncClient

    async with AsyncClient("nats://127.0.0.1:4222") as c:
        r = await c.chat("llama3.2", [{"role": "user", "content": "hi"}])
        async for part in await c.generate("amd/llama3.2", "hi", stream=True):
            print(part["response"], end="")

`Client` is the same API for synchronous code. Requests are routed exactly as the gateway routes
them (the gateway's own planner): warm claim subjects first, then the agents that have the model.

`AsyncClient`, `Client` and `ResponseError` are the public API; every other module of ``corral``
is internal and may change without notice.
"""

from corral.client.api import AsyncClient, Client, ResponseError

__all__ = ["AsyncClient", "Client", "ResponseError"]
