"""Connections to workers kept open between the gateway's requests.

`submit` dials and checks a worker for every job (TLS certificate fetch, channel, signed advert):
about 6 ms on loopback, paid before each first token. The gateway instead hands
run_with_failover `WorkerPool.connect`: an idle connection to that worker is reused after a
GetCapacity round trip, which both proves the worker is alive and refreshes its signed advert
(checked against the same peer ID; the channel stays pinned to the certificate checked when it
was opened). A connection that fails that check is closed and a fresh one dialled.
"""

from __future__ import annotations

from node.client import ClientError, JobRefused, WorkerClient
from node.identity import Identity

MAX_IDLE_PER_WORKER = 4


class PooledClient(WorkerClient):
    """A WorkerClient whose close() hands it back to its pool (`async with` still works)."""
    pool: WorkerPool     # set by WorkerPool.connect

    async def close(self) -> None:
        await self.pool.release(self)

    async def discard(self) -> None:
        await WorkerClient.close(self)


class WorkerPool:
    def __init__(self, max_idle_per_worker: int = MAX_IDLE_PER_WORKER):
        self._idle: dict[tuple, list[PooledClient]] = {}
        self._keys: dict[int, tuple] = {}       # id(client) -> its key
        self._max_idle = max_idle_per_worker

    async def connect(self, target: str, identity: Identity, peer_id: str | None = None, tls: str = "auto",
                      timeout_s: float = 10.0) -> WorkerClient:
        """WorkerClient.connect's contract, reusing an idle connection when one is alive."""
        key = (target, identity.public_key, peer_id, tls)
        idle = self._idle.get(key, [])
        while idle:
            client = idle.pop()
            try:
                client.advert = await client.capacity(timeout_s=timeout_s)
                return client
            except BaseException as exc:   # cancelled too (a probe outpaced by another): closed, not leaked
                self._keys.pop(id(client), None)
                await client.discard()
                if not isinstance(exc, (JobRefused, ClientError)):
                    raise
        client = await PooledClient.connect(target, identity, peer_id=peer_id, tls=tls, timeout_s=timeout_s)
        client.pool = self
        self._keys[id(client)] = key
        return client

    async def release(self, client: PooledClient) -> None:
        key = self._keys.get(id(client))
        if key is None:                 # already dropped
            await client.discard()
            return
        idle = self._idle.setdefault(key, [])
        if client in idle:              # closed twice: it is back already
            return
        if len(idle) < self._max_idle:
            idle.append(client)
            return
        del self._keys[id(client)]
        await client.discard()

    async def close(self) -> None:
        for idle in self._idle.values():
            for client in idle:
                await client.discard()
        self._idle.clear()
        self._keys.clear()
