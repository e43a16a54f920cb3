"""Tokens a round that prompt lookup alone commits on the target's own greedy replies, from each
request's own text and with the text of the earlier requests too (engine/drafters/corpus.py).

Greedy output does not depend on the drafts, so one plain-decoding pass gives every reply, and
each lookup policy is replayed on them: a round proposes up to `block` tokens, commits the matching
prefix plus one. The requests are served one after another, the sets interleaved (prompt i of each
set, then prompt i + 1); the corpus holds the earlier requests' prompts and replies, one scope.

    python scripts/corpus_replay.py --eval-dir ../shared/eval --limit 24 --replies /tmp/replies.json
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import torch

from engine.api import GenerationRequest, GenerationResult, SamplingParams
from engine.bench import BenchSettings, chat_ids
from engine.build import DTYPES, build_engine
from engine.config import EMBEDDED_MODEL
from engine.drafters.corpus import CorpusIndex
from engine.drafters.ngram import NgramIndex
from engine.loading import load_target
from engine.prompts import load_first_turns

SETS = ("humaneval", "mbpp", "gsm8k", "mt-bench")


def greedy_replies(eval_dir: Path, limit: int, max_new_tokens: int) -> dict[str, list[list[list[int]]]]:
    """Per set, [prompt ids, reply ids] of plain decoding in bf16, 16 requests at a time."""
    settings = BenchSettings(model=EMBEDDED_MODEL, methods=["ar"], max_new_tokens=max_new_tokens, dtype="bfloat16")
    target = load_target(settings.model, DTYPES["bfloat16"])
    engine = build_engine(settings.engine_config("ar", 16, 2048), target)
    out = {}
    for name in SETS:
        prompts = [chat_ids(target.tokenizer, p) for p in load_first_turns(eval_dir / f"{name}.jsonl", limit)]
        ids = {uuid.uuid4().hex: p for p in prompts}
        for rid, p in ids.items():
            engine.add(GenerationRequest(rid, tuple(p), SamplingParams(max_new_tokens=max_new_tokens)))
        replies = {}
        while engine.has_work:
            for event in engine.step()[0]:
                if isinstance(event, GenerationResult):
                    replies[event.request_id] = list(event.output_ids)
        out[name] = [[p, replies[rid]] for rid, p in ids.items()]
    return out


def replay(order: list[tuple[str, list[int], list[int]]], block: int, min_match: int, max_n: int,
           corpus: CorpusIndex | None) -> dict[str, float]:
    """Tokens committed per round, per set."""
    rounds, committed = {}, {}
    for n, (name, prompt, reply) in enumerate(order):
        own = NgramIndex(max_n)
        tokens, i = list(prompt) + reply[:1], 1        # the first token comes from prefill
        while i < len(reply):
            own.update(tokens)
            draft = own.lookup(tokens, block, min_match)
            if corpus is not None:
                corpus.extend(str(n), "client", tokens)
                draft = draft or corpus.lookup("client", tokens, block)
            accepted = 0
            while accepted < len(draft) and i + accepted < len(reply) and draft[accepted] == reply[i + accepted]:
                accepted += 1
            step = min(accepted + 1, len(reply) - i)
            tokens += reply[i:i + step]
            i += step
            rounds[name] = rounds.get(name, 0) + 1
            committed[name] = committed.get(name, 0) + step
        if corpus is not None:
            corpus.extend(str(n), "client", list(prompt) + reply)
            corpus.finish(str(n))
    return {name: committed[name] / rounds[name] for name in rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-dir", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--replies", type=Path, required=True, help="cache of the greedy replies (written if absent)")
    parser.add_argument("--block", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not args.replies.exists():
        args.replies.write_text(json.dumps(greedy_replies(args.eval_dir, args.limit, args.max_new_tokens)))
    replies = json.loads(args.replies.read_text())
    order = [(name, *replies[name][i]) for i in range(args.limit) for name in SETS]
    policies = {"own text": None, "own + corpus": CorpusIndex(1 << 24, 2, 3)}
    for label, corpus in policies.items():
        tau = replay(order, args.block, 2, 3, corpus)
        print(f"{label:13s} " + "  ".join(f"{name} {tau[name]:.2f}" for name in SETS))


if __name__ == "__main__":
    main()
