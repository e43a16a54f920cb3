"""A data dir made by a start that then fails is removed again: a refused start leaves nothing behind
(the node's key and ledger, the gateway's client key and receipt store)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DataDir:
    made: Path | None      # the topmost directory this start created; None: the data dir was there
    kept: bool = False     # set once the start is far enough along: from then on the dir stays, whatever happens


@contextlib.contextmanager
def removed_if_the_start_fails(path: Path) -> Iterator[DataDir]:
    """Note which directories of `path` do not exist yet; if the block raises before it sets `kept`,
    remove the topmost of them with all that was written in it (Ctrl-C included)."""
    made = path.absolute()
    while not made.parent.exists():
        made = made.parent
    data_dir = DataDir(None if made.exists() else made)
    try:
        yield data_dir
    except BaseException:
        if data_dir.made is not None and not data_dir.kept:
            shutil.rmtree(data_dir.made, ignore_errors=True)
        raise
