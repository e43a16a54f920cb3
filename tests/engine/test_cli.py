"""`generate` and `bench` from the command line: real runs on a tiny model, and refusals."""

import json

from node.cli import main
from tests.conftest import EVAL_DIR


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


def test_serving_bench_rows_per_concurrency(tiny_llama, tmp_path, capsys):
    code = main(["bench", "--model", str(tiny_llama), "--prompts", str(EVAL_DIR / "mt-bench.jsonl"),
                 "--limit", "2", "--max-new-tokens", "6", "--methods", "ar,ngram", "--concurrency", "1,3",
                 "--plots", str(tmp_path)])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["method"], r["concurrency"]) for r in rows] == [("ar", 1), ("ngram", 1), ("ar", 3), ("ngram", 3)]
    assert all(r["output_tokens"] == 6 * r["concurrency"] for r in rows)
    assert (tmp_path / "serving-throughput.png").stat().st_size > 0


def test_bench_refuses_bad_input(capsys):
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--methods", "ar,warp"]) == 2
    assert "warp" in capsys.readouterr().err
    assert main(["bench", "--prompts", "/nonexistent.jsonl", "--methods", "ar"]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--concurrency", "0,x"]) == 2
    assert main(["bench", "--prompts", str(EVAL_DIR / "mbpp.jsonl"), "--methods", "hf-greedy",
                 "--temperature", "1.0", "--model", "/no/such"]) == 2
