"""A drafter's confidence calibration on rounds it was not fitted on.

Decodes the calibration pool's prompts 60-176 (`calibrate --limit 60` fits on the first 60) and the
first 24 of each of the four evaluation sets with the drafter, full block (every draft verified, so
the rounds do not depend on the confidences), 128 tokens, 16 at a time. Then prints ECE per
position, and AUROC and Brier at position 1, for the scaling stored in the drafter's config.json
and for each `--compare` config (another calibration of the same weights) on the same rounds.

    python scripts/calibration_heldout.py --temperature 0 --eval-dir ../shared/eval \\
        --compare old-config.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.bench import chat_ids
from engine.build import SHIPPED_DRAFTERS, build_engine
from engine.calibration import calibration_metrics
from engine.config import EMBEDDED_MODEL, EngineConfig
from engine.prompts import load_first_turns
from engine.train.calibrate import collect, default_prompts
from engine.train.sts import Scaling, predictions

SETS = ("humaneval", "mbpp", "gsm8k", "mt-bench")


def stored_scaling(config: dict, greedy: bool, history: bool = True) -> Scaling:
    """The triple (and history term) a request at this temperature takes, as the engine resolves it."""
    suffix = "_greedy" if greedy and config.get("confidence_temperatures_greedy") else ""
    block = len(config["confidence_temperatures"])
    return Scaling(config["confidence_temperatures" + suffix],
                   config.get("confidence_offsets" + suffix) or [0.0] * block,
                   config.get("confidence_draft_weights" + suffix) or [0.0] * block,
                   config.get("confidence_history_weights" + suffix) if history else None,
                   config.get("confidence_history_prior" + suffix) if history else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", type=Path, default=SHIPPED_DRAFTERS[EMBEDDED_MODEL])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eval-dir", type=Path, required=True)
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other config.json files to score")
    args = parser.parse_args()
    greedy = args.temperature == 0
    config = json.loads((args.drafter / "config.json").read_text())
    scalings = {"stored": stored_scaling(config, greedy), "stored without h": stored_scaling(config, greedy, False)}
    scalings |= {str(path): stored_scaling(json.loads(path.read_text()), greedy) for path in args.compare}
    engine = build_engine(EngineConfig(method="dspark", drafter=str(args.drafter), max_batch=16, max_context=2048))
    splits = {"held-out pool": default_prompts(177, 0)[60:]}
    splits |= {name: load_first_turns(args.eval_dir / f"{name}.jsonl", 24) for name in SETS}
    data = {name: collect(engine, [chat_ids(engine.tokenizer, p) for p in texts], 128, args.temperature, 0)
            for name, texts in splits.items()}
    data["four sets"] = [request for name in SETS for request in data[name]]
    for split, requests in data.items():
        for label, scaling in scalings.items():
            rows = calibration_metrics(predictions(requests, scaling))
            print(f"T={args.temperature:g} | {split} | {label} | {rows[0]['n']} rounds | ECE % "
                  + " ".join(f"{100 * r['ece']:.2f}" for r in rows)
                  + f" | floor at 1 {100 * rows[0]['ece_floor']:.2f} | AUROC at 1 {rows[0]['auroc']:.3f}"
                  f" | Brier at 1 {rows[0]['brier']:.4f}", flush=True)


if __name__ == "__main__":
    main()
