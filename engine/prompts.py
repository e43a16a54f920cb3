"""Prompt sets in the `{"turns": [...]}` JSON-lines format of the evaluation sets."""

from __future__ import annotations

import json
from pathlib import Path


class PromptFileError(ValueError):
    pass


def load_first_turns(path: Path, limit: int | None = None) -> list[str]:
    """The first user turn of each line (what the field reports accepted length on)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()   # a BOM (Windows editors) is no text
    except OSError as exc:
        raise PromptFileError(f"cannot read prompt file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path} is not UTF-8 text (byte {exc.start}): expected JSON lines") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            turns = json.loads(line)["turns"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PromptFileError(f"{path}:{n}: expected a JSON object with a 'turns' list") from None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise PromptFileError(f"{path}:{n}: 'turns' must be a non-empty list of strings")
        prompts.append(turns[0])
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts
