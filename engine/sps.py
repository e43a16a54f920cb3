"""SPS(B): target forward steps per second as a function of the verification batch size B in
tokens (paper §3.2.2). Measured once per model, dtype, device, processor, thread count and operator
version at engine start, and cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from bisect import bisect_left
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.model import TargetModel

log = logging.getLogger(__name__)


def profile_points(max_tokens: int) -> list[int]:
    """1..8 densely (where the scheduler's choices fall), then a geometric grid up to max_tokens."""
    points = list(range(1, min(8, max_tokens) + 1))
    b = 8
    while b < max_tokens:
        b = min(max_tokens, int(b * 1.5))
        points.append(b)
    return points


@dataclass
class SpsTable:
    tokens: list[int]             # profiled batch sizes B, ascending
    measured: list[float]         # steps per second at each B, as measured
    context: int                  # context length the profile ran at

    def __post_init__(self) -> None:
        # More tokens never make a step faster; measurement noise can say otherwise, so schedule on
        # the running minimum. Algorithm 1's early stop needs this smoothness (paper Appendix A).
        self.smooth = [min(self.measured[:i + 1]) for i in range(len(self.measured))]

    def __call__(self, b: int) -> float:
        """Steps per second at B tokens: linear interpolation of step time between profiled points;
        past the last point, step time grows in proportion to B."""
        if b <= self.tokens[0]:
            return self.smooth[0]
        if b >= self.tokens[-1]:
            return self.smooth[-1] * self.tokens[-1] / b
        i = bisect_left(self.tokens, b)
        lo, hi = self.tokens[i - 1], self.tokens[i]
        t_lo, t_hi = 1 / self.smooth[i - 1], 1 / self.smooth[i]
        return 1 / (t_lo + (t_hi - t_lo) * (b - lo) / (hi - lo))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in asdict(self).items()}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> SpsTable:
        data = json.loads(path.read_text())
        return cls(tokens=data["tokens"], measured=data["measured"], context=data["context"])


@torch.inference_mode()
def profile_sps(model: TargetModel, max_tokens: int, context: int = 256, repeats: int = 5) -> SpsTable:
    points = profile_points(max_tokens)
    cache = model.new_cache(1, context + max_tokens + 1)
    g = torch.Generator().manual_seed(0)
    slot = torch.tensor([0], device=model.device)
    prompt = torch.randint(0, model.args.vocab_size, (1, context), generator=g).to(model.device)
    model.forward(prompt, torch.arange(context, device=model.device)[None], slot, cache)
    measured = []
    for b in points:
        tokens = torch.randint(0, model.args.vocab_size, (1, b), generator=g).to(model.device)
        positions = torch.arange(context, context + b, device=model.device)[None]
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.logits(model.forward(tokens, positions, slot, cache).hidden)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        measured.append(1 / statistics.median(times[1:]))  # the first run warms up this shape
    return SpsTable(tokens=points, measured=measured, context=context)


def cpu_signature(cpuinfo: str) -> str:
    """The first processor's model name and instruction-set flags from /proc/cpuinfo text (the flags
    sorted; the platform's processor string where the file says nothing, as off Linux)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or f"{platform.processor()} {platform.machine()}"
    return f"{model}|{' '.join(sorted(fields.get('flags', '').split()))}"


def hardware_id(device: str) -> str:
    """A short digest naming the hardware behind `device`: the GPU's name, or the CPU's model and
    flags. A cached profile is only valid on the hardware that measured it, and one image (one cache
    volume) may start on different hosts: the development VM had AVX2 alone in earlier sessions and
    has AMX now, where a bf16 step of 8 tokens costs what one of 2 does (docs/benchmarks.md), and a
    rented GPU may be another model next time."""
    if device.startswith("cuda"):
        text = torch.cuda.get_device_name(device)
    else:
        try:
            text = cpu_signature(Path("/proc/cpuinfo").read_text())
        except OSError:
            text = cpu_signature("")
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def load_or_profile(model: TargetModel, key: str, max_tokens: int, cache_dir: Path) -> SpsTable:
    path = cache_dir / f"{key}-{max_tokens}.json"
    if path.exists():
        try:
            return SpsTable.load(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable SPS profile %s (%s); profiling again", path, exc)
    log.warning("profiling SPS(B) for B up to %d tokens (once; cached in %s)", max_tokens, path)
    table = profile_sps(model, max_tokens)
    table.save(path)
    return table
