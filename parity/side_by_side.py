"""The side-by-side reader: `babygpt_jax/X.py` next to `babygpt_torch/X.py`, aligned by name.

    python -m parity.side_by_side [--out docs/side-by-side] [--jax-dir DIR] [--torch-dir DIR]

Writes a static, offline HTML site (no JavaScript, nothing fetched at view time): an index and one
page per mirrored pair, JAX on the left and PyTorch on the right. Each file is cut with `ast` into
segments, one per top-level class, function, named constant and class method; the two name lists
are aligned in order (difflib), then the lines inside each aligned pair (difflib again, with a
similarity match inside changed blocks), so the same lines sit side by side and differing lines
are marked. Every aligned row has an anchor (`model.html#GPT.decode`) for the docs to link to.

The mirror rule (same names, same order) is checked by `parity/test_side_by_side.py`; the names
that exist in one backend only because of the paradigm are listed in `PARADIGM_ONLY` with a reason.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import html
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from babygpt.cli import run_cli
from babygpt.config import BabyGPTError

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ("model", "optim", "data", "parallel", "checkpoint", "train", "generate", "score")
BACKENDS = ("jax", "torch")
TITLES = {"jax": "JAX / Flax NNX", "torch": "PyTorch"}

# The same thing under each framework's name (a top-level name or a method name): an NNX module is
# called through `__call__`, a torch module through `forward`. Rows align on the torch name and carry
# an anchor for both.
SYNONYMS = {"jax": {"__call__": "forward"}, "torch": {}}

# Names (top-level classes and functions, class methods) that exist in one backend only because
# the paradigms differ, each with the reason. Anything else present in one backend only is drift,
# and `test_backends_mirror_each_other` fails on it.
PARADIGM_ONLY: dict[tuple[str, str], dict[str, str]] = {}

# Minimum difflib ratio for two differing lines to be shown side by side as one changed row.
_LINE_MATCH = 0.45


@dataclass(frozen=True)
class Segment:
    """A run of source lines [start, end) (0-based) that belongs to one name."""

    key: str  # the alignment key: class-qualified, synonyms mapped ("GPT.forward")
    name: str  # as written in the file ("GPT.__call__"); "" for the module header
    kind: str  # "module", "class", "function", "method" or "constant"
    start: int
    end: int


@dataclass(frozen=True)
class Row:
    """One table row: a line of each side (None: no line there) and how they compare."""

    left: int | None
    right: int | None
    status: str  # "same", "changed", "left-only", "right-only"


@dataclass(frozen=True)
class Block:
    """A pair of aligned segments (either may be None) and their aligned lines."""

    left: Segment | None
    right: Segment | None
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class PairReport:
    pair: str
    lines: dict[str, int | None]  # None: the file does not exist
    blocks: tuple[Block, ...]

    def unmatched(self, backend: str) -> list[Segment]:
        """Named segments of `backend` with no counterpart on the other side, in file order."""
        side, other = ("left", "right") if backend == "jax" else ("right", "left")
        return [
            getattr(b, side)
            for b in self.blocks
            if getattr(b, side) is not None
            and getattr(b, other) is None
            and getattr(b, side).kind != "module"
        ]


def source_lines(source: str) -> list[str]:
    """The file's lines as an editor numbers them (a final newline does not open another line)."""
    lines = source.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _assigned_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def _first_line(node: ast.stmt, lines: list[str], floor: int) -> int:
    """0-based first line of a definition: its decorators and the comment block right above it."""
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
    while start > floor and lines[start - 1].strip().startswith("#"):
        start -= 1
    return start


def segments(source: str, backend: str) -> list[Segment]:
    """Cut a file into named segments covering every line once, in order.

    The module header (docstring, imports) is the first segment; each top-level def, class and
    single-name assignment starts a segment that runs to the next one, so statements without a
    name (an `if __name__ == ...` block, a bare expression) stay with the segment above them.
    A class is its header (up to its first method) followed by one segment per method.
    """
    lines = source_lines(source)
    tree = ast.parse(source)
    starts: list[tuple[int, str, str, str]] = []  # (start, key, name, kind)
    floor = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = node.name
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
        elif (name := _assigned_name(node)) is not None:
            kind = "constant"
        else:
            floor = node.end_lineno
            continue
        start = _first_line(node, lines, floor)
        key = SYNONYMS[backend].get(name, name)
        starts.append((start, key, name, kind))
        floor = node.end_lineno
        if isinstance(node, ast.ClassDef):
            inner = node.body[0].lineno - 1
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    method = SYNONYMS[backend].get(item.name, item.name)
                    starts.append(
                        (_first_line(item, lines, inner), f"{key}.{method}", f"{name}.{item.name}", "method")
                    )
                inner = item.end_lineno
    out = []
    bounds = [s[0] for s in starts] + [len(lines)]
    if not starts or starts[0][0] > 0:
        out.append(Segment("", "", "module", 0, bounds[0]))
    for (start, key, name, kind), end in zip(starts, bounds[1:]):
        out.append(Segment(key, name, kind, start, end))
    return out


def mirrored_names(source: str, backend: str) -> list[tuple[str, str]]:
    """(alignment key, name as written) of the classes, functions and methods, in file order."""
    return [(s.key, s.name) for s in segments(source, backend) if s.kind in ("class", "function", "method")]


def _similar_pairs(a: Sequence[str], b: Sequence[str]) -> list[tuple[int | None, int | None]]:
    """Align two blocks of differing lines: the monotone matching that maximizes total similarity.

    A pair counts only above `_LINE_MATCH`; unmatched lines get a gap on the other side.
    """
    n, m = len(a), len(b)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    sim = [[difflib.SequenceMatcher(None, x, y, autojunk=False).ratio() for y in b] for x in a]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best = max(score[i + 1][j], score[i][j + 1])
            if sim[i][j] >= _LINE_MATCH:
                best = max(best, sim[i][j] + score[i + 1][j + 1])
            score[i][j] = best
    out: list[tuple[int | None, int | None]] = []
    i = j = 0
    while i < n and j < m:
        if sim[i][j] >= _LINE_MATCH and score[i][j] == sim[i][j] + score[i + 1][j + 1]:
            out.append((i, j))
            i, j = i + 1, j + 1
        elif score[i][j] == score[i + 1][j]:
            out.append((i, None))
            i += 1
        else:
            out.append((None, j))
            j += 1
    out += [(k, None) for k in range(i, n)] + [(None, k) for k in range(j, m)]
    return out


def align_lines(left: Sequence[str], right: Sequence[str], lo: int = 0, ro: int = 0) -> list[Row]:
    """Rows for two runs of lines; `lo`/`ro` offset the indices into each file."""
    a = [s.strip() for s in left]  # indentation alone does not make lines differ
    b = [s.strip() for s in right]
    rows = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            rows += [Row(lo + i1 + k, ro + j1 + k, "same") for k in range(i2 - i1)]
            continue
        if i2 - i1 == j2 - j1:  # as many lines each side: the k-th replaced the k-th, as in any diff
            pairs = [(k, k) for k in range(i2 - i1)]
        else:
            pairs = _similar_pairs(a[i1:i2], b[j1:j2])
        for i, j in pairs:
            if i is None:
                rows.append(Row(None, ro + j1 + j, "right-only"))
            elif j is None:
                rows.append(Row(lo + i1 + i, None, "left-only"))
            else:
                rows.append(Row(lo + i1 + i, ro + j1 + j, "changed"))
    return rows


def align(left_src: str | None, right_src: str | None) -> list[Block]:
    """Align two files (None: the file does not exist) segment by segment, then line by line."""
    left_lines = source_lines(left_src or "")
    right_lines = source_lines(right_src or "")
    ls = segments(left_src, "jax") if left_src is not None else []
    rs = segments(right_src, "torch") if right_src is not None else []
    blocks = []

    def one_sided(seg: Segment, side: str) -> Block:
        if side == "left":
            return Block(seg, None, tuple(Row(k, None, "left-only") for k in range(seg.start, seg.end)))
        return Block(None, seg, tuple(Row(None, k, "right-only") for k in range(seg.start, seg.end)))

    matcher = difflib.SequenceMatcher(None, [s.key for s in ls], [s.key for s in rs], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for a, b in zip(ls[i1:i2], rs[j1:j2]):
                rows = align_lines(
                    left_lines[a.start : a.end], right_lines[b.start : b.end], a.start, b.start
                )
                blocks.append(Block(a, b, tuple(rows)))
        else:
            # Different names never share a row: each stands alone, the left ones first.
            blocks += [one_sided(s, "left") for s in ls[i1:i2]]
            blocks += [one_sided(s, "right") for s in rs[j1:j2]]
    return blocks


def compare_pair(pair: str, jax_dir: Path, torch_dir: Path) -> tuple[PairReport, dict[str, str | None]]:
    sources = {}
    for backend, d in (("jax", jax_dir), ("torch", torch_dir)):
        path = d / f"{pair}.py"
        sources[backend] = path.read_text() if path.exists() else None
    lines = {b: None if s is None else len(source_lines(s)) for b, s in sources.items()}
    report = PairReport(pair, lines, tuple(align(sources["jax"], sources["torch"])))
    return report, sources


# ---------------------------------------------------------------------------------------------
# HTML


_CSS = """\
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --changed: #fff5c2; --only-l: #e6f4ea;
  --only-r: #e8f0fe; --head: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
header.top { border-bottom: 1px solid var(--line); padding: 8px 16px; }
header.top h1 { font-size: 18px; margin: 0 0 4px 0; }
header.top nav a { margin-right: 12px; }
header.top .legend span { display: inline-block; padding: 0 6px; margin-right: 6px; border: 1px solid var(--line);
  font-size: 12px; }
main { padding: 0 16px 32px 16px; }
a { color: #0969da; text-decoration: none; }
a:hover { text-decoration: underline; }
p.missing { background: #ffebe9; border: 1px solid #ff8182; padding: 6px 10px; }
details.names { margin: 8px 0; font-size: 13px; }
details.names a { margin-right: 10px; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
table.sbs { width: 100%; table-layout: fixed; border-collapse: collapse;
  font: 12px/1.4 ui-monospace, SFMono-Regular, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
table.sbs col.ln { width: 3.2em; }
table.sbs thead th { position: sticky; top: 0; z-index: 1; background: var(--head); text-align: left;
  padding: 4px 8px; border-bottom: 1px solid var(--line); font: 600 13px/1.4 -apple-system, "Segoe UI", Arial, sans-serif; }
tr.name th { text-align: left; padding: 10px 8px 3px 8px; border-bottom: 1px solid var(--line);
  font-weight: 600; color: #444; background: #fff; }
tr.name th.none { color: #b0b7be; font-weight: 400; font-style: italic; }
tr.name th a.self { color: inherit; }
tr.name:target th { background: #fff8c5; }
td { padding: 0 8px; vertical-align: top; }
td.ln { text-align: right; color: #8c959f; user-select: none; padding: 0 6px 0 0; }
td.code { white-space: pre-wrap; overflow-wrap: anywhere; border-right: 1px solid var(--line); }
td.code.torch { border-right: none; }
tr.changed td.code { background: var(--changed); }
tr.left-only td.code.jax { background: var(--only-l); }
tr.right-only td.code.torch { background: var(--only-r); }
td.filler { background: repeating-linear-gradient(135deg, #fafbfc 0 4px, #f0f2f4 4px 8px); }
table.index { border-collapse: collapse; margin: 12px 0; }
table.index th, table.index td { border: 1px solid var(--line); padding: 4px 10px; text-align: left;
  vertical-align: top; }
table.index td.num { text-align: right; }
ul.only { margin: 0; padding-left: 18px; }
ul.only code { font-size: 12px; }
.reason { color: var(--muted); }
.drift { color: #cf222e; font-weight: 600; }
"""


def _css() -> str:
    style = HtmlFormatter(style="default").get_style_defs("td.code")
    return _CSS + "\n/* pygments, default style */\n" + style + "\n"


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
    items = []
    for seg in report.unmatched(backend):
        reason = PARADIGM_ONLY.get((report.pair, backend), {}).get(seg.name)
        link = f'<a href="{report.pair}.html#{html.escape(seg.key)}"><code>{html.escape(seg.name)}</code></a>'
        if reason is not None:
            note = f' <span class="reason">{html.escape(reason)}</span>'
        elif seg.kind == "constant":
            note = ' <span class="reason">(constant)</span>'
        else:
            note = ' <span class="drift">not in the allow-list</span>'
        items.append(f"<li>{link} <span class='reason'>{seg.kind}</span>{note}</li>")
    return f'<ul class="only">{"".join(items)}</ul>' if items else "&mdash;"


def _index(reports: Sequence[PairReport]) -> str:
    rows = []
    for r in reports:
        matched = sum(
            1 for b in r.blocks if b.left is not None and b.right is not None and b.left.kind != "module"
        )
        rows.append(
            f'<tr><td><a href="{r.pair}.html">{r.pair}.py</a></td>'
            f'<td class="num">{_count(r.lines["jax"])}</td><td class="num">{_count(r.lines["torch"])}</td>'
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
                '<table class="index"><thead><tr><th>file</th><th>JAX</th><th>PyTorch</th>'
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "side-by-side"), help="output directory")
    p.add_argument("--jax-dir", default=str(ROOT / "babygpt_jax"), help="the JAX sources")
    p.add_argument("--torch-dir", default=str(ROOT / "babygpt_torch"), help="the PyTorch sources")
    args = p.parse_args(argv)
    reports = build_site(Path(args.out), Path(args.jax_dir), Path(args.torch_dir))
    print(f"wrote {len(reports)} pages and the index to {args.out}")
    for r in reports:
        for backend in BACKENDS:
            drift = [
                s.name
                for s in r.unmatched(backend)
                if s.kind != "constant" and s.name not in PARADIGM_ONLY.get((r.pair, backend), {})
            ]
            if drift:
                print(f"  {r.pair}.py: only in {backend}, not allow-listed: {', '.join(drift)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
