"""Measure the peer network on this machine: N real peer processes (tests/p2p/static_worker.py,
the real P2PService with a static advert) on loopback, all joined through the first one.

Reports: memory (RSS) per node, the time for a new worker to become visible to a client, and the
advert traffic per node per minute. Run it in a network namespace to also count every byte the
swarm puts on the wire (loopback counters are only the swarm's there):

    unshare -n sh -c 'ip link set lo up && .venv/bin/python scripts/p2p_swarm.py --nodes 20'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from p2p.conftest import ready_peer, spawn_peer  # noqa: E402

from node.identity import Identity  # noqa: E402
from node.p2p.discovery import Discovery  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lo_bytes() -> int | None:
    """Bytes sent through loopback, only when it is this namespace's only interface (then all of
    it is the swarm's). /proc/net/dev follows the namespace; /sys/class/net may not."""
    rows = {line.split(":")[0].strip(): line.split(":")[1].split()
            for line in Path("/proc/net/dev").read_text().splitlines()[2:]}
    if list(rows) != ["lo"]:
        return None
    return int(rows["lo"][8])  # transmit bytes


async def visible_after(bootstrap: str, interval: float, ttl: int) -> tuple[float, float]:
    """Start one more worker while a client watches; (s from its ready line, s from its spawn)."""
    client = Discovery(Identity.generate(), [bootstrap])
    await client.start()
    try:
        spawned = time.monotonic()
        late = ready_peer(spawn_peer("--model", "late", "--bootstrap", bootstrap,
                                     "--interval", str(interval), "--ttl", str(ttl)))
        ready = time.monotonic()
        await client.wait_for(1, model="late", timeout_s=60)
        seen = time.monotonic()
        late.stop()
        return seen - ready, seen - spawned
    finally:
        await client.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--interval", type=float, default=5.0, help="advert interval, s (node default 5)")
    p.add_argument("--ttl", type=int, default=30, help="advert TTL, s (node default 30)")
    p.add_argument("--duration", type=float, default=60.0, help="traffic measurement window, s")
    args = p.parse_args()

    first = ready_peer(spawn_peer("--model", "m0", "--interval", str(args.interval), "--ttl", str(args.ttl)))
    procs = [spawn_peer("--model", f"m{i}", "--bootstrap", first.addr, "--interval", str(args.interval),
                        "--ttl", str(args.ttl)) for i in range(1, args.nodes)]
    peers = [first, *(ready_peer(proc) for proc in procs)]
    all_ready = time.monotonic()
    try:
        time.sleep(5)  # let meshes form
        wire_before, window_start = lo_bytes(), time.monotonic()
        time.sleep(args.duration)
        wire_after, window = lo_bytes(), time.monotonic() - window_start
        rss = [rss_mib(peer.proc.pid) for peer in peers]
        from_ready, from_spawn = asyncio.run(visible_after(first.addr, args.interval, args.ttl))
    finally:
        lifetime_stats = []
        lived_min = (time.monotonic() - all_ready) / 60
        for peer in peers:
            lines = peer.stop(signal.SIGTERM).strip().splitlines()
            if lines:
                lifetime_stats.append(json.loads(lines[-1]))
    result = {
        "nodes": args.nodes, "advert_interval_s": args.interval,
        "rss_mib_per_node": {"median": round(statistics.median(rss), 1), "max": round(max(rss), 1)},
        "rss_mib_total": round(sum(rss), 1),
        "new_worker_visible_s": {"after_ready": round(from_ready, 3), "after_spawn": round(from_spawn, 3)},
    }
    if lifetime_stats:
        sizes = [s["advert_bytes"] / s["adverts_published"] for s in lifetime_stats if s["adverts_published"]]
        result["advert_bytes"] = round(statistics.median(sizes))
        result["advert_payload_published_bytes_per_node_per_min"] = round(statistics.median(sizes) * 60 / args.interval)
        # Accepted adverts only (the validator's count): gossip duplicates are on the wire, below.
        received = statistics.median(s["adverts_received"] for s in lifetime_stats)
        result["advert_payload_received_bytes_per_node_per_min"] = round(
            received * statistics.median(sizes) / lived_min)
    if wire_before is not None:
        result["wire_bytes_per_node_per_min"] = round((wire_after - wire_before) / args.nodes / window * 60)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
