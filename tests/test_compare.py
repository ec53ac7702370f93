"""`python -m parity.compare`'s run names: never an existing run's, refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from babygpt.config import BabyGPTError, load_config
from parity.compare import comparison_defaults, main, parity_config

SHAKESPEARE = Path(__file__).resolve().parents[1] / "configs" / "shakespeare.toml"


def test_compare_names_its_runs_apart_and_refuses_existing_ones(tmp_path):
    config = parity_config(load_config(SHAKESPEARE, [f"run.out_dir={tmp_path}"]), SHAKESPEARE)
    assert config.run_dir == tmp_path / "shakespeare-parity"  # not make train's shakespeare-jax
    named = load_config(SHAKESPEARE, ["run.name=x", "run.backend=torch"])
    assert parity_config(named, SHAKESPEARE).run.name == "x-parity"

    (tmp_path / "shakespeare-parity-jax").mkdir()  # an earlier comparison's JAX run
    with pytest.raises(
        BabyGPTError, match=r"shakespeare-parity-jax already exists.*run\.name=<another name>"
    ):
        main([f"run.out_dir={tmp_path}", "--config", str(SHAKESPEARE)])  # options after overrides too
    assert [p.name for p in tmp_path.iterdir()] == ["shakespeare-parity-jax"]  # no init, no torch run


def test_compare_runs_every_step_in_float64_unless_told_otherwise(tmp_path):
    assert comparison_defaults(SHAKESPEARE, ["train.max_steps=5"]) == [
        "train.log_interval=1",
        "train.dtype=float64",
        "train.max_steps=5",
    ]
    given = ["train.dtype=float32", "train.log_interval=5"]
    assert comparison_defaults(SHAKESPEARE, given) == given
    preset = tmp_path / "bf16.toml"  # a preset that names its dtype keeps it
    preset.write_text('[train]\ndtype = "bfloat16"\n')
    assert comparison_defaults(preset, []) == ["train.log_interval=1"]
