"""DSpark under the confidence schedulers: whatever budgets Algorithm 1 or the async top-K picks per
request, fp32 greedy output is plain decoding's and sampled output follows the target's
distribution, no round exceeds the token budget, blocks cut at Algorithm 1's horizon verify what
whole ones would, and a sampled draft's confidence never depends on the draft itself."""

from __future__ import annotations

import json

import pytest

from engine.prefix_scheduler import PrefixScheduler
from engine.sps import SpsTable, hardware_id
from tests.drafters.helpers import logged_proposals, request
from tests.drafters.test_lossless import (PROMPTS, assert_follows, draw_pairs, drafter_dir, engine_for,
                                         exact_pair_distribution, run_batch, run_with_reports)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_scheduled_dspark_is_lossless(target, tmp_path_factory, mode):
    drafter = drafter_dir(target, tmp_path_factory, "dspark", "vanilla")
    plain = engine_for(target, "ar")
    spec = engine_for(target, "dspark", drafter, token_budget=12)  # 2 slots: requests queue, join, leave
    # Step time grows 15% per width step: drafts are worth verifying only where confidence is high.
    spec.schedule = PrefixScheduler(lambda rows, width: 1 / (1 + 0.15 * (width - 1)), mode=mode, budget=12)
    prompts = PROMPTS + [list(range(300, 340, 3)), [9, 9, 9, 4]]
    reqs = [request(p, max_new_tokens=20) for p in prompts]
    want = [r.output_ids for r in run_batch(plain, [request(p, max_new_tokens=20) for p in prompts])]
    got, reports = run_with_reports(spec, reqs)
    assert [r.output_ids for r in got] == want
    assert all(report.verify_tokens <= 12 for report in reports)
    # the scheduler gave different requests/rounds different budgets
    assert len({b for report in reports for b in report.budgets}) > 1


@pytest.mark.parametrize("lookup", [0, 1])
def test_drafts_cut_at_the_horizon_verify_what_whole_blocks_would(target, tmp_path_factory, lookup):
    """Algorithm 1's horizon ends the drafter's slot-by-slot sampling where the walk has ended:
    round by round the budgets are those the same engine picks from whole blocks, the output is
    plain decoding's, and blocks were cut. With prompt lookup, its rows' drafts take part."""
    drafter = drafter_dir(target, tmp_path_factory, "dspark", "vanilla")
    prompts = PROMPTS + [list(range(300, 340, 3))]
    want = [r.output_ids for r in run_batch(engine_for(target, "ar"),
                                            [request(p, max_new_tokens=24) for p in prompts])]
    runs = []
    for cut in (True, False):
        spec = engine_for(target, "dspark", drafter, scheduler="sync", lookup_min_match=lookup)
        spec.backoff = None   # drafts every round: the backoff reads wall-clock times
        spec.schedule = PrefixScheduler(lambda rows, width: 1 / (1 + 0.1 * (width - 1)), mode="sync")
        if not cut:
            spec.schedule.horizon = lambda seqs, caps: None
        drafted = []
        propose = spec.drafter.propose
        spec.drafter.propose = lambda seqs, horizon=None: drafted.append(propose(seqs, horizon)) or drafted[-1]
        got, reports = run_with_reports(spec, [request(p, max_new_tokens=24) for p in prompts])
        assert [r.output_ids for r in got] == want
        runs.append(([report.budgets for report in reports], [len(t) for p in drafted for t in p.tokens]))
    (budgets_cut, lengths_cut), (budgets_whole, lengths_whole) = runs
    assert budgets_cut == budgets_whole
    assert any(0 < b < 5 for round_budgets in budgets_cut for b in round_budgets)
    assert min(lengths_cut) < 5 == max(lengths_whole)
    assert sum(lengths_cut) < sum(lengths_whole)


@pytest.mark.parametrize("kind,lookup", [("dspark", 0), ("dspark", 1), ("eagle3", 0)])
def test_a_seeded_sampled_request_has_the_tokens_of_plain_decoding_whatever_drafts_it(target, tmp_path_factory,
                                                                                      kind, lookup):
    """A seed fixes a sampled request's output (engine/sampling.py): plain decoding alone gives the
    same tokens as a drafter behind prompt lookup, through Algorithm 1, beside requests that join
    and leave. Rejection sampling commits a draft-dependent token, so these differed."""
    def sampled(prompt: list[int], seed: int | None):
        return request(prompt, temperature=0.8, top_p=0.9, max_new_tokens=20, seed=seed)

    prompts = PROMPTS + [list(range(300, 340, 3)), [9, 9, 9, 4]]
    plain = engine_for(target, "ar")
    want = [plain.generate(sampled(p, seed)).output_ids for seed, p in enumerate(prompts)]
    drafter = drafter_dir(target, tmp_path_factory, kind, None if kind == "eagle3" else "vanilla")
    spec = engine_for(target, kind, drafter, token_budget=12, lookup_min_match=lookup)
    spec.schedule = PrefixScheduler(lambda rows, width: 1 / (1 + 0.15 * (width - 1)), mode="sync", budget=12)
    # an unseeded request in the line too: what it draws must not move the seeded ones
    got = run_batch(spec, [sampled(p, seed) for seed, p in enumerate(prompts)] + [sampled(PROMPTS[0], None)])
    assert [r.output_ids for r in got[:-1]] == want
    if kind == "dspark":     # the aligned drafter is right often enough to accept drafts
        assert sum(r.stats.accepted_tokens for r in got) > 0


def test_engine_profiles_sps_once_and_caches_it(target, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path_factory.mktemp("cache")))
    drafter = drafter_dir(target, tmp_path_factory, "dspark", "vanilla")
    from engine.loading import cache_root

    engine_for(target, "dspark", drafter, scheduler="sync")
    files = list((cache_root() / "sps").glob("*.json"))
    assert len(files) == 1 and f"-{hardware_id('cpu')}-" in files[0].name  # per processor
    table = SpsTable.load(files[0])
    assert table.rows[0] == 1 and table.widths == list(range(1, 9))  # block 7: up to 8 tokens a row
    assert all(s > 0 for line in table.measured for s in line)
    engine_for(target, "dspark", drafter, scheduler="async")  # same key: loaded, not profiled again
    assert list((cache_root() / "sps").glob("*.json")) == files


def test_backoff_rounds_stay_lossless(target, tmp_path_factory):
    """A scheduler that never finds drafts worth verifying: the engine stops drafting for a while
    (rounds without a proposal), and the output is still plain decoding's."""
    drafter = drafter_dir(target, tmp_path_factory, "dspark", "vanilla")
    plain = engine_for(target, "ar")
    spec = engine_for(target, "dspark", drafter, scheduler="sync")
    spec.schedule = PrefixScheduler(lambda rows, width: 1.0 / width, mode="sync")  # W tokens: W times slower
    reqs = [request(p, max_new_tokens=24) for p in PROMPTS]
    want = [r.output_ids for r in run_batch(plain, [request(p, max_new_tokens=24) for p in PROMPTS])]
    got = run_batch(spec, reqs)
    assert [r.output_ids for r in got] == want
    assert spec.backoff is not None
    assert all(r.stats.drafted_tokens < r.stats.rounds * 5 for r in got)  # it backed off: rounds without drafts


class Alternating:
    """A draft policy fixed in advance (the backoff's interface): the requests take turns, one
    round drafting for the first, the next for the second."""

    def __init__(self):
        self.rounds = 0

    def drafting(self, request_ids: list[str]) -> list[bool]:
        self.rounds += 1
        return [(self.rounds + i) % 2 == 0 for i in range(len(request_ids))]

    def observe(self, *args) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


@pytest.mark.parametrize("kind,markov_type", [("dspark", "vanilla"), ("eagle3", None)])
def test_drafting_for_some_requests_only_is_lossless_and_keeps_the_drafter_context(target, tmp_path_factory,
                                                                                 kind, markov_type):
    """Rounds where one request drafts and the other only verifies its anchor: the output is plain
    decoding's, and a proposal made after skipped rounds equals the one an every-round drafter makes
    from the same prefix (the skipped rounds' features reached the drafter)."""
    drafter = drafter_dir(target, tmp_path_factory, kind, markov_type)
    want = [r.output_ids for r in run_batch(engine_for(target, "ar"), [request(p, max_new_tokens=30) for p in PROMPTS])]
    every_round = engine_for(target, kind, drafter)
    reference = logged_proposals(every_round)
    run_batch(every_round, [request(p, max_new_tokens=30) for p in PROMPTS])
    taking_turns = engine_for(target, kind, drafter)
    taking_turns.backoff = Alternating()
    proposals = logged_proposals(taking_turns)
    got, reports = run_with_reports(taking_turns, [request(p, max_new_tokens=30) for p in PROMPTS])
    assert [r.output_ids for r in got] == want
    assert any(report.drafted == 1 and report.batch_size == 2 for report in reports)
    shared = proposals.keys() & reference.keys()
    assert len(shared) >= 4
    assert all(proposals[k] == reference[k] for k in shared)


def test_default_method_is_dspark_scheduled_where_a_drafter_is_at_hand(target, tmp_path_factory):
    """`method = "auto"` (the default): the embedded model gets its shipped DSpark drafter through
    Algorithm 1 with prompt lookup ahead of it; a model without a drafter decodes plainly; what the
    operator set is kept."""
    from engine.build import SHIPPED_DRAFTERS, resolve_method
    from engine.config import EMBEDDED_MODEL, LOOKUP_MIN_MATCH, EngineConfig

    embedded = resolve_method(EngineConfig())
    assert (embedded.method, embedded.scheduler, embedded.drafter) == ("dspark", "sync", None)
    assert embedded.lookup_min_match == LOOKUP_MIN_MATCH
    assert EMBEDDED_MODEL in SHIPPED_DRAFTERS
    static = resolve_method(EngineConfig(scheduler="static"))
    assert (static.scheduler, static.lookup_min_match) == ("static", 0)   # no lookup under a full block
    assert resolve_method(EngineConfig(confidence_threshold=0.3)).scheduler == "static"
    assert resolve_method(EngineConfig(lookup_min_match=0)).lookup_min_match == 0
    assert resolve_method(EngineConfig(scheduler="async", lookup_min_match=3)).lookup_min_match == 3
    assert resolve_method(EngineConfig(ngram_max=1)).lookup_min_match == 1
    own = str(target.path)
    assert resolve_method(EngineConfig(model=own)).method == "ar"
    drafter = drafter_dir(target, tmp_path_factory, "dspark", "vanilla")
    assert resolve_method(EngineConfig(model=own, drafter=str(drafter))).method == "dspark"
    assert resolve_method(EngineConfig(model=own, method="ngram")).method == "ngram"
    engine = engine_for(target, "auto", drafter)
    assert engine.info.method == "dspark" and isinstance(engine.schedule, PrefixScheduler)


def test_a_sampled_drafts_confidence_does_not_depend_on_the_draft_itself(target, tmp_path_factory):
    """Appendix A: whether draft k is verified may depend only on what does not depend on draft k's
    own sampled value, or the drafts the draft distribution likes are accepted too often. So a
    sampled request's c_k, draft weights and all, is the same whichever x_k was drawn (it may
    depend on x_{k-1}); a greedy request's draft is its argmax, so nothing is drawn."""
    path = drafter_dir(target, tmp_path_factory, "dspark", "gated")
    config = json.loads((path / "config.json").read_text())
    block = config["block_size"]
    config.update(confidence_draft_weights=[2.0] * block)
    (path / "config.json").write_text(json.dumps(config))
    engine = engine_for(target, "dspark", path)
    engine.rng.seed(0)      # the generator's seed, so the anchor its first token makes is the same every run
    engine.add(request(PROMPTS[1], temperature=1.5, max_new_tokens=8, seed=None))   # drafts from its generator
    while not engine.active:
        engine.step()
    seq = engine.active[0]
    by_prefix: dict[tuple[int, ...], set[float]] = {}
    for seed in range(40):
        seq.generator.manual_seed(seed)
        proposal = engine.drafter.propose([seq])
        tokens, confidence = proposal.tokens[0], proposal.confidence[0].tolist()
        for k in range(2):
            by_prefix.setdefault(tuple(tokens[:k]), set()).add(confidence[k])
    assert len({prefix for prefix in by_prefix if len(prefix) == 1}) > 2, "different first drafts were drawn"
    assert all(len(values) == 1 for values in by_prefix.values())


def test_sampled_output_follows_the_target_with_drafts_cut_at_the_horizon(target, tmp_path_factory):
    """Sampled requests under Algorithm 1, every round drafted and each block ended at the horizon
    (its q rows cut with it): the first two tokens follow the target's joint distribution."""
    if target.model.args.family != "qwen3":
        pytest.skip("one family is enough for the distribution test (the greedy tests cover both)")
    prompt, temperature, top_p, draws = PROMPTS[1], 0.9, 0.9, 400
    exact = exact_pair_distribution(target, prompt, temperature, top_p)
    engine = engine_for(target, "dspark", drafter_dir(target, tmp_path_factory, "dspark", "gated"), scheduler="sync")
    engine.backoff = None
    engine.schedule = PrefixScheduler(lambda rows, width: 1 / (1 + 0.05 * (width - 1)), mode="sync")
    proposed = []
    propose = engine.drafter.propose
    engine.drafter.propose = lambda seqs, horizon=None: proposed.append(propose(seqs, horizon)) or proposed[-1]
    counts, accepted = draw_pairs(engine, prompt, exact, temperature, top_p, draws)
    assert_follows(exact, counts, draws)
    assert accepted > 0
    assert all(len(p.tokens[0]) < 5 and len(p.probs[0]) == len(p.tokens[0]) for p in proposed)


def test_the_engine_reads_each_requests_history_as_calibrate_does(target, tmp_path_factory):
    """With a history term, a request's c_k adds v_k h, h its calibration error at position 1 over
    its earlier rounds (engine/drafters/confidence.py). The confidences the engine recorded while
    Algorithm 1 scheduled with them equal those `calibrate` computes offline from the same rounds,
    so the engine's h reads exactly the rounds before; greedy output stays plain decoding's."""
    from engine.train.sts import Scaling, predictions, rounds_from_records

    path = drafter_dir(target, tmp_path_factory, "dspark", "vanilla")
    config = json.loads((path / "config.json").read_text())
    block = config["block_size"]
    scaling = Scaling([0.8] * block, [-0.2] * block, [0.5] * block, [1.5] * block, 0.3)
    config.update(confidence_temperatures=scaling.temperatures, confidence_offsets=scaling.offsets,
                  confidence_draft_weights=scaling.draft_weights, confidence_history_weights=scaling.history_weights,
                  confidence_history_prior=scaling.history_prior)
    (path / "config.json").write_text(json.dumps(config))
    prompts = PROMPTS + [list(range(300, 340, 3))]
    want = [r.output_ids for r in run_batch(engine_for(target, "ar"), [request(p, max_new_tokens=40) for p in prompts])]
    spec = engine_for(target, "dspark", path, scheduler="sync")
    spec.backoff = None
    spec.schedule = PrefixScheduler(lambda rows, width: 1 / (1 + 0.1 * (width - 1)), mode="sync")
    got = run_batch(spec, [request(p, max_new_tokens=40) for p in prompts])
    assert [r.output_ids for r in got] == want
    history_free = Scaling(scaling.temperatures, scaling.offsets, scaling.draft_weights)
    for result in got:
        recorded = result.stats.confidence_samples
        rounds = rounds_from_records(recorded, result.stats.confidence_inputs)
        assert len(rounds) > 3
        offline = predictions([rounds], scaling)
        assert [(k, y) for k, _, y in offline] == [(k, y) for k, _, y in recorded]
        assert [p for _, p, _ in recorded] == pytest.approx([p for _, p, _ in offline], rel=1e-4, abs=1e-6)
        # the history moved the confidences: without it they differ
        plain = [p for _, p, _ in predictions([rounds], history_free)]
        assert max(abs(a - b) for a, b in zip(plain, [p for _, p, _ in recorded])) > 1e-2
