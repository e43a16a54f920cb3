"""Target-generated training responses: each request at the temperature the recipe asks for."""

from __future__ import annotations

from engine.build import build_engine
from engine.config import EngineConfig
from engine.train.data import generated_samples


def _generate(target, prompts, temperatures):
    engine = build_engine(EngineConfig(model=str(target.path), method="ar", max_batch=4, max_context=256), target)
    return generated_samples(engine, target.tokenizer, prompts, max_new_tokens=24, max_len=256, minutes=5,
                             seed=3, temperatures=temperatures, log=lambda _: None)


def _replies(samples):
    return sorted(tuple(t for t, m in zip(s.input_ids, s.loss_mask) if m) for s in samples)


def test_greedy_responses_repeat_and_sampled_ones_vary(target):
    """Four copies of one prompt: at T=0 (any seed) one reply four times; cycling (0, 1.5) gives
    two equal greedy replies and two sampled ones (seeds differ per request) that are not."""
    prompts = ["Write a function that adds two numbers."] * 4
    greedy = _replies(_generate(target, prompts, (0.0,)))
    assert len(greedy) == 4 and len(set(greedy)) == 1
    mixed = _replies(_generate(target, prompts, (0.0, 1.5)))
    assert mixed.count(greedy[0]) == 2 and len(set(mixed)) == 3


def test_a_prompt_with_no_room_for_a_reply_is_skipped(target):
    """A stdlib docstring can outgrow max_len (Python 3.12's did): that prompt is dropped, the
    others are still answered, and nothing is refused mid-run."""
    prompts = ["Write a function that adds two numbers.", "Explain this: " + "word " * 300]
    samples = _generate(target, prompts, (0.0,))
    assert len(samples) == 1 and "adds two numbers" in target.tokenizer.decode(samples[0].input_ids)


def test_generation_prompts_are_unique_mixed_and_not_from_the_eval_sets():
    """Each request once (a repeated greedy request repeats its reply), the three kinds in turn, the
    calibration hold-outs left out, and nothing taken from shared/eval."""
    from engine.train.data import GENERAL_PROMPTS, function_prompts, generation_prompts, math_prompts
    from tests.conftest import EVAL_DIR, eval_prompts

    prompts = generation_prompts(seed=42)
    functions, held_out = function_prompts()
    assert len(prompts) == len(set(prompts)) > 2 * len(functions)
    assert prompts[0] == functions[0] and prompts[2] == math_prompts(1, 42)[0]
    assert set(GENERAL_PROMPTS) <= set(prompts) and not set(held_out) & set(prompts)
    evaluation = {p for f in EVAL_DIR.glob("*.jsonl") for p in eval_prompts(f.name, None)}
    assert evaluation and not evaluation & set(prompts)


def test_code_requests_come_in_both_shapes_and_stubs_are_python():
    """A third of the stdlib requests in prose, the rest as a stub (signature + docstring) in a code
    block, in both the training and the held-out lists; every stub parses, without a warning, to a
    documented function."""
    import ast
    import re
    import warnings

    from engine.train.data import STUB_TASKS, function_prompts

    for prompts in function_prompts():
        stubs = [p for p in prompts if "```python\n" in p]
        assert 0.5 < len(stubs) / len(prompts) < 0.8
        for prompt in stubs:
            assert any(prompt.startswith(task.split("{stub}")[0]) for task in STUB_TASKS)
            code = re.search(r"```python\n(.*)\n```", prompt, re.S).group(1)
            with warnings.catch_warnings():
                warnings.simplefilter("error")    # an invalid escape in a docstring is a warning
                (fn,) = ast.parse(code + "\n    ...").body
            assert isinstance(fn, ast.FunctionDef) and ast.get_docstring(fn).strip()
