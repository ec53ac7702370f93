"""Sample text from a trained run or a Hugging Face GPT-2 directory, with either backend.

python inference.py --checkpoint out/shakespeare-jax [--backend jax|torch] --prompt "to be or not to be"
    [--max-tokens 100] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--num-samples 1]
    [--stream] [--interactive] [--compile]

The checkpoint is a directory with model.safetensors + config.json (what training exports, or
OpenAI's GPT-2 in the Hugging Face layout); either backend samples a run of the other. In
--interactive mode each line is a prompt; /help lists the commands that change the settings;
Ctrl-C stops a sample and returns to the prompt, Ctrl-C at the prompt leaves. Any number of new
tokens: past the model's context each token sees the last block_size tokens (a sliding window).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import select
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from babygpt.cli import run_cli
from babygpt.config import BACKENDS, BabyGPTError
from babygpt.hf import read_hf_config
from babygpt.run import StopSignal
from babygpt.sampling import SamplingSettings, StreamDecoder
from babygpt.tokenizer import EOT, encode_prompt, get_tokenizer

log = logging.getLogger("inference")

REPL_HELP = """commands:
  /temp X    temperature (0 is greedy)      /topk N|off   keep the N most likely tokens
  /topp X|off   nucleus sampling (0 < X <= 1)  /max N    new tokens per prompt
  /seed N    random seed                     /help     this text
  /quit      leave (Ctrl-D too)"""
# command -> the SamplingSettings field it sets, and how to read its value
REPL_COMMANDS = {
    "/temp": ("temperature", float),
    "/topk": ("top_k", int),
    "/topp": ("top_p", float),
    "/max": ("max_tokens", int),
    "/seed": ("seed", int),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", "--model-path", dest="checkpoint", required=True, help="run or HF directory"
    )
    parser.add_argument(
        "--backend", default=None, help="jax or torch (default: the run's own backend, else jax)"
    )
    parser.add_argument("--prompt", default=None, help="text to continue (default: start a new document)")
    parser.add_argument("--max-tokens", type=int, default=100, help="new tokens per sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    parser.add_argument(
        "--top-p", type=float, default=None, help="keep the smallest set with this much probability"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-samples", type=int, default=1, help="samples of the prompt, generated as one batch"
    )
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")
    parser.add_argument("--interactive", action="store_true", help="a prompt per line; /help for commands")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (JAX always jits)"
    )
    return parser.parse_args(argv)


def resolve_backend(checkpoint: Path, backend: str | None) -> str:
    """--backend if given, else the backend the run was trained with, else jax."""
    if backend is None:
        run_config = checkpoint / "config.toml"
        if run_config.exists():
            backend = tomllib.loads(run_config.read_text()).get("run", {}).get("backend", "jax")
        else:
            backend = "jax"
    if backend not in BACKENDS:
        raise BabyGPTError(f"unknown backend {backend!r}; choose --backend=jax or --backend=torch")
    return backend


def check_checkpoint(checkpoint: Path) -> None:
    """A directory either backend can load, checked before the (slow) backend import: one line if not."""
    if not checkpoint.is_dir():
        raise BabyGPTError(
            f"no checkpoint directory at {checkpoint}; train one with `python train.py`"
            " and pass --checkpoint out/<run name>"
        )
    if not (checkpoint / "model.safetensors").exists() or not (checkpoint / "config.json").exists():
        hint = (
            "the run has not exported its model yet (training writes it at the end)"
            if (checkpoint / "config.toml").exists()
            else "point --checkpoint at a run directory or a Hugging Face GPT-2 directory"
        )
        raise BabyGPTError(f"{checkpoint} has no model.safetensors + config.json; {hint}")
    config = read_hf_config(checkpoint)
    if config.vocab_size < get_tokenizer().n_vocab:  # a prompt's token ids would fall off the table
        raise BabyGPTError(
            f"{checkpoint} holds a model of {config.vocab_size} tokens, fewer than GPT-2's tokenizer's"
            f" {get_tokenizer().n_vocab}; inference.py samples models of GPT-2's vocabulary"
        )


class Sampler:
    """A loaded model, its backend's generate(), and the printing; counts tokens for the summary.

    With `compile`, the first sample is preceded by an untimed warm-up call with the same batch
    and settings, so that compilation (torch.compile, or JAX's jit) is not counted in tokens/s.
    """

    def __init__(self, backend: str, checkpoint: Path, compile: bool):
        generate = importlib.import_module(f"babygpt_{backend}.generate")  # the same names in both
        self.model = generate.load_model(checkpoint)
        self.generate = generate.generate
        self.wait_until_idle = generate.wait_until_idle
        self.compile = compile or None  # None: the backend's default (torch: CUDA graphs on a GPU)
        self.warm_up = compile
        self.tokenizer = get_tokenizer()
        self.tokens = 0
        self.seconds = 0.0
        self.poll: Callable[[], None] = lambda: None  # called between streamed tokens (the REPL's Ctrl-C)

    def run(self, prompt: str | None, settings: SamplingSettings, num_samples: int, stream: bool) -> None:
        ids = encode_prompt(prompt) if prompt is not None else [EOT]
        out = sys.stdout
        decoder = StreamDecoder.for_tokenizer(self.tokenizer)
        line_open = False  # text on stdout not yet ended by a newline

        def write(text: str) -> None:
            nonlocal line_open
            if text:
                out.write(text)
                out.flush()
                line_open = not text.endswith("\n")

        def on_token(row: int, token: int) -> None:
            self.poll()
            if row == 0:  # the other samples finish together with this one and are printed then
                write(decoder.feed(token))

        def generate(on_token) -> list[list[int]]:
            return self.generate(
                self.model,
                [ids] * num_samples,
                settings.max_tokens,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                seed=settings.seed,
                stop_token=EOT,
                on_token=on_token,
                compile=self.compile,
            )

        if self.warm_up:
            generate((lambda row, token: self.poll()) if stream else None)
            self.warm_up = False
        if stream:
            write(prompt or "")
        try:
            start = time.perf_counter()
            samples = generate(on_token if stream else None)
            self.seconds += time.perf_counter() - start
        except BaseException:  # an error or a Ctrl-C says so on a line of its own
            if line_open:
                write("\n")
            raise
        self.tokens += sum(len(s) for s in samples)
        for i, sample in enumerate(samples):
            if i > 0:
                write("---\n")
            if stream and i == 0:
                write(decoder.flush() + "\n")
            else:
                write((prompt or "") + self.tokenizer.decode(sample) + "\n")

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        after = ", after an untimed warm-up call that compiled the steps" if self.compile else ""
        return f"{self.tokens} tokens in {self.seconds:.2f} s ({rate:.1f} tokens/s{after})"

    def settle(self) -> None:
        """After a Ctrl-C: wait until the device is idle, deferring another Ctrl-C until it is."""
        interrupted = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
        try:
            self.wait_until_idle()
        finally:
            signal.signal(signal.SIGINT, previous)
        if interrupted:
            raise KeyboardInterrupt


def repl(sampler: Sampler, settings: SamplingSettings, num_samples: int) -> int:
    """Each line a prompt, or a /command changing the settings; /quit or end of input leaves (0).

    Ctrl-C during a sample stops it and returns to the prompt; Ctrl-C at the prompt leaves (130).
    """
    print(f"{REPL_HELP}\n", file=sys.stderr)
    # Ctrl-C as a request, acted on where the REPL polls: between tokens and while it waits for a
    # line. Raised by the handler wherever the main thread happened to be, it did not wake a read()
    # blocked at the prompt, and one CI run lost it mid-stream (ARCHITECTURE.md, "Stops").
    with StopSignal(signals=(signal.SIGINT,)) as ctrl_c:
        sampler.poll = ctrl_c.raise_if_received
        return _repl(sampler, settings, num_samples)


def _repl(sampler: Sampler, settings: SamplingSettings, num_samples: int) -> int:
    turn = 0
    while True:
        try:
            line = _read_line(sampler.poll)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        if line is None or line.strip() == "/quit":
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                settings = _command(line, settings)
                print(f"now sampling with {settings.describe()}", file=sys.stderr)
                continue
            # A new seed each turn, so that one prompt sent twice gives two samples; reproducible.
            sampler.run(line, settings.replace(seed=settings.seed + turn), num_samples, stream=True)
            turn += 1
        except BabyGPTError as e:  # a bad command or prompt: say so and keep the session
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            sampler.settle()
            print("stopped; Ctrl-C again (or /quit) to leave", file=sys.stderr)


def _read_line(poll: Callable[[], None]) -> str | None:
    if sys.stdin.isatty():
        print("> ", end="", flush=True)
        # Not a blocking read: the kernel hands Ctrl-C's SIGINT to any of the process's threads
        # (OpenBLAS's, XLA's), and a main thread blocked in read() wakes only if it landed there.
        # Waiting in slices returns to Python, which runs the handler whichever thread took it. A
        # terminal delivers whole lines, so once one is ready, readline() does not block.
        while not select.select([sys.stdin], [], [], 0.1)[0]:
            poll()
        line = sys.stdin.readline()
        if not line:  # Ctrl-D: leave on a new line
            print(file=sys.stderr)
        return line or None
    poll()
    line = sys.stdin.readline()  # a pipe: may hold buffered lines that select() cannot see
    return line or None


def _command(line: str, settings: SamplingSettings) -> SamplingSettings:
    name, _, value = line.partition(" ")
    value = value.strip()
    if name == "/help":
        print(REPL_HELP, file=sys.stderr)
        return settings
    if name not in REPL_COMMANDS:
        raise BabyGPTError(f"unknown command {name}; /help lists the commands")
    field, kind = REPL_COMMANDS[name]
    if value == "off" and field in ("top_k", "top_p"):
        return settings.replace(**{field: None})
    try:
        return settings.replace(**{field: kind(value)})
    except ValueError:
        raise BabyGPTError(f"{name} needs a number, e.g. {name} {kind(1)}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Everything the user can get wrong is checked before the (slow) backend import.
    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, args.max_tokens, args.seed)
    if args.num_samples < 1:
        raise BabyGPTError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.prompt is not None:
        encode_prompt(args.prompt)
    checkpoint = Path(args.checkpoint)
    check_checkpoint(checkpoint)
    backend = resolve_backend(checkpoint, args.backend)
    # Said once the model has loaded, so that a directory it cannot load gets one line, the error.
    sampler = Sampler(backend, checkpoint, args.compile)
    log.info("sampling %s with the %s backend (%s)", checkpoint, backend, settings.describe())
    code = 0
    try:
        if args.interactive:
            code = repl(sampler, settings, args.num_samples)
        else:
            sampler.run(args.prompt, settings, args.num_samples, args.stream)
    except KeyboardInterrupt:
        sampler.settle()  # the interpreter's teardown under a running computation can segfault
        raise
    print(sampler.summary(), file=sys.stderr)
    return code


if __name__ == "__main__":
    run_cli(main)
