"""Training text, all of it available offline on this machine (reference §3.1, adapted).

Two sources, both recorded in the checkpoint's metadata:
  generated: the target's own responses (T=0.7, top-p 0.8, as DeepSpec regenerates its data) to
    prompts built here: code requests made from the Python standard library's own function
    signatures and docstrings (in prose, or as a stub to complete), word problems from templates,
    and general requests (a fixed list and task x topic pairs). None comes from the evaluation sets
    in shared/eval. Every 20th stdlib prompt is held out for calibration.
  stdlib: Python standard library source files cut at top-level definitions, as assistant replies
    to a request naming the module. The target scores this text (its distributions become the soft
    labels), which costs one forward per token instead of one decoding step.
Every sample is a chat: template + user turn (loss mask 0), assistant content + end of turn (1).
"""

from __future__ import annotations

import ast
import random
import sysconfig
import time
import uuid
from pathlib import Path

from engine.api import GenerationRequest, SamplingParams
from engine.engine import Engine
from engine.train.cache import Sample

HELD_OUT_EVERY = 20
MIN_LOSS_TOKENS = 14   # DeepSpec drops samples with fewer supervised tokens
GENERAL_PROMPTS = [
    "Explain how a hash table handles collisions.", "Write a short story about a lighthouse keeper.",
    "What are the main differences between TCP and UDP?", "Give three tips for writing clear emails.",
    "Summarize the water cycle for a ten-year-old.", "How does public-key cryptography work?",
    "Write a haiku about autumn rain.", "Describe the rules of chess in a few paragraphs.",
    "What is the difference between a list and a tuple in Python?", "Explain recursion with an example.",
    "How do vaccines train the immune system?", "Write a polite reply declining a meeting invitation.",
    "List five healthy breakfast ideas.", "Explain what a database index is and when to use one.",
    "What causes the seasons on Earth?", "Write a SQL query that counts orders per customer.",
    "How do I reverse a linked list? Show code.", "Explain the difference between git merge and git rebase.",
    "Write a bash script that backs up a directory with a date in the file name.",
    "What is gradient descent?", "Describe how a bill becomes a law.", "Explain big-O notation.",
    "Write a JavaScript function that debounces another function.", "How do solar panels make electricity?",
    "Give a recipe for a simple tomato soup.", "Explain the CAP theorem.", "What is a closure in programming?",
    "Write a limerick about a cat who codes.", "How should I prepare for a job interview?",
    "Explain how HTTPS keeps a connection private.", "Write a Python class for a bank account.",
    "What are prime numbers? Give a function that tests primality.", "Compare renting and buying a home.",
    "Explain the difference between weather and climate.", "Write a unit test for a function that adds two numbers.",
    "How does a binary search work? Include code.", "What is the role of mitochondria in a cell?",
    "Write a regular expression that matches e-mail addresses and explain it.",
    "Explain what Docker containers are.", "Translate 'good morning, how are you?' into French and Spanish.",
]

# General requests are built from these, every task with every topic (written for this recipe, none
# from shared/eval), so that a long generation run meets few repeats: the 40 fixed requests alone,
# cycled, came back ~28 times each over the prompt list, their greedy replies identical.
GENERAL_TASKS = [
    "Explain {t} to someone new to the subject.", "What are the most common misconceptions about {t}?",
    "Write a short blog post about {t}.", "Give a step-by-step beginner's guide to {t}.",
    "Compare two different approaches to {t} and say when each is better.",
    "Write three quiz questions about {t}, with answers.", "Summarize the history of {t} in a few paragraphs.",
    "Write a persuasive paragraph on why {t} matters.", "What should a beginner ask when learning about {t}?",
    "Write a short dialogue between a teacher and a student about {t}.",
]
GENERAL_TOPICS = [
    "photosynthesis", "compound interest", "the French Revolution", "machine learning", "composting",
    "volcanoes", "public speaking", "the stock market", "sleep hygiene", "electric cars", "the immune system",
    "jazz music", "climate change", "operating systems", "time management", "ancient Rome", "black holes",
    "negotiation", "urban gardening", "cybersecurity", "the printing press", "renewable energy",
    "nutrition labels", "version control", "plate tectonics", "neural networks", "personal budgeting",
    "the Renaissance", "3D printing", "bird migration", "remote work", "probability", "coffee brewing",
    "the human brain", "open-source software", "marathon training", "recycling", "the Silk Road",
    "compilers", "first aid",
]


def general_prompts(seed: int) -> list[str]:
    """The fixed requests and every task x topic pair, shuffled with `seed`, each once."""
    built = [task.format(t=topic) for task in GENERAL_TASKS for topic in GENERAL_TOPICS]
    prompts = list(dict.fromkeys(GENERAL_PROMPTS + built))
    random.Random(seed).shuffle(prompts)
    return prompts


# Word problems made here from templates (numbers drawn per prompt), so that the target's step-by-step
# arithmetic is in the data without touching GSM8K or MATH.
MATH_TEMPLATES = [
    "A baker makes {a} loaves a day and sells {b} of them. How many loaves are left after {c} days? "
    "Explain step by step.",
    "Tom has {a} marbles. He gives {b} to his sister and then buys {c} more. How many marbles does he have now?",
    "A train travels {a} km in {b} hours. At the same speed, how far does it go in {c} hours? Show your work.",
    "A shirt costs ${a}. It is on sale for {b}% off. What is the sale price? Reason step by step.",
    "What is the sum of all integers from {b} to {a}{c}? Explain how you computed it.",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
    "Solve for x: {b}x + {c} = {a}. Show each step.",
    "A class has {a} students; {b} of them walk to school and the rest take the bus in groups of {c}. "
    "How many buses are full, and how many students are left over?",
    "If {b} workers build a wall in {a} days, how long do {c} workers take at the same rate?",
    "What is the greatest common divisor of {a}{c} and {b}{c}? Explain the method.",
]


# How a word problem asks for its working; the last is the instruction Qwen-style math prompts end
# with (final answer in \\boxed{}), a form users copy.
MATH_ENDINGS = ["", " Explain your reasoning.", "\nShow your work and give the final answer.",
                "\nPlease reason step by step, and put your final answer within \\boxed{}."]


def math_prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(MATH_TEMPLATES).format(a=rng.randint(20, 400), b=rng.randint(2, 19), c=rng.randint(2, 9))
            + rng.choice(MATH_ENDINGS) for _ in range(count)]


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


# Code requests come in two shapes: a named function described in prose, and a function stub (its
# signature and docstring) in a code block to be completed. The second is how code benchmarks and
# many users ask; the target's reply then restates the stub before the body, a copy from the prompt
# the drafter only learns to make if its training data has it (the stub shape was missing until
# 2026-11-30, and τ on code-block prompts was the lowest of the four sets).
STUB_TASKS = [
    "Complete the following Python function:\n```python\n{stub}\n```",
    "Implement this function and make sure it does what the docstring says:\n```python\n{stub}\n```",
    "Write the body of the function below.\n```python\n{stub}\n```",
    "Here is a function signature with its documentation. Write a correct implementation.\n```python\n{stub}\n```",
]


def _stub(node: ast.FunctionDef, doc: str) -> str:
    body = "\n".join(("    " + line) if line else "" for line in doc.strip().splitlines())
    # A docstring with backslashes (regex and path docs) is a raw string in its source, as here.
    raw = "r" if "\\" in doc else ""
    return f'def {node.name}({ast.unparse(node.args)}):\n    {raw}"""{body.lstrip()}\n    """'


def function_prompts() -> tuple[list[str], list[str]]:
    """(training, held-out) code requests from stdlib signatures and docstrings, one per function:
    a third in prose, two thirds as stubs."""
    functions = {}   # a function copied into two modules would be held out and trained on
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 30:
                    functions.setdefault((node.name, ast.unparse(node.args), doc), node)
    prompts = []
    for n, ((name, _, doc), node) in enumerate(functions.items()):
        if n % 3:   # 3, not 2: every 20th (held out) then has both shapes too
            prompts.append(STUB_TASKS[n % len(STUB_TASKS)].format(stub=_stub(node, doc[:1200])))
        else:
            first = doc.strip().split("\n\n")[0].replace("\n", " ")
            args = ", ".join(a.arg for a in node.args.args)
            prompts.append(f"Write a Python function `{name}({args})`. {first}")
    train = [p for i, p in enumerate(prompts) if i % HELD_OUT_EVERY]
    return train, prompts[::HELD_OUT_EVERY]


def generation_prompts(seed: int) -> list[str]:
    """What the target answers for the training data: a stdlib function request, a general request
    and a word problem in turn, each list used until it runs out, no request twice (a repeated
    greedy request only repeats its reply)."""
    functions, _ = function_prompts()
    kinds = [functions, general_prompts(seed), math_prompts(len(functions), seed)]
    interleaved = [kind[i] for i in range(max(map(len, kinds))) for kind in kinds if i < len(kind)]
    return list(dict.fromkeys(interleaved))


def chat_sample(tokenizer, user: str, reply: list[int], end_of_turn: int | None, max_len: int,
                source: str) -> Sample | None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    reply = reply + ([end_of_turn] if end_of_turn is not None else [])
    ids = (prompt + reply)[:max_len]
    mask = ([0] * len(prompt) + [1] * len(reply))[:max_len]
    return Sample(ids, mask, source) if sum(mask) >= MIN_LOSS_TOKENS else None


def stdlib_samples(tokenizer, end_of_turn: int, token_budget: int, max_len: int, seed: int) -> list[Sample]:
    """Source chunks (cut before top-level def/class lines) as replies, until token_budget tokens."""
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    samples, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        module = path.stem
        for chunk in _chunks(text, tokenizer, max_len - 48):
            sample = chat_sample(tokenizer, f"Show me Python code from the `{module}` module.", chunk,
                                 end_of_turn, max_len, f"stdlib:{path.name}")
            if sample is not None:
                samples.append(sample)
                total += len(sample.input_ids)
            if total >= token_budget:
                return samples
    return samples


def _chunks(text: str, tokenizer, max_tokens: int) -> list[list[int]]:
    pieces, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith(("def ", "class ", "@")) and current:
            pieces.append("".join(current))
            current = []
        current.append(line)
    pieces.append("".join(current))
    out, buf = [], []
    for piece in pieces:
        ids = tokenizer.encode(piece, add_special_tokens=False)
        if buf and len(buf) + len(ids) > max_tokens:
            out.append(buf)
            buf = []
        buf = (buf + ids)[:max_tokens]
    if buf:
        out.append(buf)
    return out


GEN_TOP_P = 0.8   # DeepSpec's nucleus for regenerated responses


def sampling_params(temperature: float, max_new_tokens: int, seed: int) -> SamplingParams:
    """A training response's decoding: greedy at T=0, else top-p GEN_TOP_P at that temperature."""
    return SamplingParams(temperature=temperature, top_p=GEN_TOP_P if temperature else 1.0,
                          max_new_tokens=max_new_tokens, seed=seed)


def describe_sampling(temperatures: tuple[float, ...]) -> str:
    """What `generated_samples` did, for the checkpoint's metadata."""
    parts = (f"T={t:g} top_p={GEN_TOP_P:g}" if t else "T=0 (greedy)" for t in temperatures)
    return ", ".join(parts) + ", request n at T[n mod count]"


def generated_samples(engine: Engine, tokenizer, prompts: list[str], max_new_tokens: int, max_len: int,
                      minutes: float, seed: int, temperatures: tuple[float, ...] = (0.7,),
                      log=print) -> list[Sample]:
    """The target's responses to `prompts`, decoded in batches by the engine until the time is up
    (responses still running then are kept as they are: target text, just shorter). Request n is
    decoded at temperatures[n % len] (see `sampling_params`)."""
    deadline = time.monotonic() + minutes * 60
    queue = list(prompts)
    pending: dict[str, str] = {}
    samples: list[Sample] = []
    eos = set(engine.target.eos_token_ids)

    def keep(result) -> None:
        user = pending.pop(result.request_id)
        ids = list(result.output_ids)
        end = None
        if ids and ids[-1] in eos:
            end = ids.pop()
        sample = chat_sample(tokenizer, user, ids, end, max_len, "generated")
        if sample is not None:
            samples.append(sample)

    n = 0
    while queue or pending:
        while queue and len(pending) < engine.config.max_batch and time.monotonic() < deadline:
            user = queue.pop(0)
            ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
            ids = tuple(ids if isinstance(ids, list) else ids["input_ids"])
            if len(ids) > max_len - MIN_LOSS_TOKENS:   # a long docstring: no room left for a reply
                continue
            rid = uuid.uuid4().hex
            pending[rid] = user
            engine.add(GenerationRequest(rid, ids, sampling_params(temperatures[n % len(temperatures)],
                                                                   max_new_tokens, seed + n)))
            n += 1
        if time.monotonic() >= deadline:
            for result in engine.abort_all():
                keep(result)
            break
        events, _ = engine.step()
        for event in events:
            if hasattr(event, "finish_reason"):
                keep(event)
        if not queue and not pending:
            break
    log(f"generated {len(samples)} responses, {sum(sum(s.loss_mask) for s in samples)} tokens")
    return samples
