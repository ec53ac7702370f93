"""inference.py end to end, in subprocesses: both backends, --stream, --interactive, and its errors.

The model is tiny but rigged: its position embeddings point each position's prediction at a chosen
token, so greedy decoding writes " smile 😀 ok" and then <|endoftext|> whatever the prompt. The emoji's
bytes are split across two tokens, which is what streaming has to get right.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from babygpt.config import BabyGPTError, ModelConfig
from babygpt.hf import GPT2_FUNCTION, write_hf_dir
from babygpt.sampling import SamplingSettings
from babygpt.tokenizer import EOT, get_tokenizer
from babygpt_torch.model import GPT, hf_tensors

ROOT = Path(__file__).resolve().parent.parent
COMPLETION = " smile 😀 ok"
PROMPT = "Hi"  # one token, so position p predicts the p-th token of the completion


@pytest.fixture(scope="module")
def rigged_dir(tmp_path_factory) -> Path:
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)  # the full GPT-2 vocabulary
    targets = get_tokenizer().encode(COMPLETION) + [EOT]
    assert len(get_tokenizer().encode(PROMPT)) == 1
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        wpe, wte = model.transformer.wpe.weight, model.transformer.wte.weight
        wpe.zero_()
        for pos, token in enumerate(targets):
            # A zero-mean direction per position, so LayerNorm keeps it: wpe[pos] dominates the
            # residual stream and the tied lm_head scores highest the row that points the same way.
            direction = torch.zeros(config.n_embd)
            direction[2 * pos], direction[2 * pos + 1] = 1.0, -1.0
            wpe[pos] = 100 * direction
            wte[token] = direction
    return write_hf_dir(tmp_path_factory.mktemp("rigged") / "hf", config, hf_tensors(model))


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "inference.py"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.parametrize(
    "backend, stream",
    [("torch", False), ("torch", True), ("jax", True)],
    ids=["torch", "torch-stream", "jax-stream"],  # one JAX start-up: the slow one
)
def test_greedy_completion_is_the_same_streamed_or_not_in_both_backends(rigged_dir, backend, stream):
    args = ["--checkpoint", str(rigged_dir), "--backend", backend, "--prompt", PROMPT, "--temperature", "0"]
    result = run(*args, "--max-tokens", "8", *(["--stream"] if stream else []))
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + COMPLETION + "\n"  # stops at <|endoftext|>, which is not printed
    assert "4 tokens in " in result.stderr.splitlines()[-1]


def test_interactive_session_through_a_pipe(rigged_dir):
    lines = ["/temp 0", "/max 2", PROMPT, "/max 8", "/topk 5", PROMPT, "/temp -1", "/bogus", ""]
    result = run(
        "--model-path", str(rigged_dir), "--backend", "torch", "--interactive", stdin="\n".join(lines)
    )
    assert result.returncode == 0, result.stderr  # end of input leaves cleanly
    # Greedy after /temp 0, whatever the seed; two new tokens, then the whole completion.
    assert result.stdout == f"{PROMPT} smile \ufffd\n{PROMPT}{COMPLETION}\n"
    assert "now sampling with greedy (temperature 0), top-k off, top-p off, 100 new tokens" in result.stderr
    assert "SamplingSettings(" not in result.stderr  # said in words, not as a dataclass repr
    assert "error: temperature must be >= 0" in result.stderr  # a bad command keeps the session
    assert "error: unknown command /bogus" in result.stderr
    assert "6 tokens in " in result.stderr.splitlines()[-1]


def test_quit_command_leaves_with_exit_0_and_a_run_picks_its_own_backend(rigged_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(rigged_dir, run_dir)
    (run_dir / "config.toml").write_text('[run]\nbackend = "torch"\n')
    result = run("--checkpoint", str(run_dir), "--interactive", stdin="/quit\nHi\n")
    assert result.returncode == 0, result.stderr
    assert "with the torch backend" in result.stderr  # from the run's config.toml, not the jax default
    assert result.stdout == ""
    assert "0 tokens in " in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "no/such/run"], "no checkpoint directory at no/such/run; train one with"),
        (["--prompt", ""], "the prompt is empty"),
        (["--temperature", "-0.5"], "temperature must be >= 0"),
        (["--top-p", "1.5"], "top-p must be in (0, 1]"),
        (["--top-p", "0"], "top-p must be in (0, 1]"),
    ],
)
def test_user_errors_exit_2_with_one_line(rigged_dir, args, message):
    result = run("--checkpoint", str(rigged_dir), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert result.stdout == ""


def test_run_directory_without_export_names_the_fix(tmp_path):
    (tmp_path / "config.toml").write_text('[run]\nbackend = "torch"\n')
    result = run("--checkpoint", str(tmp_path), "--prompt", "Hi")
    assert result.returncode == 2
    assert "has no model.safetensors + config.json; the run has not exported its model yet" in result.stderr


@pytest.fixture(scope="module")
def transformers_dir(tmp_path_factory) -> Path:
    """A real Hugging Face GPT-2 directory, written by transformers itself: the full vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("transformers") / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16)).save_pretrained(path)
    return path


def _set(**fields) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **fields}))

    return edit


def _untied_lm_head(path: Path) -> None:
    """What transformers saves for tie_word_embeddings=false, minus the config field that says so."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _truncate(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


# One bad directory each: what is wrong with it, and the words of the one line that says so.
BAD_DIRECTORIES = {
    "malformed-config": (lambda p: (p / "config.json").write_text('{"n_layer": 1,'), "is not valid JSON"),
    "config-not-an-object": (lambda p: (p / "config.json").write_text("[1, 2]"), "not a JSON object"),
    "n_head-does-not-divide": (_set(n_head=3), "n_embd=32 is not divisible by n_head=3"),
    "config-does-not-fit-weights": (_set(n_embd=64), "do not fit the model: transformer.wte.weight"),
    "missing-field": (_set(n_layer=None), "n_layer must be a positive integer"),
    "truncated-weights": (_truncate, "is not a readable safetensors file"),
    "random-bytes-weights": (
        lambda p: (p / "model.safetensors").write_bytes(bytes(range(256)) * 8),
        "is not a readable safetensors file",
    ),
    "untied-lm-head": (_untied_lm_head, "has an lm_head.weight of its own"),
    "n_inner": (_set(n_inner=100), "sets n_inner=100"),
    **{
        f"{key}": (_set(**{key: value}), f"sets {key}={json.dumps(value)}")
        for key, value in [
            ("activation_function", "gelu"),
            ("scale_attn_by_inverse_layer_idx", True),
            ("scale_attn_weights", False),
            ("tie_word_embeddings", False),
            ("reorder_and_upcast_attn", True),
            ("add_cross_attention", True),
        ]
    },
}


def _checksums(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("case", list(BAD_DIRECTORIES))
def test_a_directory_that_cannot_be_computed_is_refused_in_one_line(transformers_dir, tmp_path, case):
    edit, message = BAD_DIRECTORIES[case]
    bad = tmp_path / "model"
    shutil.copytree(transformers_dir, bad)
    edit(bad)
    before = _checksums(bad)
    for flag, backend in (("--checkpoint", "jax"), ("--model-path", "torch")):
        result = run(flag, str(bad), "--backend", backend, "--prompt", PROMPT, "--max-tokens", "2")
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert result.stdout == ""
    assert _checksums(bad) == before  # nothing touched


def test_every_refused_function_field_has_a_case():
    assert set(GPT2_FUNCTION) <= set(BAD_DIRECTORIES)


def test_a_transformers_directory_samples_the_same_in_both_backends_past_its_context(transformers_dir):
    """40 new tokens from a model of 16 positions: the sliding window, as the README's 200 tokens on
    the default model of 128. With --compile the tokens/s leave out an untimed warm-up call."""
    outputs = set()
    for backend, flags in (("jax", ["--compile"]), ("torch", [])):
        args = ["--checkpoint", str(transformers_dir), "--backend", backend, "--prompt", PROMPT]
        result = run(*args, "--temperature", "0", "--max-tokens", "40", *flags)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(PROMPT)
        summary = result.stderr.splitlines()[-1]
        assert summary.startswith("40 tokens in ")
        assert ("after an untimed warm-up call" in summary) == bool(flags), summary
        outputs.add(result.stdout)
    assert len(outputs) == 1  # greedy: the same text from both


def test_a_model_of_a_smaller_vocabulary_than_the_tokenizer_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=100)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    result = run("--checkpoint", str(tmp_path), "--prompt", PROMPT)  # "Hi" is token 17250
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "holds a model of 100 tokens, fewer than GPT-2's tokenizer's 50257" in result.stderr


def _read_until(fd: int, buffer: bytearray, done: Callable[[bytes], bool], timeout: float) -> bool:
    """Read the pty into buffer until done(buffer) or timeout; False at the timeout or at its end."""
    deadline = time.monotonic() + timeout
    while not done(bytes(buffer)):
        if time.monotonic() > deadline:
            return False
        if select.select([fd], [], [], 0.1)[0]:
            try:
                data = os.read(fd, 4096)
            except OSError:  # the other side has closed
                return False
            if not data:
                return False
            buffer += data
    return True


def _wait(pid: int, timeout: float) -> int | None:
    """The child's wait status once it has exited, or None if it is still running at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    return None


def test_ctrl_c_in_a_jax_session_stops_the_sample_and_a_second_leaves_with_130(transformers_dir):
    """In a terminal (a pty, so ^C is a real SIGINT from the line discipline): the first Ctrl-C,
    while tokens stream, stops the sample and returns to the prompt, its message on a line of its
    own; the second, at the prompt, leaves with 130. Before the fix this segfaulted (exit 139) in
    about half the tries: the interpreter tore JAX down under a running decode step."""
    args = [
        "--checkpoint",
        str(transformers_dir),
        "--backend",
        "jax",
        "--interactive",
        "--max-tokens",
        "100000",
    ]
    # The child gets the pty as its controlling terminal from `setsid --ctty` (no fork in this
    # process, which JAX would warn about).
    fd, terminal = pty.openpty()
    command = ["setsid", "--ctty", sys.executable, str(ROOT / "inference.py"), *args]
    # A child that hangs dumps every thread's stack on SIGABRT, so that a failure says where.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    child = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT, env=env)
    os.close(terminal)
    pid = child.pid
    out, status = bytearray(), None
    try:
        assert _read_until(fd, out, lambda b: b.endswith(b"> "), 240), out.decode(errors="replace")
        os.write(fd, PROMPT.encode() + b"\n")
        start = len(out)
        assert _read_until(fd, out, lambda b: len(b) > start + 200, 240), out.decode(errors="replace")
        os.write(fd, b"\x03")
        assert _read_until(fd, out, lambda b: b.endswith(b"> "), 60), out.decode(errors="replace")
        os.write(fd, b"\x03")
        _read_until(fd, out, lambda b: False, 60)  # to the end of the output
        status = _wait(pid, 60)
        if status is None:  # still running: its stacks, then fail
            os.kill(pid, signal.SIGABRT)
            _read_until(fd, out, lambda b: False, 10)
            status = _wait(pid, 10)
            pytest.fail("the second Ctrl-C did not end the session:\n" + out.decode(errors="replace"))
    finally:
        if status is None:  # a failed assert: do not leave the child behind
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 130, text
    # The stopped sample's text ends its line before the message (the terminal echoes ^C there).
    assert "^C\r\nstopped; Ctrl-C again (or /quit) to leave\r\n> " in text, text
    assert "Traceback" not in text and "Segmentation" not in text


def test_an_error_while_streaming_starts_its_own_line(rigged_dir, capsys, monkeypatch):
    """The echoed prompt and the tokens so far end their line before the error is raised, so that
    run_cli's `error: ...` (or the REPL's) never continues the streamed text."""
    monkeypatch.syspath_prepend(str(ROOT))
    from inference import Sampler

    sampler = Sampler("torch", rigged_dir, compile=False)
    real = sampler.generate

    def failing(*args, on_token, **kwargs):
        def on_token_then_fail(row: int, token: int) -> None:
            on_token(row, token)
            raise BabyGPTError("the device went away")

        return real(*args, on_token=on_token_then_fail, **kwargs)

    sampler.generate = failing
    with pytest.raises(BabyGPTError, match="the device went away"):
        sampler.run(PROMPT, SamplingSettings(temperature=0.0, max_tokens=8), 1, stream=True)
    assert capsys.readouterr().out == PROMPT + " smile\n"  # the first token, then a newline
