"""The alignment half of the side-by-side reader: what CI checks, on the source text alone.

`babygpt_jax/X.py` and `babygpt_torch/X.py` are each cut with `ast` into segments, one per
top-level class, function, named constant and class method; the two name lists are aligned in
order (difflib), then the lines inside each aligned pair (difflib again, with a similarity match
inside changed blocks), so the same lines sit side by side. `mirror_mismatches` is the mirror rule
(same names, same order), checked by `parity/test_side_by_side.py`; the names that exist in one
backend only because of the paradigm are listed in `PARADIGM_ONLY` with a reason. No framework is
imported: `babygpt_sbs.render` turns these reports into HTML.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from babygpt.config import BabyGPTError

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ("model", "optim", "data", "parallel", "checkpoint", "train", "generate", "score", "kernels")
BACKENDS = ("jax", "torch")

# The same thing under each framework's name (a top-level name or a method name): an NNX module is
# called through `__call__`, a torch module through `forward`. Rows align on the torch name and carry
# an anchor for both.
# The data loader is the other renamed pair: grain's pipeline in JAX, nanoGPT's plain
# `DataLoaderLite` in torch, with the same methods.
SYNONYMS = {"jax": {"__call__": "forward", "GrainLoader": "DataLoaderLite"}, "torch": {}}

# Names (top-level classes and functions, class methods) that exist in one backend only because
# the paradigms differ, each with the reason. Anything else present in one backend only is drift,
# and `test_backends_mirror_each_other` fails on it.
# An allow-listed class covers its methods.

# Why the batch GEMM kernels of `babygpt_torch/kernels.py` have no Pallas twin.
_TORCH_ROWS = (
    "torch's batch of 8 to 32 rows in kernels of its own (tensor-core GEMMs with their bias, GELU or"
    " residual add, launched dependently); JAX's batch_decode gets the like from XLA, which compiles"
    " the plain modules into split-K Triton GEMM fusions launched dependently"
)

PARADIGM_ONLY: dict[tuple[str, str], dict[str, str]] = {
    ("model", "jax"): {
        "attention_implementation": "jax.nn.dot_product_attention must be asked for cuDNN; torch's SDPA picks its kernel itself",
        "_split_matmul": "XLA gives a custom call such as cuDNN's attention only dense operands, so q, k, v come from three matmuls; torch's SDPA takes strided views of one",
        "_normal": "Flax takes initializers at construction; torch re-initializes after (GPT._init_weights)",
        "_layer_norm": "Flax LayerNorm takes its float32 dtype at construction; torch autocast keeps LayerNorm in float32 itself",
        "_master": "Flax takes each module's weight and compute dtypes at construction; torch converts the built model (`.to(torch.float64)`) and autocasts the rest",
        "_cross_entropy_fwd": "jax.custom_vjp takes the loss's forward and backward as two functions; torch's autograd.Function holds them as methods of one class",
        "_cross_entropy_bwd": "the backward that jax.custom_vjp pairs with _cross_entropy_fwd; torch's is _CrossEntropy.backward",
        "_hf_name": "Flax names parameters kernel/scale/embedding; torch's state_dict names are HF's already",
    },
    ("model", "torch"): {
        "GPT._init_weights": "torch modules init themselves by default, so GPT-2's init overwrites them by name after construction; Flax passes each init at construction",
        "_CrossEntropy": "torch's autograd.Function holds the loss's forward and backward as methods of one class; jax.custom_vjp takes two functions",
    },
    ("data", "jax"): {
        "TokenWindowsSource": "grain reads records through a random-access data source object",
        "GrainLoader._micro_batch": "a stage of the grain pipeline (torch does it inline in next_batch)",
        "GrainLoader._start": "builds the grain pipeline with read-ahead threads; torch reads synchronously",
    },
    ("parallel", "jax"): {
        "make_mesh": "JAX declares parallelism over a device Mesh; torch runs one process per device",
        "batch_sharding": "a sharding annotation for the batch; DDP gives each process its own rows",
        "replicated": "a sharding annotation for replicated values; DDP replicates by construction",
        "param_shardings": "per-parameter shardings (replicated or FSDP) that jit compiles; DDP replicates",
        "put_global": "host values made global jax.Arrays, each process filling its own shards; torch ranks keep local tensors",
        "_all_finite": "the check as one jitted function, compiled once for the whole tree; torch runs its ops eagerly",
    },
    ("parallel", "torch"): {
        "Dist": "torch passes its process-group facts around; JAX asks jax.process_index() and friends",
        "wrap_model": "the DDP wrapper that all-reduces gradients in backward; jit inserts collectives from shardings",
        "no_sync": "DDP and FSDP2 reduce gradients inside every backward; JAX accumulates in one jitted step, reduced once",
        "_no_gradient_sync": "FSDP2's no_sync is a setter (set_requires_gradient_sync), DDP's a context manager",
        "all_reduce_mean": "an explicit collective for logged values; a jitted JAX step returns global values",
        "clip_grad_norm": "FSDP2's gradient norm is a DTensor to make whole; optax.global_norm of jitted global arrays is global already",
    },
    ("kernels", "jax"): {
        "_call": "a Pallas kernel runs through pl.pallas_call, compiled to Triton on a GPU or interpreted, by one switch; a Triton kernel is launched on its grid directly",
        "_chunk": "Pallas refuses a static slice that runs past a ref, so a K chunk is read in bounds and masked by one helper; Triton masks a load's pointers inline",
        "fused_decode": "the decode step as a function of weights and cache that returns the new cache; torch's FusedDecoder.logits writes fixed buffers in place",
        "_rows_cross_entropy": "jax.custom_vjp pairs the loss with the two functions below; torch's _CrossEntropy class holds both",
        "_cross_entropy_fwd": "the loss kernel's forward half of the custom_vjp; torch's _CrossEntropy.forward",
        "_cross_entropy_bwd": "the gradient kernel's half of the custom_vjp; torch's _CrossEntropy.backward",
    },
    ("kernels", "torch"): {
        "_embed_kernel": "the embedding lookup as one kernel; XLA fuses JAX's jnp expression into one by itself",
        "embed": "launches _embed_kernel; XLA fuses JAX's jnp expression into one kernel by itself",
        "_argmax_blocks_kernel": "torch's argmax over 50k logits is one thread block, so the greedy token has kernels of its own; XLA's argmax reduction in JAX's loop is already fast",
        "_greedy_kernel": "the greedy token written in place into the token buffer; JAX's loop writes it with dynamic_update_slice, fused by XLA",
        "greedy": "launches the two greedy kernels; JAX's loop picks the token with jnp.argmax",
        "FusedDecoder": "fixed buffers, bfloat16 weight copies and in-place writes, so the step can be replayed as a CUDA graph; JAX's fused_decode is a pure function that jit compiles",
        "cuda_graph": "torch records the step once and replays it per token; JAX runs the whole decode loop as one compiled while loop",
        "_CrossEntropy": "a torch.autograd.Function holds the loss kernel's forward and the gradient kernel's backward; JAX pairs them with jax.custom_vjp",
        "_after_previous": "programmatic dependent launch (Triton's gdc_wait / gdc_launch_dependents) for FusedDecoder's kernels; not tried with pallas_call (whether it can launch so is not checked)",
        "_launch": "Triton's launch_pdl option, left out where torch.compile launches the kernel; not tried with pallas_call",
        "_layer_norm_rows_kernel": _TORCH_ROWS,
        "_rows_epilogue": _TORCH_ROWS,
        "_rows_linear_kernel": _TORCH_ROWS,
        "layer_norm_rows": _TORCH_ROWS,
        "rows_linear": _TORCH_ROWS,
        "rows_fit": _TORCH_ROWS,
        "_rows_shapes": _TORCH_ROWS,
    },
    ("checkpoint", "jax"): {
        "checkpoint_manager": "orbax's CheckpointManager object owns the step directories and async saves",
        "_quiet_orbax": "orbax narrates reads and saves in absl warnings that would bury our one-line errors; torch.save says nothing",
        "_as_variables": "reads checkpoints from before the train state held plain dicts (nnx.Params stored one level deeper); torch's state_dict layout did not change",
        "_plain": "takes the arrays back out of _as_variables' nnx.Params",
        "pinned_host_copies": "orbax's copies off a GPU through pinned host memory, off under XLA's VMM allocator, where they segfault; torch.save copies each tensor itself",
        "_restore_state": "orbax rebuilds a tree onto the target's shapes, dtypes and shardings; torch's load_state_dict copies into tensors that exist",
    },
    ("checkpoint", "torch"): {
        "checkpoint_path": "torch names one file per step itself; orbax's manager does that in JAX",
        "_steps": "lists the step files; orbax's manager tracks its steps in JAX",
        "_by_name": "reads torch files from before FSDP2 support, whose optimizer state is keyed by index; orbax restores by structure",
    },
    ("train", "jax"): {
        "make_train_step": "the functional step is jitted by a factory that closes over graphdef, optimizer and shardings",
        "eval_step": "the pure evaluation function that make_eval_step jits; torch's evaluate calls the module",
        "make_eval_step": "jits eval_step with shardings; torch has nothing to compile",
    },
    ("train", "torch"): {
        "_autocast": "torch chooses bfloat16 by a context around the forward; JAX passes dtype to the modules",
        "_rng_state": "torch's RNG is global state to save; JAX's is an explicit key saved as an array",
        "_set_rng_state": "restores torch's global RNG state; JAX restores its key like any array",
    },
    ("score", "jax"): {
        "_completion_losses": "the pure function of (graphdef, state) that jax.jit compiles; torch calls the module",
    },
}


def paradigm_reason(pair: str, backend: str, name: str) -> str | None:
    """Why `name` (or its class) exists in `backend` only, or None if it is not allow-listed."""
    allowed = PARADIGM_ONLY.get((pair, backend), {})
    return allowed.get(name, allowed.get(name.split(".")[0]) if "." in name else None)


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


def segments(source: str, backend: str, where: str = "") -> list[Segment]:
    """Cut a file into named segments covering every line once, in order.

    The module header (docstring, imports) is the first segment; each top-level def, class and
    single-name assignment starts a segment that runs to the next one, so statements without a
    name (an `if __name__ == ...` block, a bare expression) stay with the segment above them.
    A class is its header (up to its first method) followed by one segment per method.
    """
    lines = source_lines(source)
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise BabyGPTError(f"{where or backend + ' source'}:{e.lineno}: does not parse ({e.msg})") from None
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


def mirrored_names(source: str, backend: str, where: str = "") -> list[tuple[str, str]]:
    """(alignment key, name as written) of the classes, functions and methods, in file order."""
    return [
        (s.key, s.name) for s in segments(source, backend, where) if s.kind in ("class", "function", "method")
    ]


def mirror_mismatches(
    jax_dir: Path = ROOT / "babygpt_jax", torch_dir: Path = ROOT / "babygpt_torch"
) -> list[str]:
    """Every break of the mirror rule, one line each; empty when the backends mirror each other.

    Per pair: both files exist, and their classes, functions and methods come in the same order
    under the same names once `PARADIGM_ONLY`'s names are set aside; an allow-listed name must
    exist in its backend and be absent from the other, so the list cannot go stale.
    """
    problems = []
    for pair in PAIRS:
        paths = {"jax": Path(jax_dir) / f"{pair}.py", "torch": Path(torch_dir) / f"{pair}.py"}
        present = {b: p.exists() for b, p in paths.items()}
        if not any(present.values()):
            continue
        if not all(present.values()):
            missing = [f"babygpt_{b}/{pair}.py" for b, ok in present.items() if not ok]
            problems.append(f"{pair}: {missing[0]} does not exist")
            continue
        names = {b: mirrored_names(paths[b].read_text(), b, str(paths[b])) for b in BACKENDS}
        kept = {}
        for backend in BACKENDS:
            other = "torch" if backend == "jax" else "jax"
            allowed = PARADIGM_ONLY.get((pair, backend), {})
            written = {name: key for key, name in names[backend]}
            for name in allowed:
                if name not in written:
                    problems.append(
                        f"{pair}: allow-listed {backend} name {name!r} is not in babygpt_{backend}"
                    )
                elif written[name] in {key for key, _ in names[other]}:
                    problems.append(
                        f"{pair}: allow-listed {backend} name {name!r} exists in babygpt_{other} too"
                    )
            kept[backend] = [(k, n) for k, n in names[backend] if paradigm_reason(pair, backend, n) is None]
        left, right = ([k for k, _ in kept[b]] for b in BACKENDS)
        if left != right:
            lines = []
            for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(
                None, left, right, autojunk=False
            ).get_opcodes():
                if tag != "equal":
                    lines += [f"only in babygpt_jax here:   {n}" for _, n in kept["jax"][i1:i2]]
                    lines += [f"only in babygpt_torch here: {n}" for _, n in kept["torch"][j1:j2]]
            problems.append(f"{pair}: names or order differ\n    " + "\n    ".join(lines))
    return problems


def _code_part(line: str) -> str:
    """A stripped line without its trailing comment (a '#' inside a string may cut early: harmless here)."""
    return line.split("  #", 1)[0].strip()


_DEF = re.compile(r"^(?:async\s+)?(?:def|class)\s+(\w+)")
_TARGET = re.compile(r"^([\w.]+(?:\s*,\s*[\w.]+)*)\s*[-+*/@]?=(?!=)")


def _similarity(x: str, y: str) -> float:
    """How alike two lines read: difflib's ratio on the code, weighed by what they assign to.

    `self.c_proj = nnx.Linear(...)` mirrors `self.c_proj = nn.Linear(...)` however different the
    right-hand sides; two assignments to different names are rarely the same step.
    """
    x, y = _code_part(x), _code_part(y)
    ratio = difflib.SequenceMatcher(None, x, y, autojunk=False).ratio()
    dx, dy = _DEF.match(x), _DEF.match(y)
    if dx and dy and dx.group(1) == dy.group(1):
        return 1.0  # the same def or class line, whatever the signatures
    if x.startswith('"""') and y.startswith('"""'):
        return max(ratio, 0.8)  # two docstrings open here
    tx, ty = _TARGET.match(x), _TARGET.match(y)
    if tx and ty:
        return max(ratio, 0.9) if tx.group(1) == ty.group(1) else ratio * 0.5
    return ratio


def _similar_pairs(a: Sequence[str], b: Sequence[str]) -> list[tuple[int | None, int | None]]:
    """Align two blocks of differing lines: the monotone matching that maximizes total similarity.

    A pair counts only above `_LINE_MATCH`; unmatched lines get a gap on the other side.
    """
    n, m = len(a), len(b)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    sim = [[_similarity(x, y) for y in b] for x in a]
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


def align(left_src: str | None, right_src: str | None, where: tuple[str, str] = ("", "")) -> list[Block]:
    """Align two files (None: the file does not exist) segment by segment, then line by line.

    `where` names the two files in errors.
    """
    left_lines = source_lines(left_src or "")
    right_lines = source_lines(right_src or "")
    ls = segments(left_src, "jax", where[0]) if left_src is not None else []
    rs = segments(right_src, "torch", where[1]) if right_src is not None else []
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
    where = (str(jax_dir / f"{pair}.py"), str(torch_dir / f"{pair}.py"))
    report = PairReport(pair, lines, tuple(align(sources["jax"], sources["torch"], where)))
    return report, sources
