"""Prompt files (`{"turns": [...]}` JSON lines): read as written, refused naming the file and line."""

from __future__ import annotations

import json

import pytest

from engine.prompts import PromptFileError, load_first_turns


def test_a_file_saved_with_a_byte_order_mark_reads_as_written(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"turns": ["Hello", "again"]}), "", json.dumps({"turns": ["Café?"]}, ensure_ascii=False)]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8-sig"))   # Notepad's UTF-8
    assert load_first_turns(path) == ["Hello", "Café?"]
    assert load_first_turns(path, limit=1) == ["Hello"]


@pytest.mark.parametrize("content,message", [
    ("café".encode("latin-1"), "is not UTF-8 text (byte 3)"),
    (b'{"turns": ["a"]}\n{"prompt": "b"}\n', ":2: expected a JSON object with a 'turns' list"),
    (b'{"turns": []}\n', ":1: 'turns' must be a non-empty list of strings"),
    (b"\n\n", "holds no prompts"),
])
def test_a_file_that_is_not_prompts_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(PromptFileError, match=str(path).replace(".", r"\.")) as refused:
        load_first_turns(path)
    assert message in str(refused.value)
