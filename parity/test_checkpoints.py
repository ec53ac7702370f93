"""Checkpoint round trips: torch -> JAX -> Hugging Face -> torch without changing a bit, each
backend's checkpoints read back by `parity.convert`, and a model trained by one backend sampling
the same greedy tokens in the other.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

import babygpt_jax.generate as jax_generate
import babygpt_jax.model as jax_gpt
import babygpt_torch.generate as torch_generate
import babygpt_torch.model as torch_gpt
from babygpt.cli import run_cli
from babygpt.hf import read_hf_dir, write_hf_dir
from parity import convert
from parity.conftest import SHAPES
from parity.weights import o1_tensors

WTE = "transformer.wte.weight"


def assert_bit_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32, name
        assert np.array_equal(a[name], b[name]), name  # exact: a conversion is only copies and transposes


def hf_part(tensors: dict, config) -> dict:
    return convert.to_hf(tensors, config)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_torch_to_jax_to_hf_to_torch_is_bit_identical(shape, tmp_path):
    config = SHAPES[shape]
    original = convert.torch_tensors(convert.torch_model(config, o1_tensors(config, seed=5)))
    padded = config.padded_vocab_size > config.vocab_size
    assert not padded or original[WTE][config.vocab_size :].all()  # nonzero, so their fate shows

    through_jax = convert.jax_tensors(convert.jax_model(config, original))
    assert_bit_identical(through_jax, original)  # torch <-> jax keeps even the padded rows

    hf_dir = write_hf_dir(tmp_path / "hf", config, convert.to_hf(through_jax, config))
    read_config, hf = read_hf_dir(hf_dir)
    assert read_config == config
    back = convert.torch_tensors(convert.torch_model(config, hf))
    assert_bit_identical(hf_part(back, config), hf_part(original, config))
    # HF has no padded rows; they come back as zeros, which change no logit (masked to -inf)
    assert not back[WTE][config.vocab_size :].any()

    # the state_dict and nnx.State forms round-trip too
    assert_bit_identical(
        convert.state_dict_to_tensors(convert.tensors_to_state_dict(original, config), config), original
    )
    assert_bit_identical(
        convert.jax_params_to_tensors(convert.tensors_to_jax_params(original, config), config), original
    )

    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(hf_dir)
    hf_state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    for name, array in hf_part(original, config).items():
        assert np.array_equal(hf_state[name], array), name
    assert np.array_equal(hf_state["lm_head.weight"], hf_state[WTE])  # tied


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_checkpoint_equals_export(trained_runs, backend):
    """The latest checkpoint (.pt / orbax), read by parity.convert, is the exported model, bit for bit."""
    run_dir = trained_runs[backend]["run_dir"]
    config, from_checkpoint = convert.load_source(run_dir)
    assert convert.detect_kind(Path(run_dir)) == backend
    assert config == trained_runs["config"].model
    export_config, exported = read_hf_dir(run_dir)
    assert export_config == config
    assert_bit_identical(hf_part(from_checkpoint, config), exported)


def test_trained_models_differ_from_init_and_between_backends_only_by_rounding(trained_runs):
    config = trained_runs["config"].model
    _, init = read_hf_dir(trained_runs["init_from"])
    _, torch_trained = read_hf_dir(trained_runs["torch"]["run_dir"])
    _, jax_trained = read_hf_dir(trained_runs["jax"]["run_dir"])
    for name in init:
        if name.endswith("attn.c_attn.bias"):
            continue  # its key third has a zero true gradient: Adam moves it by noise (test_optim)
        moved = np.abs(torch_trained[name] - init[name]).max()
        assert moved > 1e-3, name
        # 8 Adam steps: the float32 noise of test_optim, compounded; still < 1% of the movement
        assert np.abs(jax_trained[name] - torch_trained[name]).max() < 1e-2 * moved, name
    assert config.padded_vocab_size > config.vocab_size


@pytest.mark.parametrize("trained_by", ["torch", "jax"])
def test_trained_by_one_backend_samples_the_same_greedy_tokens_in_the_other(trained_runs, trained_by):
    run_dir = trained_runs[trained_by]["run_dir"]
    prompts = [[1, 2, 3], [50, 60, 70, 80]]
    tm = torch_gpt.GPT.from_pretrained(run_dir)
    jm = jax_gpt.GPT.from_pretrained(run_dir)
    torch_tokens = torch_generate.generate(tm, prompts, 8, temperature=0, stop_token=None)
    jax_tokens = jax_generate.generate(jm, prompts, 8, temperature=0, stop_token=None)
    assert torch_tokens == jax_tokens
    assert all(len(t) == 8 for t in torch_tokens)


def run_convert_cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr("sys.argv", ["python -m parity.convert", *args])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(convert.main)
    return exit_info.value.code


def test_convert_cli(trained_runs, tmp_path, monkeypatch, capsys):
    config = trained_runs["config"].model
    _, expected = convert.load_source(trained_runs["jax"]["run_dir"])

    # JAX orbax checkpoint -> torch .pt -> Hugging Face directory
    pt = tmp_path / "weights.pt"
    assert run_convert_cli(monkeypatch, trained_runs["jax"]["run_dir"], str(pt)) == 0
    state = torch.load(pt, weights_only=True)
    model = torch_gpt.GPT(config)
    model.load_state_dict(state["model"])
    assert_bit_identical(convert.torch_tensors(model), expected)
    hf_dir = tmp_path / "hf"
    assert run_convert_cli(monkeypatch, str(pt), str(hf_dir)) == 0
    assert_bit_identical(read_hf_dir(hf_dir)[1], hf_part(expected, config))

    # a Hugging Face directory back to JAX params, via the backends' own loader
    jm = jax_gpt.GPT.from_pretrained(hf_dir)
    assert_bit_identical(
        hf_part(convert.jax_params_to_tensors(nnx.state(jm, nnx.Param), config), config),
        hf_part(expected, config),
    )

    capsys.readouterr()
    assert run_convert_cli(monkeypatch, str(tmp_path / "missing"), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err
    assert not (tmp_path / "out").exists()


def checksums(root: Path) -> dict[str, str]:
    """Every file and directory under `root` (the root's own files included), with its content hash."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_convert_never_touches_what_is_there(tmp_path, monkeypatch, capsys):
    """Every destination that overlaps something existing is refused with one line, and nothing changes."""
    config = SHAPES["nobias"]
    runs = tmp_path / "out"
    src = write_hf_dir(runs / "R", config, hf_part(o1_tensors(config, seed=1), config))
    (runs / "other" / "checkpoints").mkdir(parents=True)
    (runs / "other" / "checkpoints" / "step_000001.pt").write_bytes(b"a colleague's run")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("unrelated")
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "old.pt").write_bytes(b"an older conversion")
    before = checksums(tmp_path)
    refused = {
        "keep": "exists and is not empty",  # unrelated files at the destination
        "out/R": "inside the source",  # onto itself
        "out/R/hf": "inside the source",
        "out": "holds the source",  # every run under out/
        "file.txt/hf": "is a file, so",  # a path under a file
        "file.txt": "already exists",  # onto an existing file
        "old.pt": "already exists",
    }
    for dst, message in refused.items():
        capsys.readouterr()
        assert run_convert_cli(monkeypatch, str(src), str(tmp_path / dst)) == 2, dst
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (dst, err)
        assert "Traceback" not in err and "choose" in err
        assert checksums(tmp_path) == before, dst


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_convert_outputs_get_the_usual_mode(tmp_path, monkeypatch, umask):
    """Not the private 0o600 / 0o700 of temporary files: 0o666 / 0o777 less the umask."""
    config = SHAPES["nobias"]
    src = write_hf_dir(tmp_path / "src", config, hf_part(o1_tensors(config, seed=1), config))
    (tmp_path / "empty").mkdir()  # an empty directory is a fine destination
    old = os.umask(umask)
    try:
        for dst in ("hf", "empty", "weights.pt"):
            assert run_convert_cli(monkeypatch, str(src), str(tmp_path / dst)) == 0
    finally:
        os.umask(old)
    for directory in (tmp_path / "hf", tmp_path / "empty"):
        assert directory.stat().st_mode & 0o777 == 0o777 & ~umask
        for name in ("model.safetensors", "config.json"):
            assert (directory / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
        assert_bit_identical(read_hf_dir(directory)[1], read_hf_dir(src)[1])
    assert (tmp_path / "weights.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf", "src", "weights.pt"]  # no leftovers
