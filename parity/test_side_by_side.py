"""The side-by-side reader and the mirror rule it shows: same names, same order in both backends.

No framework is imported here: the reader works on the source text alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest

from babygpt.config import BabyGPTError
from babygpt_sbs.align import PAIRS, ROOT, compare_pair, mirror_mismatches, source_lines
from babygpt_sbs.render import CHROMIUM_FLAGS, build_site, find_chromium, screenshot

JAX_DIR, TORCH_DIR = ROOT / "babygpt_jax", ROOT / "babygpt_torch"
PRESENT = [p for p in PAIRS if (JAX_DIR / f"{p}.py").exists() or (TORCH_DIR / f"{p}.py").exists()]


class Page(HTMLParser):
    """The parts of a generated page the tests read: each code column's lines, ids, index cells."""

    def __init__(self, text: str):
        super().__init__()
        self.columns: dict[str, list[str]] = {"jax": [], "torch": []}
        self.ids: set[str] = set()
        self.cells: list[str] = []  # text of each index-table <td>
        self._code: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "td":
            classes = (attrs.get("class") or "").split()
            self._code = next((b for b in ("jax", "torch") if "code" in classes and b in classes), None)
            if self._code is not None:
                self.columns[self._code].append("")
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append("".join(self._cell or []))
            self._code, self._cell = None, None

    def handle_data(self, data):
        if self._code is not None:
            self.columns[self._code][-1] += data
        if self._cell is not None:
            self._cell.append(data)


def read_page(path: Path) -> Page:
    return Page(path.read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sbs") / "side-by-side"
    build_site(out)
    return out


def test_backends_mirror_each_other():
    problems = mirror_mismatches()
    assert not problems, "the backends do not mirror each other:\n" + "\n".join(problems)


def test_site_has_every_pair_page_and_the_index(site):
    assert PRESENT, "no mirrored file found"
    index = (site / "index.html").read_text()
    for pair in PRESENT:
        assert (site / f"{pair}.html").exists()
        assert f'href="{pair}.html"' in index
    assert (site / "style.css").exists()
    # Offline: nothing fetched at view time, no script at all.
    for page in site.glob("*.html"):
        text = page.read_text()
        assert "<script" not in text and "http://" not in text and "https://" not in text, page.name


def test_style_sheet_is_the_packages_own_file(site):
    own = resources.files("babygpt_sbs").joinpath("style.css").read_text(encoding="utf-8")
    assert "table.sbs" in own
    assert (site / "style.css").read_text().startswith(own)  # then pygments' colours


def test_the_command_writes_the_same_site(site, tmp_path):
    out = tmp_path / "side-by-side"
    result = subprocess.run(
        [sys.executable, "-m", "parity.side_by_side", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in site.iterdir())
    for page in site.iterdir():
        assert (out / page.name).read_bytes() == page.read_bytes(), page.name


@pytest.mark.parametrize("pair", PRESENT)
def test_every_line_of_both_files_is_on_the_page_once_in_order(site, pair):
    page = read_page(site / f"{pair}.html")
    for backend, d in (("jax", JAX_DIR), ("torch", TORCH_DIR)):
        path = d / f"{pair}.py"
        expected = source_lines(path.read_text()) if path.exists() else []
        assert page.columns[backend] == expected, f"{backend} column of {pair}.html"


def test_aligned_rows_have_anchors_for_both_names(site):
    ids = read_page(site / "model.html").ids
    # __call__ (NNX) and forward (torch) are one row reachable under either name.
    assert {"GPT", "GPT.decode", "GPT.forward", "GPT.__call__", "CausalSelfAttention.forward"} <= ids


def test_identical_lines_sit_side_by_side_and_differing_ones_are_marked():
    report, sources = compare_pair("model", JAX_DIR, TORCH_DIR)
    left, right = (source_lines(sources[b]) for b in ("jax", "torch"))
    block = next(b for b in report.blocks if b.right is not None and b.right.key == "Block.forward")
    assert block.left.name == "Block.__call__"
    rows = {
        (left[r.left].strip(), right[r.right].strip()): r.status
        for r in block.rows
        if r.left is not None and r.right is not None
    }
    assert rows[("x = x + self.mlp(self.ln_2(x))", "x = x + self.mlp(self.ln_2(x))")] == "same"
    assert (
        rows[
            (
                "def __call__(self, x, kv_cache=None, pos=None):",
                "def forward(self, x, kv_cache=None, pos=None):",
            )
        ]
        == "changed"
    )
    for b in report.blocks:
        for r in b.rows:
            same_text = (
                r.left is not None and r.right is not None and left[r.left].strip() == right[r.right].strip()
            )
            assert (r.status == "same") == same_text, (b.left, b.right, r)


def test_output_is_deterministic(site, tmp_path):
    again = tmp_path / "again"
    build_site(again)
    names = sorted(p.name for p in site.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (site / name).read_bytes() == (again / name).read_bytes(), name


def test_name_renamed_in_one_backend_shows_as_unmatched(tmp_path):
    jax_dir, torch_dir = tmp_path / "jax", tmp_path / "torch"
    jax_dir.mkdir()
    torch_dir.mkdir()
    shutil.copy(JAX_DIR / "model.py", jax_dir / "model.py")
    source = (TORCH_DIR / "model.py").read_text()
    assert "    def decode(" in source
    (torch_dir / "model.py").write_text(source.replace("    def decode(", "    def decode_step("))
    build_site(tmp_path / "out", jax_dir, torch_dir)
    index = read_page(tmp_path / "out" / "index.html")
    row = index.cells[index.cells.index("model.py") :][
        :6
    ]  # file, lines, lines, aligned, only-jax, only-torch
    assert "GPT.decode " in row[4] and "GPT.decode_step" not in row[4]
    assert "GPT.decode_step" in row[5]
    assert any("GPT.decode_step" in p for p in mirror_mismatches(jax_dir, torch_dir))
    # The renamed method is still on the page, every line of it, under its own anchor.
    page = read_page(tmp_path / "out" / "model.html")
    assert {"GPT.decode", "GPT.decode_step"} <= page.ids
    assert page.columns["torch"] == source_lines((torch_dir / "model.py").read_text())


def test_missing_file_of_a_pair_gets_a_page_that_says_so(tmp_path):
    jax_dir, torch_dir = tmp_path / "jax", tmp_path / "torch"
    jax_dir.mkdir()
    torch_dir.mkdir()
    shutil.copy(JAX_DIR / "model.py", jax_dir / "model.py")
    build_site(tmp_path / "out", jax_dir, torch_dir)
    text = (tmp_path / "out" / "model.html").read_text()
    assert "babygpt_torch/model.py does not exist" in text
    assert read_page(tmp_path / "out" / "model.html").columns["torch"] == []
    assert mirror_mismatches(jax_dir, torch_dir) == ["model: babygpt_torch/model.py does not exist"]


def test_paradigms_guide_links_point_to_existing_rows(site):
    guide = (ROOT / "docs" / "paradigms.md").read_text()
    links = re.findall(r"side-by-side/([\w-]+\.html)(?:#([^)\s\"']+))?", guide)
    assert len(links) >= 10, "the guide links to the aligned rows"
    broken = []
    ids = {}
    for page, anchor in links:
        if not (site / page).exists():
            broken.append(page)
            continue
        ids.setdefault(page, read_page(site / page).ids)
        if anchor and anchor not in ids[page]:
            broken.append(f"{page}#{anchor}")
    assert not broken, f"docs/paradigms.md links to missing pages or rows: {broken}"


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_renders_both_columns(site, tmp_path):
    doms = {}
    for page in ("index", "model"):
        result = subprocess.run(
            [
                find_chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                "--dump-dom",
                (site / f"{page}.html").as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        doms[page] = Page(result.stdout)
    assert "model.py" in doms["index"].cells
    model = doms["model"]
    # The browser's DOM holds both columns, every line, and the aligned names as row anchors.
    assert model.columns["jax"] == source_lines((JAX_DIR / "model.py").read_text())
    assert model.columns["torch"] == source_lines((TORCH_DIR / "model.py").read_text())
    assert {"CausalSelfAttention.forward", "MLP", "Block", "GPT.decode", "hf_tensors"} <= model.ids
    png = screenshot(site / "model.html", tmp_path / "shot.png", "CausalSelfAttention", size=(800, 600))
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")) == (800, 600)


def test_unparsable_source_is_one_clear_error(tmp_path):
    (tmp_path / "jax").mkdir()
    (tmp_path / "torch").mkdir()
    (tmp_path / "jax" / "model.py").write_text("def f(:\n")
    with pytest.raises(BabyGPTError, match=r"model\.py:1: does not parse"):
        build_site(tmp_path / "out", tmp_path / "jax", tmp_path / "torch")
    assert not (tmp_path / "out").exists()  # nothing half-written
