"""The side-by-side reader's command: `babygpt_jax/X.py` next to `babygpt_torch/X.py`, aligned by name.

    python -m parity.side_by_side [--out docs/side-by-side] [--jax-dir DIR] [--torch-dir DIR] [--screenshot PNG]

Writes a static, offline HTML site: an index and one page per mirrored pair, JAX on the left and
PyTorch on the right. The alignment (`babygpt_sbs.align`, what `parity/test_side_by_side.py`
checks) and the rendering (`babygpt_sbs.render`) live in the `babygpt_sbs` package.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from babygpt.cli import run_cli
from babygpt_sbs.align import BACKENDS, ROOT, paradigm_reason
from babygpt_sbs.render import build_site, screenshot


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "side-by-side"), help="output directory")
    p.add_argument("--jax-dir", default=str(ROOT / "babygpt_jax"), help="the JAX sources")
    p.add_argument("--torch-dir", default=str(ROOT / "babygpt_torch"), help="the PyTorch sources")
    p.add_argument(
        "--screenshot",
        metavar="PNG",
        help="also save a screenshot of model.py's page (headless chromium), e.g. docs/images/side-by-side.png",
    )
    args = p.parse_args(argv)
    reports = build_site(Path(args.out), Path(args.jax_dir), Path(args.torch_dir))
    print(f"wrote {len(reports)} pages and the index to {args.out}")
    if args.screenshot:
        print(
            f"wrote {screenshot(Path(args.out) / 'model.html', Path(args.screenshot), 'CausalSelfAttention')}"
        )
    for r in reports:
        for backend in BACKENDS:
            drift = [
                s.name
                for s in r.unmatched(backend)
                if s.kind != "constant" and paradigm_reason(r.pair, backend, s.name) is None
            ]
            if drift:
                print(f"  {r.pair}.py: only in {backend}, not allow-listed: {', '.join(drift)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
