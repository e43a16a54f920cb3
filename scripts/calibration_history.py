"""Would a request's own acceptance history calibrate position 1 better? (An offline study: the
engine does not use it.)

Decodes the calibration pool's first 60 prompts (fit), the rest of it (held out) and the first 24
of each of the four evaluation sets with the shipped drafter, full block, 128 tokens, 16 at a time,
keeping each request's rounds in order. Then fits, at position 1, a logistic on (z_1, u_1), the
inputs of the stored scaling, and one on (z_1, u_1, h), h the request's calibration error so far:
logit of its smoothed acceptance rate minus logit of its smoothed mean prediction, both smoothed
toward the fit set's rate with `alpha` pseudo-rounds. h reads only earlier rounds, so a scheduler
could use it without breaking Appendix A. Prints ECE / AUROC / Brier on each split.

    python scripts/calibration_history.py --temperature 0 --eval-dir ../shared/eval
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.bench import chat_ids
from engine.build import build_engine
from engine.calibration import calibration_metrics
from engine.config import EngineConfig
from engine.prompts import load_first_turns
from engine.train.calibrate import Round, collect, default_prompts

SETS = ("humaneval", "mbpp", "gsm8k", "mt-bench")


def inputs(requests: list[list[Round]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    rows = [(r.logits[0], r.draft[0], float(r.accepted >= 1), i) for i, rounds in enumerate(requests) for r in rounds]
    x = torch.tensor([row[:2] for row in rows], dtype=torch.float64)
    return x, torch.tensor([row[2] for row in rows], dtype=torch.float64), [row[3] for row in rows]


def history(y: torch.Tensor, p: torch.Tensor, owner: list[int], prior: float, alpha: float) -> torch.Tensor:
    """Per round: the request's calibration error over its earlier rounds, in logits."""
    def logit(v: float) -> float:
        return math.log(v / (1 - v))
    seen: dict[int, tuple[float, float, int]] = {}
    out = torch.empty(len(y), dtype=torch.float64)
    for t, i in enumerate(owner):
        accepted, predicted, n = seen.get(i, (0.0, 0.0, 0))
        out[t] = (logit((accepted + alpha * prior) / (n + alpha)) - logit((predicted + alpha * prior) / (n + alpha)))
        seen[i] = (accepted + float(y[t]), predicted + float(p[t]), n + 1)
    return out


def fit_logistic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=300)

    def loss():
        opt.zero_grad()
        value = F.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y)
        value.backward()
        return value
    opt.step(loss)
    return w.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--eval-dir", type=Path, required=True)
    parser.add_argument("--alphas", default="4,16,32")
    args = parser.parse_args()
    engine = build_engine(EngineConfig(method="dspark", max_batch=16, max_context=2048))
    pool = default_prompts(177, 0)
    prompts = {"fit": pool[:60], "held-out pool": pool[60:],
               "four sets": [p for s in SETS for p in load_first_turns(args.eval_dir / f"{s}.jsonl", 24)]}
    splits = {name: collect(engine, [chat_ids(engine.tokenizer, p) for p in texts], 128, args.temperature, 0)
              for name, texts in prompts.items()}
    data = {name: inputs(requests) for name, requests in splits.items()}
    x_fit, y_fit, owner_fit = data["fit"]
    prior = float(y_fit.mean())
    base = fit_logistic(x_fit, y_fit)
    models = {"z, u": (lambda x, y, owner: x, base)}
    for alpha in map(float, args.alphas.split(",")):
        def with_history(x, y, owner, alpha=alpha):
            p = torch.sigmoid(x @ base[:-1] + base[-1])
            return torch.cat([x, history(y, p, owner, prior, alpha)[:, None]], dim=1)
        fitted = fit_logistic(with_history(x_fit, y_fit, owner_fit), y_fit)
        models[f"z, u, h (alpha {alpha:g})"] = (with_history, fitted)
    print(f"T={args.temperature}, position 1, fit rate {prior:.3f}")
    for name, (features, w) in models.items():
        cells = []
        for split, (x, y, owner) in data.items():
            p = torch.sigmoid(features(x, y, owner) @ w[:-1] + w[-1])
            m = calibration_metrics([(0, float(a), bool(b)) for a, b in zip(p, y)])[0]
            cells.append(f"{split} ({m['n']}): ECE {100 * m['ece']:.2f}% (floor {100 * m['ece_floor']:.2f}) "
                         f"AUROC {m['auroc']:.3f} Brier {m['brier']:.4f}")
        print(f"{name}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
