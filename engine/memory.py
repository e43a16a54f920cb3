"""Whether the KV cache a configuration asks for fits in the memory its device has left.

The engine allocates K/V for max_batch sequences of max_context tokens at start (engine/model.py,
`KVCache`). Asked for more than the machine has, torch either fails with an allocator traceback or,
on Linux where large zeroed allocations are lazy, succeeds and leaves the kernel's OOM killer to end
the node once the cache fills under load. Checked before the allocation instead, as vLLM checks
its KV blocks against the GPU memory left after the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.loading import ModelLoadError
from engine.model import ModelArgs, TargetModel

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")     # cgroup v2: a container's limit (Akash, Kubernetes, docker --memory)


def kv_cache_len(config: EngineConfig) -> int:
    """Positions per engine slot: max_context plus slack, since a round may write padding and draft
    K/V past a request's last position."""
    return config.max_context + config.block_size + 2


def kv_cache_bytes(args: ModelArgs, slots: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for `slots` sequences of `max_len` positions."""
    return 2 * args.num_layers * slots * max_len * args.num_kv_heads * args.head_dim * dtype.itemsize


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` now; None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = [b for b in (_meminfo_available(), _cgroup_headroom()) if b is not None]
    return min(free) if free else None


def _meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """The container's limit less what it uses (None without a cgroup v2 limit): MemAvailable is the
    host's, and a container that passes it is killed at its own limit."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def check_kv_cache(config: EngineConfig, model: TargetModel) -> None:
    """Refuse a KV cache the device has not the free memory for (nothing is refused where free
    memory cannot be told)."""
    need = kv_cache_bytes(model.args, config.max_batch, kv_cache_len(config), model.dtype)
    free = available_bytes(model.device)
    if free is not None and need > free:
        gib = 2 ** 30
        raise ModelLoadError(f"the KV cache for max_batch {config.max_batch} x max_context {config.max_context} "
                             f"needs {need / gib:.1f} GiB and {model.device} has {free / gib:.1f} GiB free; lower "
                             "max_batch or max_context")
