"""The rendering half of the side-by-side reader: a static, offline HTML site of the alignment.

An index and one page per mirrored pair, JAX on the left and PyTorch on the right (no JavaScript,
nothing fetched at view time), styled by this package's `style.css`. Every aligned row has an anchor
(`model.html#GPT.decode`) for the docs to link to. `screenshot` takes a PNG of a page with headless
Chromium, for the README.
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from babygpt.config import BabyGPTError
from babygpt_sbs.align import (
    BACKENDS,
    PAIRS,
    ROOT,
    SYNONYMS,
    Block,
    PairReport,
    Segment,
    compare_pair,
    paradigm_reason,
    source_lines,
)


def _css() -> str:
    # Without pygments' own background, so the row colours (same, changed, one side only) show.
    style = "\n".join(
        line
        for line in HtmlFormatter(style="default").get_style_defs("td.code").splitlines()
        if not line.startswith("td.code { background")
    )
    own = resources.files("babygpt_sbs").joinpath("style.css").read_text(encoding="utf-8")
    return own + "\n/* pygments, default style */\n" + style + "\n"


def _highlighted(source: str | None) -> list[str]:
    """One self-contained HTML fragment per source line (pygments closes its spans at each line end)."""
    if source is None:
        return []
    lines = source_lines(source)
    out = highlight(source, PythonLexer(stripnl=False, ensurenl=True), HtmlFormatter(nowrap=True))
    out_lines = out.split("\n")[: len(lines)]
    if len(out_lines) != len(lines):  # never seen; plain text keeps every line rather than losing one
        return [html.escape(s) for s in lines]
    return out_lines


def _anchor_ids(block: Block, used: set[str]) -> list[str]:
    """Anchors for a row: the alignment key first, then each side's own name where it differs."""
    names = []
    for seg in (block.left, block.right):
        if seg is not None:
            names += [seg.key or "module", seg.name or "module"]
    ids = []
    for name in dict.fromkeys(names):
        candidate, k = name, 2
        while candidate in used:
            candidate, k = f"{name}-{k}", k + 1
        used.add(candidate)
        ids.append(candidate)
    return ids


def _label(seg: Segment | None, missing: str, anchors: str = "") -> str:
    """A name row's cell; `anchors` (the row's extra ids) go in the first cell."""
    if seg is None:
        return f'<th colspan="2" class="none">{anchors}{missing}</th>'
    text = "module header" if seg.kind == "module" else f"{seg.kind} {seg.name}"
    return f'<th colspan="2">{anchors}{html.escape(text)}</th>'


def _page(report: PairReport, sources: dict[str, str | None], pairs: Sequence[str]) -> str:
    code = {b: _highlighted(sources[b]) for b in BACKENDS}
    i = pairs.index(report.pair)
    nav = ['<a href="index.html">index</a>']
    if i > 0:
        nav.append(f'<a href="{pairs[i - 1]}.html">&larr; {pairs[i - 1]}.py</a>')
    if i + 1 < len(pairs):
        nav.append(f'<a href="{pairs[i + 1]}.html">{pairs[i + 1]}.py &rarr;</a>')
    parts = [
        _head(f"{report.pair}.py side by side"),
        '<header class="top">',
        f"<h1>{report.pair}.py: JAX/Flax NNX (left) and PyTorch (right)</h1>",
        f"<nav>{''.join(nav)}</nav>",
        '<div class="legend"><span>same line</span><span style="background:var(--changed)">changed line</span>'
        '<span style="background:var(--only-l)">JAX only</span>'
        '<span style="background:var(--only-r)">PyTorch only</span></div>',
        "</header>",
        "<main>",
    ]
    for backend in BACKENDS:
        if sources[backend] is None:
            parts.append(f'<p class="missing">babygpt_{backend}/{report.pair}.py does not exist.</p>')
    used: set[str] = set()
    table = []
    jump = []
    for block in report.blocks:
        ids = _anchor_ids(block, used)
        anchors = "".join(f'<span id="{html.escape(x)}"></span>' for x in ids[1:])
        jump.append(f'<a href="#{html.escape(ids[0])}">{html.escape(ids[0])}</a>')
        table.append(
            f'<tr class="name" id="{html.escape(ids[0])}">'
            f"{_label(block.left, 'not in JAX', anchors)}{_label(block.right, 'not in PyTorch')}</tr>"
        )
        for row in block.rows:
            cells = []
            for backend, k in (("jax", row.left), ("torch", row.right)):
                if k is None:
                    cells.append('<td class="ln"></td><td class="code filler"></td>')
                else:
                    cells.append(
                        f'<td class="ln">{k + 1}</td><td class="code {backend}">{code[backend][k]}</td>'
                    )
            table.append(f'<tr class="{row.status}">{"".join(cells)}</tr>')
    parts += [
        f'<details class="names"><summary>{len(report.blocks)} aligned rows</summary>{" ".join(jump)}</details>',
        '<table class="sbs"><colgroup><col class="ln"><col><col class="ln"><col></colgroup>',
        "<thead><tr>"
        f'<th colspan="2">babygpt_jax/{report.pair}.py ({_count(report.lines["jax"])})</th>'
        f'<th colspan="2">babygpt_torch/{report.pair}.py ({_count(report.lines["torch"])})</th>'
        "</tr></thead>",
        "<tbody>",
        *table,
        "</tbody></table>",
        "</main>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _count(lines: int | None) -> str:
    return "missing" if lines is None else f"{lines} lines"


def _head(title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="style.css"></head><body>'
    )


def _only_list(report: PairReport, backend: str) -> str:
    """The names in `backend` only; a class in one backend only stands for its methods."""
    unmatched = report.unmatched(backend)
    classes = {s.name for s in unmatched if s.kind == "class"}
    items = []
    for seg in unmatched:
        if seg.kind == "method" and seg.name.split(".")[0] in classes:
            continue
        kind = seg.kind
        if seg.kind == "class":
            methods = sum(1 for s in unmatched if s.kind == "method" and s.name.split(".")[0] == seg.name)
            kind += f" with {methods} method{'s' if methods != 1 else ''}" if methods else ""
        reason = paradigm_reason(report.pair, backend, seg.name)
        if reason is not None:
            note = f' &mdash; <span class="reason">{html.escape(reason)}</span>'
        elif seg.kind == "constant":
            note = ""
        else:
            note = ' &mdash; <span class="drift">not in the allow-list</span>'
        link = f'<a href="{report.pair}.html#{html.escape(seg.key)}"><code>{html.escape(seg.name)}</code></a>'
        items.append(f'<li>{link} <span class="kind">{kind}</span>{note}</li>')
    return f'<ul class="only">{"".join(items)}</ul>' if items else "&mdash;"


def _index(reports: Sequence[PairReport]) -> str:
    rows = []
    for r in reports:
        matched = sum(
            1 for b in r.blocks if b.left is not None and b.right is not None and b.left.kind != "module"
        )
        rows.append(
            f'<tr><td><a href="{r.pair}.html">{r.pair}.py</a></td>'
            f'<td class="num">{r.lines["jax"] or "missing"}</td><td class="num">{r.lines["torch"] or "missing"}</td>'
            f'<td class="num">{matched}</td>'
            f"<td>{_only_list(r, 'jax')}</td><td>{_only_list(r, 'torch')}</td></tr>"
        )
    return (
        "\n".join(
            [
                _head("babyGPT side by side"),
                '<header class="top"><h1>babyGPT, side by side: JAX/Flax NNX and PyTorch</h1>'
                '<nav><a href="../paradigms.md">the reader\'s guide (docs/paradigms.md)</a></nav></header>',
                "<main>",
                "<p>Each page shows <code>babygpt_jax/X.py</code> on the left and <code>babygpt_torch/X.py</code> "
                "on the right, aligned by top-level class, function and method name; lines that differ are "
                "marked. Names present in one backend only are listed below: the paradigm's own names with "
                "the reason, anything else is drift from the mirror. Generated by "
                "<code>python -m parity.side_by_side</code>.</p>",
                "<p>Aligned across a rename: "
                + ", ".join(
                    f"<code>{html.escape(a)}</code> (JAX) with <code>{html.escape(b)}</code> (PyTorch)"
                    for a, b in sorted(SYNONYMS["jax"].items())
                )
                + ".</p>",
                '<table class="index"><thead><tr><th>file</th><th>JAX lines</th><th>PyTorch lines</th>'
                "<th>aligned names</th><th>only in JAX</th><th>only in PyTorch</th></tr></thead><tbody>",
                *rows,
                "</tbody></table>",
                "</main>",
                "</body></html>",
            ]
        )
        + "\n"
    )


def build_site(
    out: Path, jax_dir: Path = ROOT / "babygpt_jax", torch_dir: Path = ROOT / "babygpt_torch"
) -> list[PairReport]:
    """Write the site to `out` (replaced whole, via a temporary directory) and return the reports."""
    for d in (jax_dir, torch_dir):
        if not d.is_dir():
            raise BabyGPTError(f"source directory {d} does not exist; pass --jax-dir/--torch-dir")
    results = [compare_pair(pair, jax_dir, torch_dir) for pair in PAIRS]
    results = [(r, s) for r, s in results if any(v is not None for v in s.values())]
    if not results:
        raise BabyGPTError(
            f"no mirrored files ({', '.join(p + '.py' for p in PAIRS)}) in {jax_dir} or {torch_dir}"
        )
    pairs = [r.pair for r, _ in results]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "style.css").write_text(_css())
    for report, sources in results:
        (tmp / f"{report.pair}.html").write_text(_page(report, sources, pairs))
    reports = [r for r, _ in results]
    (tmp / "index.html").write_text(_index(reports))
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return reports


# Headless Chromium, offline and quiet: no network, no first-run or background work.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, anchor: str = "", size: tuple[int, int] = (1600, 1000)) -> Path:
    """A PNG of `page` scrolled to `anchor`, taken with headless Chromium.

    Chromium's --screenshot captures the top of a page whatever its fragment, so the page is shown
    in a full-window iframe, which does scroll to the fragment.
    """
    chromium = find_chromium()
    if chromium is None:
        raise BabyGPTError("--screenshot needs chromium: apt-get install chromium")
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        frame = Path(tmp) / "frame.html"
        src = html.escape(Path(page).resolve().as_uri() + (f"#{anchor}" if anchor else ""))
        frame.write_text(
            '<!DOCTYPE html><html><body style="margin:0;overflow:hidden">'
            f'<iframe src="{src}" style="width:{size[0]}px;height:{size[1]}px;border:0"></iframe></body></html>'
        )
        shot = Path(tmp) / "shot.png"
        result = subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={Path(tmp) / 'profile'}",
                f"--window-size={size[0]},{size[1]}",
                f"--screenshot={shot}",
                frame.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0 or not shot.exists():
            raise BabyGPTError(f"chromium failed to take the screenshot: {result.stderr.strip()[-300:]}")
        tmp_png = png.with_name(f".{png.name}.tmp")
        shutil.copyfile(shot, tmp_png)
        os.replace(tmp_png, png)
    return png
