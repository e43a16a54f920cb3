"""`generate` and `bench` from the command line: real runs on a tiny model, and refusals."""

import json
import statistics

import pytest
import torch

from engine.bench_batch import add_matched_throughput
from engine.loading import load_target
from node.cli import main
from tests.conftest import EVAL_DIR
from tests.drafters.helpers import write_drafter


def test_generate_streams_text(tiny_llama, capsys):
    assert main(["generate", "--model", str(tiny_llama), "--prompt", "hello", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out and "6 tokens" in err


def test_generate_refuses_an_unknown_model(capsys):
    assert main(["generate", "--model", "/no/such/model", "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err


def test_bench_reports_methods_side_by_side(tiny_llama, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["bench", "--model", str(tiny_llama), "--prompts", str(EVAL_DIR / "humaneval.jsonl"),
                 "--limit", "2", "--max-new-tokens", "8", "--methods", "ar,ngram", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert rows["ngram"]["exact_match"] == 1.0 and rows["ar"]["tau"] == 1.0
    assert rows["ngram"]["tokens_per_s"] > 0 and report["n_prompts"] == 2
    assert "ngram" in capsys.readouterr().out


def test_bench_compares_drafters_of_each_kind_in_one_run(tiny_llama, tmp_path, capsys):
    target = load_target(str(tiny_llama), torch.float32)
    dspark = write_drafter(target, tmp_path / "dspark", "dspark", block_size=7, target_layer_ids=[-1, 0])
    dflash = write_drafter(target, tmp_path / "dflash", "dflash", block_size=7, target_layer_ids=[-1, 0])
    out = tmp_path / "report.json"
    code = main(["bench", "--model", str(tiny_llama), "--prompts", str(EVAL_DIR / "gsm8k.jsonl"), "--limit", "2",
                 "--max-new-tokens", "10", "--methods", "ar,dspark,dflash,dspark-scheduled",
                 "--method-drafter", f"dspark={dspark}",
                 "--method-drafter", f"dflash={dflash}", "--json", str(out), "--plots", str(tmp_path / "img")])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["drafters"] == {"dspark": str(dspark), "dflash": str(dflash), "dspark-scheduled": str(dspark)}
    rows = {r["method"]: r for r in report["results"]}
    # dspark-scheduled: the same drafter served through Algorithm 1 (fewer tokens verified per round)
    assert all(rows[m]["exact_match"] == 1.0 for m in ("dspark", "dflash", "dspark-scheduled"))
    assert len(rows["dspark"]["per_position_acceptance"]) == 7 and rows["dspark"]["calibration"] is not None
    assert rows["dflash"]["calibration"] is None   # no confidence head
    assert (tmp_path / "img" / "acceptance-gsm8k-t0.png").stat().st_size > 0
    # The serving benchmark's dspark-* methods take the dspark drafter given the same way.
    serving = tmp_path / "serving.json"
    assert main(["bench", "--model", str(tiny_llama), "--prompts", str(EVAL_DIR / "gsm8k.jsonl"), "--limit", "1",
                 "--max-new-tokens", "6", "--methods", "dspark-fixed", "--method-drafter", f"dspark={dspark}",
                 "--concurrency", "1", "--json", str(serving)]) == 0
    assert json.loads(serving.read_text())["rows"][0]["tau"] is not None
    assert main(["bench", "--model", str(tiny_llama), "--prompts", str(EVAL_DIR / "gsm8k.jsonl"),
                 "--methods", "ar,dspark", "--method-drafter", "medusa=/x"]) == 2
    assert "METHOD=DIR" in capsys.readouterr().err


def test_serving_bench_rows_per_concurrency(tiny_llama, tmp_path, capsys):
    code = main(["bench", "--model", str(tiny_llama), "--prompts", str(EVAL_DIR / "mt-bench.jsonl"),
                 "--limit", "2", "--max-new-tokens", "12", "--methods", "ar,ngram", "--concurrency", "1,3",
                 "--repeats", "3", "--plots", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    assert [(r["method"], r["concurrency"]) for r in rows] == [("ar", 1), ("ngram", 1), ("ar", 3), ("ngram", 3)]
    # three runs per method and level, in rotating order; a row is their median, and its ratio to
    # ar is the median of the per-repeat ratios
    runs = [line.split()[1] for line in out.err.splitlines() if line.startswith("c=1 ")]
    assert runs == ["ar", "ngram", "ngram", "ar", "ar", "ngram"]
    for ar, ngram in (rows[0:2], rows[2:4]):
        assert ar["repeats"] == ngram["repeats"] == 3 and len(ngram["tokens_per_s_runs"]) == 3
        assert ngram["tokens_per_s"] == statistics.median(ngram["tokens_per_s_runs"])
        assert ar["tokens_per_s_vs_baseline"] == 1.0
        ratios = [n / a for n, a in zip(ngram["tokens_per_s_runs"], ar["tokens_per_s_runs"])]
        assert ngram["tokens_per_s_vs_baseline"] == pytest.approx(statistics.median(ratios))
    # every level serves all prompts (at least c): c=1 runs the 2 prompts one after the other
    assert [r["requests"] for r in rows] == [2, 2, 3, 3]
    assert all(r["output_tokens"] == 12 * r["requests"] for r in rows)
    # the first token comes after joining and before the request ends; 11 more follow it (a step
    # commits at most 1 + 8, so in a later step)
    assert all(0 < r["ttft_s"] <= r["ttft_p90_s"] < r["wall_s"] and 0 < r["tpot_s"] < r["wall_s"] for r in rows)
    assert (tmp_path / "serving-throughput.png").stat().st_size > 0
    # on its own curve the baseline matches itself
    assert [r["per_user_vs_baseline_at_matched_throughput"] for r in rows[0::2]] == [1.0, 1.0]


def test_per_user_speed_at_matched_throughput():
    def row(method, aggregate, per_user):
        return {"method": method, "tokens_per_s": aggregate, "per_user_tokens_per_s": per_user}
    rows = [row("ar", 10, 10), row("ar", 30, 7.5), row("ar", 18, 9.6),   # one level out of order
            row("x", 14, 12), row("x", 30, 6), row("x", 40, 5), row("x", 8, 20)]
    add_matched_throughput(rows, "ar")
    ratios = [r["per_user_vs_baseline_at_matched_throughput"] for r in rows]
    # ar's per-user speed at 14 tokens/s aggregate: halfway between its levels at 10 and 18
    assert ratios[3] == pytest.approx(12 / 9.8)
    assert ratios[4] == pytest.approx(6 / 7.5)
    # outside what ar was measured at, there is nothing to compare with
    assert ratios[5] is None and ratios[6] is None
    assert ratios[:3] == [1.0, 1.0, 1.0]
    # exactly 1.0 at the upper end of a segment too, where y0 + (y1 - y0) is not y1 in floats
    rows = [row("ar", 10, 38.35), row("ar", 30, 1.1)]
    add_matched_throughput(rows, "ar")
    assert [r["per_user_vs_baseline_at_matched_throughput"] for r in rows] == [1.0, 1.0]


def test_bench_refuses_bad_input(capsys):
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--methods", "ar,warp"]) == 2
    assert "warp" in capsys.readouterr().err
    assert main(["bench", "--prompts", "/nonexistent.jsonl", "--methods", "ar"]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--concurrency", "0,x"]) == 2
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--concurrency", "1", "--repeats", "0"]) == 2
    assert "--repeats must be in 1..100" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--methods", "ar", "--repeats", "3"]) == 2
    assert "--repeats is for the serving benchmark" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--methods", "ar,ngram,ar",
                 "--concurrency", "1"]) == 2
    assert "each method once" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--methods", "hf-greedy",
                 "--temperature", "1.0", "--model", "/no/such"]) == 2
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--methods", "ar", "--device", "gpu"]) == 2
    assert "'gpu' is not a torch device" in capsys.readouterr().err
