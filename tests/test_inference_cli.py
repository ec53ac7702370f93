"""inference.py end to end, in subprocesses: both backends, --stream, --interactive, and its errors.

The model is tiny but rigged: its position embeddings point each position's prediction at a chosen
token, so greedy decoding writes " smile 😀 ok" and then <|endoftext|> whatever the prompt. The emoji's
bytes are split across two tokens, which is what streaming has to get right.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from babygpt.config import ModelConfig
from babygpt.hf import write_hf_dir
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
    assert "settings: SamplingSettings(temperature=0.0" in result.stderr
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
