"""The dashboard's layout in Debian's headless Chromium (Playwright): it fits a phone without sideways
scrolling, its cards fill every row at desktop and tablet widths, and its scrolling lists take keyboard
focus."""

from __future__ import annotations

import pytest

from node.identity import Identity

from .harness import ARTIFACTS, NodeUnderTest, new_job_id


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = NodeUnderTest(tmp_path_factory.mktemp("browser")).start()
    yield n
    n.stop()


def test_the_scrolling_lists_can_be_reached_from_the_keyboard(node, page):
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    reached = set()
    for _ in range(12):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.id"))
    assert {"peers-seen", "recent-jobs-list", "problem-list"} <= reached, reached


def test_a_phone_sees_the_page_without_sideways_scrolling_and_legible_charts(node, browser):
    buyer, job = Identity.generate(), new_job_id()      # a recent job of its own, whatever ran before
    node.admit(job, buyer)
    node.finish(job, buyer, 12)
    context = browser.new_context(viewport={"width": 375, "height": 800}, device_scale_factor=2)
    try:
        page = context.new_page()
        page.goto(node.url + "/")
        page.wait_for_function("document.getElementById('live').textContent === 'live'")
        page.wait_for_function("document.querySelector('#chart-tps text') !== null")
        # The peer ID (52 characters) pushed the page to 587 px; the charts shrank their labels to 4 px.
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        label_heights = page.evaluate("""[...document.querySelectorAll('.chart text')]
            .map(t => t.getBoundingClientRect().height)""")
        assert label_heights and min(label_heights) >= 10
        # Nor does a card hide a table's right-hand columns behind a sideways scroll of its own.
        page.wait_for_function("document.querySelectorAll('#recent-jobs tbody td').length > 1")
        hidden = page.evaluate("""[...document.querySelectorAll('.card, .card .scroll')]
            .filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.id)""")
        assert hidden == []
        page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    finally:
        context.close()


@pytest.mark.parametrize("width", [1440, 900])
def test_every_row_of_cards_spans_the_page_without_a_gap(node, browser, width):
    context = browser.new_context(viewport={"width": width, "height": 900})
    try:
        page = context.new_page()
        page.goto(node.url + "/")
        page.wait_for_function("document.getElementById('live').textContent === 'live'")
        rows = page.evaluate("""(() => {
            const main = document.querySelector('main'), style = getComputedStyle(main);
            const rows = {};
            for (const card of document.querySelectorAll('main > .card')) {
                const box = card.getBoundingClientRect();
                (rows[Math.round(box.top)] ??= []).push([box.left, box.right, card.id]);
            }
            return {left: main.getBoundingClientRect().left + parseFloat(style.paddingLeft),
                    right: main.getBoundingClientRect().right - parseFloat(style.paddingRight),
                    gap: parseFloat(style.columnGap), rows: Object.values(rows)};
        })()""")
        for row in rows["rows"]:
            row.sort()
            ids = [card[2] for card in row]
            assert row[0][0] == pytest.approx(rows["left"], abs=1), ids
            assert row[-1][1] == pytest.approx(rows["right"], abs=1), ids     # no empty column at the right
            for (_, right, _), (left, _, _) in zip(row, row[1:]):
                assert left - right == pytest.approx(rows["gap"], abs=1), ids
        # nor is a card too narrow for its table (the draft sources' was, at 900 px)
        assert page.evaluate("""[...document.querySelectorAll('.card, .card .scroll')]
            .filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.id)""") == []
    finally:
        context.close()
