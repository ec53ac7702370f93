"""Bad input at the command lines: one `error:` line naming the fix, exit status 2, nothing changed.

`train.py`, `prepare.py` (and `hellaswag.py`, `parity.convert` in their own test files) are called
in-process through `run_cli`, as their `__main__` does, so many bad inputs cost one pytest process.
Every case checks the files that were there before are byte-identical afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from babygpt.cli import run_cli
from babygpt.config import load_config
from babygpt.data import check_vocab, ensure_dataset, prepare_shakespeare, shard_path
from babygpt.files import atomic_open, staging_dir
from babygpt.hf import write_hf_dir
from babygpt.prepare import log_library_messages_once

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "configs" / "shakespeare.toml"
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only directories


def _load_script(name: str):
    """A top-level script (`train.py`, `prepare.py`) as a module, wherever pytest was started from."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def assert_one_line(main, argv: list[str], message: str, capsys) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(functools.partial(main, argv))
    out = capsys.readouterr()
    assert exit_info.value.code == 2, (argv, out.err)
    assert out.err.count("\n") == 1 and out.err.startswith("error: "), (argv, out.err)
    assert message in out.err, (argv, out.err)


def test_train_takes_options_and_overrides_in_any_order_and_checks_every_value(tmp_path, capsys):
    """Each error names a key set after an option, so the order was read; nothing runs or is written."""
    train = _load_script("train").main
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[train]\nmax_steps = [1, 2]\n")
    before = checksums(tmp_path)
    places = [
        f"--config={SHAKESPEARE}",
        f"data.data_dir={tmp_path / 'data'}",
        f"run.out_dir={tmp_path / 'out'}",
    ]
    cases = [
        (
            ["train.max_steps=3", "--backend={b}", "run.name=x", "train.beta2=1.5"],
            "train.beta2=1.5 must be in",
        ),
        (
            ["--resume", "run.name=x", "--backend={b}", "train.max_steps=20", "train.checkpoint_interval=0"],
            "train.checkpoint_interval=0 must be at least 1",
        ),
        (["model.n_head=0", "--backend={b}"], "model.n_head=0 must be positive"),
        (["--backend={b}", "train.max_lr=nan"], "train.max_lr=nan must be a positive number"),
        (["train.grad_clip=-1", "--backend={b}"], "train.grad_clip=-1.0 must be a number >= 0"),
        (["--backend={b}", "train.sample_tokens=-1"], "train.sample_tokens=-1 must be >= 0"),
        (["--backend={b}", "run.name="], "run.name='' must be a plain directory name"),
        (["--backend={b}", "train.keep_checkpoints=-3"], "train.keep_checkpoints=-3 must be at least 1"),
        # Shakespeare is GPT-2 tokens, prepared or not (it is not here)
        (["model.vocab_size=100", "--backend={b}"], "but model.vocab_size=100; set model.vocab_size=50257"),
        (["--backend={b}", f"--config={bad_toml}"], "expected a single value"),
    ]
    for backend in ("jax", "torch"):
        for args, message in cases:
            assert_one_line(train, [*places, *(a.format(b=backend) for a in args)], message, capsys)
    assert_one_line(train, [*places, "run.name=x", "--backend=tensorflow"], "choose --backend=jax", capsys)
    assert checksums(tmp_path) == before  # no data prepared, no run directory made


def test_damaged_shards_and_a_small_vocabulary_are_refused_before_training(tiny_dataset, tmp_path, capsys):
    train = _load_script("train").main
    data = tiny_dataset / "tiny"
    args = [f"--config={SHAKESPEARE}", f"data.data_dir={tiny_dataset}", "data.dataset=tiny"]
    args += ["model.vocab_size=100", f"run.out_dir={tmp_path / 'out'}"]
    check_vocab(load_config(SHAKESPEARE, args[1:]))  # random tokens < 100 fit, whatever meta.json says
    val = shard_path(data, "val", 0)
    good = val.read_bytes()
    damaged = {
        "truncated": (good[: len(good) // 2], "is not a readable token shard"),
        "random bytes": (np.random.default_rng(0).bytes(500), "is not a readable token shard"),
        "pickled": (
            b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }"
            + b" " * 58
            + b"\n",
            "is not a readable token shard",
        ),
        "float32": (None, "not a row of uint16 tokens"),
    }
    for name, (content, message) in damaged.items():
        if content is None:
            np.save(val, np.zeros(100, np.float32))
        else:
            val.write_bytes(content)
        before = checksums(tmp_path)
        for backend in ("jax", "torch"):
            assert_one_line(train, [*args, f"--backend={backend}"], message, capsys)
        assert checksums(tmp_path) == before, name
    val.write_bytes(good)
    # GPT-2 tokens for a 100-token model: the torch embedding would raise, JAX would say "nan"
    prepare_shakespeare(tmp_path / "gpt2")
    before = checksums(tmp_path)
    for backend in ("jax", "torch"):
        assert_one_line(
            train,
            [
                f"--config={SHAKESPEARE}",
                f"data.data_dir={tmp_path / 'gpt2'}",
                "model.vocab_size=100",
                f"--backend={backend}",
            ],
            "holds token id",
            capsys,
        )
    assert checksums(tmp_path) == before


def test_an_unwritable_data_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    config = load_config(SHAKESPEARE, [f"data.data_dir={tmp_path / 'file' / 'data'}"])
    with pytest.raises(Exception, match="cannot prepare .*; set data.data_dir to a writable directory"):
        ensure_dataset(config)
    if not ROOT_USER:
        (tmp_path / "ro").mkdir(mode=0o555)
        config = load_config(SHAKESPEARE, [f"data.data_dir={tmp_path / 'ro'}"])
        with pytest.raises(Exception, match="cannot prepare .*Permission denied"):
            ensure_dataset(config)
    assert (tmp_path / "file").read_text() == "not a directory"


def test_prepare_takes_options_after_the_command_and_refuses_bad_input(tmp_path, capsys):
    prepare = _load_script("prepare").main
    text = tmp_path / "in" / "a.txt"
    text.parent.mkdir()
    text.write_text("To be, or not to be, that is the question. " * 20)
    run_cli_ok = functools.partial(
        run_cli,
        functools.partial(
            prepare, ["text", str(text), "--name", "a", "--data-dir", str(tmp_path / "d1"), "--workers", "1"]
        ),
    )
    with pytest.raises(SystemExit) as exit_info:
        run_cli_ok()
    assert exit_info.value.code == 0 and (tmp_path / "d1" / "a" / "meta.json").exists()
    with pytest.raises(SystemExit):
        run_cli(
            functools.partial(prepare, ["--data-dir", str(tmp_path / "d2"), "text", str(text), "--name", "a"])
        )
    assert (tmp_path / "d2" / "a" / "meta.json").exists()

    (tmp_path / "in" / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "in" / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "in" / "fake.parquet").write_text("not parquet")
    (tmp_path / "file").write_text("a file")
    d = ["--data-dir", str(tmp_path / "d3"), "--workers", "1"]
    cases = [
        (["text", str(tmp_path / "in" / "latin1.txt"), "--name", "x", *d], "is not UTF-8 text"),
        (["jsonl", str(tmp_path / "in" / "latin1.jsonl"), "--name", "x", *d], "is not UTF-8 text"),
        (["parquet", str(tmp_path / "in" / "fake.parquet"), "--name", "x", *d], "is not a parquet file"),
        (
            ["text", str(text), "--name", "x", "--val-fraction", "1.5", *d],
            "--val-fraction 1.5: must be a fraction",
        ),
        (
            ["text", str(text), "--name", "x", "--val-fraction", "0", *d],
            "--val-fraction 0: must be a fraction",
        ),
        (
            ["text", str(text), "--name", "x", "--val-fraction=-1", *d],
            "--val-fraction -1: must be a fraction",
        ),
        (["text", str(text), "--name", "", *d], "--name '' must be a plain directory name"),
        (["text", str(text), "--name", "../up", *d], "must be a plain directory name"),
        (
            ["text", str(text), "--name", "x", "--data-dir", str(tmp_path / "file" / "d")],
            "choose a writable --data-dir",
        ),
    ]
    if not ROOT_USER:
        (tmp_path / "ro").mkdir(mode=0o555)
        cases.append(
            (["text", str(text), "--name", "x", "--data-dir", str(tmp_path / "ro")], "Permission denied")
        )
    before = checksums(tmp_path)
    for argv, message in cases:
        assert_one_line(prepare, argv, message, capsys)
    assert checksums(tmp_path) == before  # not even an empty dataset directory


def test_hub_retries_are_printed_once():
    """huggingface_hub has its own handler; passing records on to the root handler doubled them."""
    import huggingface_hub.utils.logging  # noqa: F401  (gives the library logger its handler, as datasets does)

    hub = logging.getLogger("huggingface_hub")
    own = io.StringIO()
    old_streams = [h.setStream(own) for h in hub.handlers]
    seen = []
    root_handler = logging.Handler()
    root_handler.emit = seen.append
    logging.getLogger().addHandler(root_handler)
    propagate = hub.propagate
    try:
        log_library_messages_once()
        logging.getLogger("huggingface_hub.utils._http").warning("retrying in 1s")
    finally:
        logging.getLogger().removeHandler(root_handler)
        hub.propagate = propagate
        for handler, stream in zip(hub.handlers, old_streams):
            handler.setStream(stream)
    assert seen == [] and own.getvalue().count("retrying in 1s") == 1


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_written_files_get_the_usual_mode(tmp_path, tiny_model_config, umask):
    """Checkpoints (`atomic_open`), shards, exports (`write_hf_dir`): 0o666 / 0o777 less the umask."""
    from parity.convert import to_hf
    from parity.weights import o1_tensors

    config = tiny_model_config
    old = os.umask(umask)
    try:
        with atomic_open(tmp_path / "checkpoint.pt") as f:
            f.write(b"weights")
        prepare_shakespeare(tmp_path / "data")
        write_hf_dir(tmp_path / "export", config, to_hf(o1_tensors(config, seed=0), config))
        stage = staging_dir(tmp_path / "converted")
    finally:
        os.umask(old)
    files = [tmp_path / "checkpoint.pt", *(tmp_path / "data" / "shakespeare").iterdir()]
    files += [tmp_path / "export" / "model.safetensors", tmp_path / "export" / "config.json"]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for path in (tmp_path / "export", stage):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [stage.name]  # no leftovers
