"""A refused setting said in the words of the command line: the flag that set it, not the field."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError


def flag_errors(exc: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """One problem per refused field, named by its flag (`--block-size: ...`): the field's name with
    dashes, or `flags[field]` where the flag is called otherwise. A check across fields (no location)
    keeps its own message, which names them."""
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        field = "_".join(str(part) for part in error["loc"])
        if not field:
            problems.append(message)
            continue
        flag = (flags or {}).get(field) or "--" + field.replace("_", "-")
        problems.append(f"{flag}: {message}")
    return "; ".join(problems)
