"""The training loop (reference §3.4): AdamW, linear warmup then cosine to 0, grad clip 1.0.

Deterministic with a seed: step n draws its sequences and anchors from a generator seeded with
(seed, n), so a resumed run replays exactly what an uninterrupted one would. The resumable state
(`train_state.pt`: weights, optimizer, step, the settings the draws and the schedule depend on, and
the metrics of every step so far) is written atomically every `save_every` steps, at the end, when
the time budget runs out and on Ctrl-C; the drafter itself (DeepSpec format) is written when the
run ends, by steps or by time.

dtype bfloat16 runs each step's forward under autocast: matrix products in bf16 (DeepSpec trains in
bf16 with fp32 master weights, reference §3.4), while the weights, the optimizer and the losses stay
fp32, so no loss scaling is needed. Where the hardware multiplies bf16 natively (a GPU; a CPU with
AMX) a step costs a fraction of an fp32 one.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from engine.drafters.checkpoint import save_checkpoint
from engine.model import TargetModel
from engine.train.blocks import dspark_sequence_loss, eagle3_sequence_loss
from engine.train.cache import CachedSequence
from engine.train.modules import DSparkTrainable, Eagle3Trainable

STATE_FILE = "train_state.pt"
NORM_LR_SCALE = 10.0
# The settings a resumed run must share with the saved one to replay it (the draws, the schedule, the
# arithmetic), each with the flag that sets it; `minutes` is not among them: a new time budget is
# how a run stopped by the clock is continued.
REPLAYED = {"kind": "--kind", "steps": "--steps", "seed": "--seed", "dtype": "--dtype", "lr": "--lr",
            "batch": "--batch", "max_anchors": "--anchors", "max_len": "--max-len", "data": "--cache-dir data digest"}


class TrainingError(ValueError):
    pass


@dataclass
class TrainSettings:
    kind: str                          # dspark | dflash | eagle3
    steps: int
    batch: int = 4                     # sequences per optimizer step
    lr: float = 6e-4
    warmup: float = 0.04
    clip: float = 1.0
    max_anchors: int = 512
    max_len: int = 512                 # EAGLE-3 window
    seed: int = 42
    save_every: int = 100
    minutes: float | None = None       # stop (resumably) after this long
    device: str = "cpu"                # where the drafter, the target's shared weights and the cache live
    dtype: str = "float32"             # float32, or bfloat16 (autocast; weights and optimizer stay fp32)
    data: str = ""                     # what identifies the training data (pipeline: its shards' digests)
    on_step: Callable[[int, dict], None] | None = None


@dataclass
class TrainResult:
    steps_done: int
    finished: bool                     # all `steps` done (False: stopped by the time budget)
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    anchors_per_s: float = 0.0


def lr_at(step: int, s: TrainSettings, elapsed_fraction: float = 0.0) -> float:
    """Warmup over the first 4% then cosine to 0. Progress counts steps, or the share of the time
    budget already spent when that is further along (a --minutes run then ends with its LR at 0,
    at the price of bit-reproducibility)."""
    warm = max(1, round(s.warmup * s.steps))
    if step < warm and elapsed_fraction < s.warmup:
        return s.lr * max((step + 1) / warm, elapsed_fraction / s.warmup)
    progress = max((step - warm) / max(1, s.steps - warm), (elapsed_fraction - s.warmup) / (1 - s.warmup))
    return s.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_module(config, state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The trainable twin of a drafter config, with `state` loaded (names must match exactly)."""
    module = Eagle3Trainable(config) if config.kind == "eagle3" else DSparkTrainable(config)
    if state is not None:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module


def train(module: torch.nn.Module, target: TargetModel, data: list[CachedSequence], settings: TrainSettings,
          out: Path) -> TrainResult:
    """Train `module` in place; resumes from out/train_state.pt when it exists."""
    if not data:
        raise TrainingError("the training set is empty")
    out.mkdir(parents=True, exist_ok=True)
    module.to(settings.device)
    # The whole cache goes to the device once (~6 KB a token): per-step copies of the taps would
    # cost more than a GPU step. Index draws stay on CPU generators, so a run samples the same
    # sequences and anchors on any device.
    data = [seq.to(settings.device) for seq in data]
    # The final norm starts small (it sets the logit scale; see pipeline.py) and must grow ~10x to
    # reach the target's: it learns 10x faster, or a short run ends with flat distributions.
    norm = [p for n, p in module.named_parameters() if n == "norm.weight"]
    rest = [p for n, p in module.named_parameters() if n != "norm.weight"]
    opt = torch.optim.AdamW([{"params": rest, "lr_scale": 1.0}, {"params": norm, "lr_scale": NORM_LR_SCALE}],
                            lr=settings.lr, betas=(0.9, 0.999), weight_decay=0.0)
    state_path = out / STATE_FILE
    saved = _load_state(state_path, settings, module, opt) if state_path.exists() else {}
    step = saved.get("step", 0)
    # the metrics, time and blocks of the steps before a resume, so the record covers the whole run
    result = TrainResult(steps_done=step, finished=False, history=list(saved.get("history", [])))
    earlier_seconds, earlier_anchors = saved.get("seconds", 0.0), saved.get("anchors", 0)
    deadline = None if settings.minutes is None else time.monotonic() + settings.minutes * 60
    start, anchors = time.monotonic(), 0

    def save() -> None:
        _save_state(state_path, module, opt, step, settings, result.history,
                    earlier_seconds + time.monotonic() - start, earlier_anchors + anchors)

    bar = tqdm(total=settings.steps, initial=step, desc=f"train {settings.kind}", unit="step", mininterval=5)
    try:
        while step < settings.steps:
            if deadline is not None and time.monotonic() > deadline:
                break
            spent = 0.0 if deadline is None else (time.monotonic() - start) / (settings.minutes * 60)
            metrics = _step(module, target, data, settings, opt, step, spent)
            step += 1
            anchors += metrics.pop("anchors")
            rate = anchors / max(time.monotonic() - start, 1e-9)
            metrics.update(step=step, anchors_per_s=round(rate, 1))
            result.history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc1=f"{metrics['accept'][0]:.2f}",
                            anchors_s=f"{rate:.0f}")
            bar.update(1)
            if settings.on_step is not None:
                settings.on_step(step, metrics)
            if step % settings.save_every == 0:
                save()
    except KeyboardInterrupt:
        save()
        bar.close()
        raise
    bar.close()
    save()
    result.steps_done, result.finished = step, step >= settings.steps
    result.seconds = earlier_seconds + time.monotonic() - start
    result.anchors_per_s = (earlier_anchors + anchors) / max(result.seconds, 1e-9)
    return result


def _load_state(path: Path, settings: TrainSettings, module, opt) -> dict:
    """The saved run, loaded into `module` and `opt`; refused when unreadable or when its settings
    differ from these (a resumed run replays the uninterrupted one only with the same draws,
    schedule and arithmetic). States saved before a setting was recorded are taken to share it."""
    try:
        saved = torch.load(path, weights_only=True, map_location=settings.device)
        now = {name: getattr(settings, name) for name in REPLAYED}
        changed = [f"{flag} {saved.get(name, now[name])} (asked: {now[name]})"
                   for name, flag in REPLAYED.items() if saved.get(name, now[name]) != now[name]]
        if changed:
            raise TrainingError(f"{path} is a run saved with {', '.join(changed)}: resume it with the settings it "
                                "started with, or use another --out")
        module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        saved["step"] = int(saved["step"])
    except TrainingError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError, pickle.UnpicklingError) as exc:
        first_line = str(exc).split("\n")[0].split(". ")[0][:200]   # torch's own messages run to a paragraph
        raise TrainingError(f"{path} cannot be resumed ({type(exc).__name__}: {first_line}): it is damaged or "
                            "not a train-drafter state; delete it to start over") from None
    return saved


def _step(module, target, data, settings: TrainSettings, opt, step: int, spent: float) -> dict:
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    picks = torch.randint(0, len(data), (settings.batch,), generator=g).tolist()
    for group in opt.param_groups:
        group["lr"] = lr_at(step, settings, spent) * group["lr_scale"]
    opt.zero_grad(set_to_none=True)
    parts, anchors = [], 0
    autocast = torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16,
                              enabled=settings.dtype == "bfloat16")
    for i in picks:
        seq = data[i]
        with autocast:
            if settings.kind == "eagle3":
                loss = eagle3_sequence_loss(module, target, seq, settings.max_len, g)
            else:
                loss = dspark_sequence_loss(module, target, seq, settings.max_anchors, g,
                                            ce_only=settings.kind == "dflash")
        if loss is None:
            continue
        (loss.total / settings.batch).backward()
        parts.append(loss)
        anchors += loss.blocks
    torch.nn.utils.clip_grad_norm_(module.parameters(), settings.clip)
    opt.step()
    n = max(len(parts), 1)
    width = max((len(p.accept) for p in parts), default=1)
    accept = [sum(p.accept[t] for p in parts if t < len(p.accept)) / n for t in range(width)]
    return {"loss": sum(p.total.item() for p in parts) / n, "ce": sum(p.ce for p in parts) / n,
            "l1": sum(p.l1 for p in parts) / n, "conf": sum(p.conf for p in parts) / n,
            "accept": [round(a, 4) for a in accept], "lr": opt.param_groups[0]["lr"], "anchors": anchors}


def _save_state(path: Path, module, opt, step: int, settings: TrainSettings, history: list[dict], seconds: float,
                anchors: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": module.state_dict(), "optimizer": opt.state_dict(), "step": step,
                **{name: getattr(settings, name) for name in REPLAYED},
                "history": history, "seconds": seconds, "anchors": anchors}, tmp)
    os.replace(tmp, path)


def export(module: torch.nn.Module, config: dict, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The DeepSpec-format drafter: config.json + model.safetensors (shared embeddings left out)."""
    return save_checkpoint(out, config, dict(module.state_dict()), dtype=dtype)
