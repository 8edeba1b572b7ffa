"""The report's HTML page in a real browser: headless Chromium (the Debian package `chromium`; .ci/run installs it)
draws the leaderboard with every chip, and clicking a header sorts the table (a script appended to a copy of the
page clicks, the DOM after the clicks is dumped)."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from matplotlib import image as mpimg

from mlxllama.bench import reference, report
from mlxllama.bench.submissions import write
from test_bench_submissions import sample_submission

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CLICKS = """<script>
const th = name => Array.from(document.querySelectorAll("#leaderboard thead th")).find(t => t.textContent === name);
const column = i => Array.from(document.querySelectorAll("#leaderboard tbody tr")).map(r => r.cells[i].textContent);
const tg = Array.from(document.querySelectorAll("#leaderboard thead th")).findIndex(t => t.textContent === "best tg t/s");
const seen = {before: column(tg)};
th("best tg t/s").click(); seen.ascending = column(tg);
th("best tg t/s").click(); seen.descending = column(tg);
th("chip").click(); seen.chips = column(1);
document.body.setAttribute("data-seen", JSON.stringify(seen));
</script>
</body>"""


def chromium() -> str:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium here: install the Debian package `chromium` (apt-get install -y chromium), as .ci/run "
                "does")


def browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", *args, page.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


class Leaderboard(HTMLParser):
    """Rows of table#leaderboard and the body's data-seen attribute, from a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.rows, self.seen, self._in, self._cell = [], None, False, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body" and "data-seen" in attrs:
            self.seen = json.loads(attrs["data-seen"])
        if tag == "table":
            self._in = attrs.get("id") == "leaderboard"
        elif self._in and tag == "tr":
            self.rows.append([])
        elif self._in and tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        elif self._in and tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def numbers(cells: list[str]) -> list[float]:
    return [float(c) for c in cells if c != "-"]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, list[dict]]:
    d = tmp_path_factory.mktemp("subs")
    for chip in ("M2 Max", "M1 Ultra"):
        write(sample_submission(chip, tg=(61.0, 64.0)), d)
    rep = report.write_report([reference.package_dir(), d], d / "out")
    subs, _ = report.load([reference.package_dir(), d])
    return rep.html_path, report.leaderboard(subs)


def test_page_draws_every_chip_and_sorts_on_click(page, tmp_path):
    html_path, board = page
    clicked = tmp_path / "clicked.html"
    clicked.write_text(html_path.read_text().replace("</body>", CLICKS))
    dom = Leaderboard()
    dom.feed(browse(clicked, tmp_path, "--dump-dom").stdout)
    header, *rows = dom.rows
    assert header == report.LEADERBOARD_COLUMNS
    assert len(rows) == len(board)
    chips = {r["chip"] for r in board}
    assert {r[1] for r in rows} == chips and len(chips) == 21  # the #4167 chips (the samples run on two of them)
    assert sorted(r[1] for r in rows if r[3] == "mlx") == ["M1 Ultra 64c", "M2 Max 38c"]  # the two samples
    seen = dom.seen
    assert seen is not None, "the page's scripts did not run"
    tg = numbers(seen["ascending"])
    assert tg == sorted(tg) and numbers(seen["descending"]) == sorted(tg, reverse=True)
    assert sorted(seen["before"]) == sorted(seen["ascending"])  # the same rows, reordered
    assert seen["chips"] == sorted(seen["chips"], key=str.lower)


def test_page_renders_the_plot(page, tmp_path):
    html_path, _ = page
    shot = tmp_path / "shot.png"
    browse(html_path, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
    img = mpimg.imread(shot)
    assert img.shape[:2] == (1600, 1280)
    rgb = img[..., :3]
    # the embedded plot (1000 px wide) draws coloured points and lines: pixels that are neither grey nor white
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.3
    assert coloured.sum() > 500
