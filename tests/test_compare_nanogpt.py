"""scripts/compare_nanogpt.py: the pieces without nanoGPT always, the whole pipeline when a copy exists."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from babygpt.data import shard_path, write_shard

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "compare_nanogpt.py"
MIRROR = Path("/work/.mirror/karpathy+nanoGPT/repo")  # a bare git copy on the development machine

_spec = importlib.util.spec_from_file_location("compare_nanogpt", SCRIPT)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

SAMPLE_LOG = """\
tokens per iteration will be: 131,072
Initializing a new model from scratch
step 0: train loss 10.9876, val loss 10.9880
iter 0: loss 10.9862, time 41234.12ms, mfu -100.00%
iter 10: loss 7.1234, time 190.51ms, mfu 45.12%
step 50: train loss 5.1234, val loss 5.6900
saving checkpoint to /tmp/out
step 100: train loss 4.0000, val loss nan
"""


def test_bin_files_are_our_split_in_shard_order_as_uint16(tmp_path):
    data = tmp_path / "mine"
    write_shard(shard_path(data, "train", 0), [1, 2, 3])
    write_shard(shard_path(data, "train", 1), [65535, 0])
    write_shard(shard_path(data, "val", 0), [7, 8])
    sizes = compare.write_nanogpt_data(data, tmp_path / "nano")
    assert sizes == {"train": 5, "val": 2}
    np.testing.assert_array_equal(
        np.fromfile(tmp_path / "nano" / "train.bin", dtype=np.uint16), [1, 2, 3, 65535, 0]
    )
    np.testing.assert_array_equal(np.fromfile(tmp_path / "nano" / "val.bin", dtype=np.uint16), [7, 8])


def test_nanogpt_log_parser_reads_the_eval_lines_only():
    train, val = compare.parse_nanogpt_log(SAMPLE_LOG)
    assert train == {0: 10.9876, 50: 5.1234, 100: 4.0}
    assert list(val) == [0, 50, 100] and val[50] == 5.69 and np.isnan(val[100])


def test_table_plot_and_json_round_trip(tmp_path, capsys):
    curves = {
        "nanogpt": {0: 10.98, 50: 5.69, 100: 5.05},
        "torch": {50: 5.85, 100: 5.22},
        "jax": {50: 5.96, 100: float("nan")},
    }
    table = compare.write_results(curves, tmp_path, "test")
    lines = table.splitlines()
    assert lines[0] == "| step | nanoGPT val | torch val | JAX val |"
    assert lines[2] == "| 0 | 10.980 | — | — |"
    assert lines[4] == "| 100 | 5.050 | 5.220 | nan |"
    assert lines[5] == "| best | 5.050 (step 100) | 5.220 (step 100) | 5.960 (step 50) |"  # NaN never best
    assert lines[6] == "| last (100) | 5.050 | 5.220 | nan |"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "table.md").read_text() == table + "\n"
    read, title = compare.read_curves(tmp_path / "curves.json")
    assert title == "test" and read["torch"] == curves["torch"] and read["nanogpt"] == curves["nanogpt"]
    compare.main(["--replot", str(tmp_path / "curves.json")])
    assert capsys.readouterr().out.strip() == table


def test_recipe_matches_the_babygpt_config():
    """nanoGPT's side of the comparison runs what configs/shakespeare-gpt2.toml says."""
    from babygpt.config import load_config

    config = load_config(ROOT / compare.CONFIG, compare.BABYGPT_RECIPE)
    r, m, t = compare.NANOGPT_RECIPE, config.model, config.train
    assert (r["n_layer"], r["n_head"], r["n_embd"], r["block_size"]) == (m.n_layer, m.n_head, m.n_embd, 1024)
    assert (r["dropout"], r["bias"]) == (m.dropout, m.bias)
    tokens = r["batch_size"] * r["block_size"] * r["gradient_accumulation_steps"]
    assert (tokens, r["max_iters"], r["lr_decay_iters"]) == (t.total_batch_tokens, t.max_steps, t.max_steps)
    assert (r["learning_rate"], r["warmup_iters"]) == (t.max_lr, t.warmup_steps)
    assert r["min_lr"] == pytest.approx(t.final_lr, rel=1e-12)
    assert (r["weight_decay"], r["beta2"], r["grad_clip"]) == (t.weight_decay, t.beta2, t.grad_clip)
    assert (r["eval_interval"], r["compile"]) == (t.eval_interval, t.compile)


def _nanogpt_copy(dest: Path) -> Path | None:
    """A nanoGPT working tree: the repository's ignored `.nanogpt/` or the development mirror."""
    if (ROOT / ".nanogpt" / "train.py").is_file():
        shutil.copytree(ROOT / ".nanogpt", dest, ignore=shutil.ignore_patterns("data", "out*"))
        return dest
    if MIRROR.is_dir():
        dest.mkdir()
        archive = subprocess.run(["git", "--git-dir", str(MIRROR), "archive", "HEAD"], capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return dest
    return None


def test_tiny_comparison_runs_nanogpt_and_both_backends(tmp_path):
    nanogpt = _nanogpt_copy(tmp_path / "nanogpt")
    if nanogpt is None:
        pytest.skip(f"no nanoGPT copy: neither {ROOT / '.nanogpt'} nor the mirror {MIRROR} exists")
    out = tmp_path / "out"
    args = [sys.executable, str(SCRIPT), "--tiny", "--nanogpt", str(nanogpt), "--out", str(out)]
    args += ["--data-dir", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for parts in ("nanogpt,torch", "jax"):  # a later part adds its curve to the saved ones
        done = subprocess.run(args + ["--parts", parts], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert np.fromfile(nanogpt / "data" / compare.DATASET / "val.bin", dtype=np.uint16).size == 33_802
    curves = json.loads((out / "curves.json").read_text())["val_loss"]
    assert sorted(curves["nanogpt"], key=int) == ["0", "2", "4"]  # nanoGPT also evaluates before step 1
    assert sorted(curves["torch"], key=int) == sorted(curves["jax"], key=int) == ["2", "4"]
    for curve in curves.values():  # a fresh 50k-vocabulary model: about ln(50304) = 10.8, and falling
        losses = [curve[s] for s in sorted(curve, key=int)]
        assert all(9.5 < v < 11.5 for v in losses) and losses[-1] < losses[0]
    assert "| best |" in done.stdout and (out / "curves.png").stat().st_size > 0
