"""SPS: target forward steps per second for a verification batch (paper §3.2.2), measured once per
model, dtype, device, processor, thread count and operator version at engine start, and cached on
disk.

The paper counts a verification batch in tokens, SPS(B): its kernels run attention over the
flattened tokens, so a step costs what its token count says. Ours pads attention to the widest row
(`spec_round.build_verify_batch`; only the matmuls run on the packed tokens), and at these sizes the
matmuls are bound by reading the weights, not by the token count. A step therefore costs what its
rows R and its width W (query tokens of the widest row, 1 = plain decoding) say, and the table is
SPS(R, W), measured with every row W tokens wide (B = R * W, an upper bound for narrower rows).
Measured (SmolLM2-135M, bf16, 2 cores): 11 rows at context 400 took 49 ms at W = 1 and 64 ms at
W = 2, where one row of 12 tokens against one of 22 took 39 against 43 ms; the one-row SPS(B)
table this replaced let the scheduler verify drafts at 8-32 users that slowed the round by more
than they committed (docs/benchmarks.md, "A step costs its rows and its width"). Folding the query
heads of grouped-query attention (kernels/ops.py) has since made W = 2 cheap (16 rows at context
512: 63 ms at W = 1, 67 at W = 2) but not W = 8 (115 ms), so the cost still has both axes.
"""

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


def row_points(max_rows: int) -> list[int]:
    """1, 2, 4, ... and max_rows itself."""
    points, r = [], 1
    while r < max_rows:
        points.append(r)
        r *= 2
    return points + [max_rows]


@dataclass
class SpsTable:
    rows: list[int]               # profiled batch sizes R (requests), ascending
    widths: list[int]             # profiled widths W = 1..max (query tokens per row)
    measured: list[list[float]]   # steps per second, measured[i][w - 1] at rows[i], width w
    context: int                  # context length of every row in the profile

    def __post_init__(self) -> None:
        # More rows or a wider step is never faster; measurement noise can say otherwise, so schedule
        # on the running minimum in both directions. Algorithm 1's early stop needs this smoothness
        # (paper Appendix A).
        smooth = [[min(row[:w + 1]) for w in range(len(row))] for row in self.measured]
        for i in range(1, len(smooth)):
            smooth[i] = [min(a, b) for a, b in zip(smooth[i], smooth[i - 1])]
        self.smooth = smooth

    def __call__(self, rows: int, width: int) -> float:
        """Steps per second for `rows` requests verifying up to `width` tokens each: step time
        interpolated linearly between profiled row counts; past the profile, it grows in proportion
        to the rows and the width."""
        w = min(width, self.widths[-1]) - 1
        scale = max(1.0, width / self.widths[-1])
        if rows <= self.rows[0]:
            return self.smooth[0][w] / scale
        if rows >= self.rows[-1]:
            return self.smooth[-1][w] * self.rows[-1] / (rows * scale)
        i = bisect_left(self.rows, rows)
        lo, hi = self.rows[i - 1], self.rows[i]
        t_lo, t_hi = 1 / self.smooth[i - 1][w], 1 / self.smooth[i][w]
        return 1 / ((t_lo + (t_hi - t_lo) * (rows - lo) / (hi - lo)) * scale)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> SpsTable:
        data = json.loads(path.read_text())
        table = cls(rows=data["rows"], widths=data["widths"], measured=data["measured"], context=data["context"])
        if len(table.measured) != len(table.rows) or any(len(m) != len(table.widths) for m in table.measured):
            raise ValueError("the measurements do not match the rows and widths")
        return table


@torch.inference_mode()
def profile_sps(model: TargetModel, max_rows: int, max_width: int, context: int = 512,
                repeats: int = 5) -> SpsTable:
    rows = row_points(max_rows)
    cache = model.new_cache(max_rows, context + max_width + 1)
    g = torch.Generator().manual_seed(0)
    dev = model.device
    for slot in range(max_rows):   # rows hold different random contexts, as requests do
        prompt = torch.randint(0, model.args.vocab_size, (1, context), generator=g).to(dev)
        model.forward(prompt, torch.arange(context, device=dev)[None], torch.tensor([slot], device=dev), cache)
    widths = range(1, max_width + 1)
    measured = []
    for r in rows:
        slots = torch.arange(r, device=dev)
        batches = {w: (torch.randint(0, model.args.vocab_size, (r, w), generator=g).to(dev),
                       torch.arange(context, context + w, device=dev)[None].expand(r, w)) for w in widths}
        times: dict[int, list[float]] = {w: [] for w in widths}
        # The widths of one row count are timed in turn, `repeats` passes: what the scheduler reads is
        # the cost of a width relative to its neighbours, and a host that slows down for a second
        # (the 2-core box does) then slows every width alike instead of the one being timed.
        for attempt in range(repeats + 1):
            for w in widths:
                tokens, positions = batches[w]
                start = time.perf_counter()
                logits = model.logits(model.forward(tokens, positions, slots, cache, lengths=[w] * r).hidden)
                logits.max(dim=-1).indices.tolist()   # the round's one copy to the host
                if attempt:                           # the first pass warms up every shape
                    times[w].append(time.perf_counter() - start)
        measured.append([1 / statistics.median(times[w]) for w in widths])
    return SpsTable(rows=rows, widths=list(widths), measured=measured, context=context)


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


def load_or_profile(model: TargetModel, key: str, max_rows: int, max_width: int, cache_dir: Path) -> SpsTable:
    path = cache_dir / f"{key}-r{max_rows}-w{max_width}.json"
    if path.exists():
        try:
            return SpsTable.load(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable SPS profile %s (%s); profiling again", path, exc)
    log.warning("profiling SPS(R, W) for up to %d rows of up to %d tokens (once; cached in %s)",
                max_rows, max_width, path)
    table = profile_sps(model, max_rows, max_width)
    table.save(path)
    return table
