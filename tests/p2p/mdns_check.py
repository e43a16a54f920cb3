"""Run inside a fresh network namespace (`unshare -n`, only `lo`): a static worker and a client,
both with mDNS and no bootstrap peer; prints one JSON line saying what the client saw."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from p2p.conftest import ready_peer, spawn_peer  # noqa: E402

from libp2p.discovery.events.peerDiscovery import peerDiscovery  # noqa: E402

from node.identity import Identity  # noqa: E402
from node.p2p.discovery import Discovery  # noqa: E402


async def main() -> dict:
    worker = ready_peer(spawn_peer("--model", "lan-model", "--mdns"))
    try:
        started = time.monotonic()
        client = Discovery(Identity.generate(), [], mdns=True)
        await client.start(timeout_s=20)
        seen = await client.wait_for(1, model="lan-model", timeout_s=20)
        elapsed = time.monotonic() - started
        await client.stop()
        return {"worker": worker.peer_id, "seen": [a.peer_id for a in seen], "elapsed_s": round(elapsed, 2),
                "handlers_left": len(peerDiscovery._peer_discovered_handlers)}
    finally:
        worker.stop()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())), flush=True)
