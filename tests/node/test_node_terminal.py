"""A worker's answer as `submit` prints it: exact to a pipe, without its control characters on a
real terminal (a pseudo-terminal here)."""

from __future__ import annotations

import io
import os
import tty

from node.commands.terminal import answer_printer, shown

HOSTILE = "ok\x1b[2J\x1b]0;owned\x07\rline two\n\tthree 👨\u200d👩\u00a0"


def test_a_pipe_gets_the_text_exactly():
    out = io.StringIO()
    answer_printer(out)(HOSTILE)
    assert out.getvalue() == HOSTILE


def test_a_terminal_gets_control_characters_as_escapes_but_lines_tabs_and_joiners_as_they_are():
    leader, follower = os.openpty()
    tty.setraw(follower)       # no newline translation: the bytes written are the bytes read
    with open(follower, "w", encoding="utf-8", closefd=True) as terminal:
        answer_printer(terminal)(HOSTILE)
    written = os.read(leader, 4096).decode("utf-8")
    os.close(leader)
    assert written == "ok\\x1b[2J\\x1b]0;owned\\x07\\rline two\n\tthree 👨\u200d👩\u00a0"


def test_a_peers_one_line_string_escapes_every_unprintable_character():
    assert shown("gpu\nFAKE ROW\x1b[31m") == "gpu\\nFAKE ROW\\x1b[31m"
