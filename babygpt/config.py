"""Typed configuration shared by both backends: TOML files mapped onto frozen dataclasses.

`load_config` reads a TOML preset, applies `section.key=value` overrides from the command line and
validates the result; every mistake a user can make becomes one `ConfigError` line naming the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class BabyGPTError(Exception):
    """An error caused by the user's input; the CLIs print its message as one line and exit 2."""


ORDERS = ("epochs", "random")  # data.order


class ConfigError(BabyGPTError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257  # the tokenizer's vocabulary; the embedding table is padded past it
    block_size: int = 1024
    bias: bool = True
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5  # GPT-2's; a Hugging Face config.json may say otherwise
    vocab_multiple: int = 64  # pad the embedding rows to a multiple of this (50257 -> 50304)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # tests
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # CPU runs
}


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 16  # sequences per device per micro-step
    total_batch_tokens: int = 0  # tokens per optimizer step; 0 means one micro-batch per device
    max_lr: float = 6e-4
    min_lr: float | None = None  # None means 0.1 * max_lr
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 turns clipping off
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    eval_interval: int = 250
    eval_steps: int = 20  # 0 turns evaluation off; sizes it only while eval_tokens is 0
    eval_tokens: int = (
        0  # validation tokens per evaluation, any device count; 0: eval_steps x micro_batch x block
    )
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 1337
    dtype: str = "auto"  # auto: bfloat16 compute on GPU, float32 on CPU
    compile: bool = False  # torch.compile (the JAX step is always jitted)
    fsdp: bool = False  # shard params and optimizer state over the devices (JAX: mesh axis; torch: FSDP2)
    remat: bool = False  # activation checkpointing, for the big presets
    sample_tokens: int = 200  # tokens sampled at the end of a run; 0 turns it off
    sample_prompt: str = "\n"
    init_from: str = ""  # a Hugging Face GPT-2 directory to start from instead of random init

    @property
    def final_lr(self) -> float:
        return 0.1 * self.max_lr if self.min_lr is None else self.min_lr


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "shakespeare"
    data_dir: str = "data"
    # The training sample order (babygpt.data.TokenWindows): "epochs" shows each token at most once
    # per epoch, at window boundaries drawn afresh every epoch; "random" is nanoGPT's, every
    # sequence at a uniformly random start, drawn with replacement.
    order: str = "epochs"


@dataclass(frozen=True)
class RunConfig:
    name: str | None = None  # None: `<preset>-<backend>` (see default_run_name)
    out_dir: str = "out"
    resume: bool = False
    backend: str = "jax"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


BACKENDS = ("jax", "torch")
DTYPES = ("auto", "float32", "bfloat16", "float64")  # float64: every op, for parity checks on a CPU


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _section_types(section_cls) -> dict[str, type]:
    return typing.get_type_hints(section_cls)


def _coerce(value, hint, where: str):
    """Convert a TOML value or a command-line string to the field's type."""
    if isinstance(value, (dict, list)):  # a TOML table or array where one value belongs
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    if isinstance(hint, types.UnionType):  # `float | None`
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    return str(value)


def _apply(config: Config, section: str, key: str, value, where: str) -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{where}: unknown section [{section}]{_closest(section, sections)}")
    current = getattr(config, section)
    hints = _section_types(type(current))
    if section == "model" and key == "preset":  # `model.preset=gpt2` sets the shape in one go
        shape = dataclasses.asdict(ModelConfig.preset(str(value)))
        shape = {k: v for k, v in shape.items() if k in PRESETS[str(value)]}
        return dataclasses.replace(config, model=dataclasses.replace(current, **shape))
    if key not in hints:
        valid = [f"{section}.{k}" for k in hints]
        raise ConfigError(f"{where}: unknown key {section}.{key}{_closest(f'{section}.{key}', valid)}")
    new = dataclasses.replace(current, **{key: _coerce(value, hints[key], where)})
    return dataclasses.replace(config, **{section: new})


def validate(config: Config) -> Config:
    """Every value checked before anything runs, one rule for both backends; one line per mistake."""
    m, t, r = config.model, config.train, config.run
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "vocab_multiple"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name}={getattr(m, name)} must be positive")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if not 0.0 < m.layer_norm_epsilon < 1.0:
        raise ConfigError(f"model.layer_norm_epsilon={m.layer_norm_epsilon} must be in (0, 1), e.g. 1e-5")
    for name in ("max_steps", "micro_batch_size"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be positive")
    # Each interval counts steps; every one of them also fires at the last step, so a value above
    # train.max_steps means "only at the end". 0 has no meaning (evaluation is turned off by
    # train.eval_steps=0, the sample by train.sample_tokens=0).
    for name in ("log_interval", "eval_interval", "checkpoint_interval"):
        if getattr(t, name) <= 0:
            raise ConfigError(
                f"train.{name}={getattr(t, name)} must be at least 1;"
                f" set it above train.max_steps={t.max_steps} to act only at the end"
            )
    for name in ("total_batch_tokens", "warmup_steps", "eval_steps", "eval_tokens", "sample_tokens"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 0")
    if t.keep_checkpoints < 1:
        raise ConfigError(
            f"train.keep_checkpoints={t.keep_checkpoints} must be at least 1 (the one to resume from)"
        )
    if not (math.isfinite(t.max_lr) and t.max_lr > 0):
        raise ConfigError(f"train.max_lr={t.max_lr} must be a positive number, e.g. 6e-4")
    if not (math.isfinite(t.final_lr) and 0 <= t.final_lr <= t.max_lr):
        raise ConfigError(f"train.min_lr={t.final_lr} must be a number in [0, train.max_lr={t.max_lr}]")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be in [0, 1), e.g. 0.9 and 0.95")
    if not (math.isfinite(t.eps) and t.eps > 0):
        raise ConfigError(f"train.eps={t.eps} must be a small positive number, e.g. 1e-8")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be a number >= 0, e.g. 0.1")
    if not (math.isfinite(t.grad_clip) and t.grad_clip >= 0):
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be a number >= 0 (0 turns clipping off)")
    if t.dtype not in DTYPES:
        raise ConfigError(f"train.dtype={t.dtype!r}: choose one of {', '.join(DTYPES)}")
    if not config.data.dataset.strip():
        raise ConfigError("data.dataset is empty; name a dataset under data.data_dir, e.g. shakespeare")
    if config.data.order not in ORDERS:
        raise ConfigError(f"data.order={config.data.order!r}: choose one of {', '.join(ORDERS)}")
    if r.name is None or not r.name.strip() or r.name in (".", "..") or any(sep in r.name for sep in "/\\"):
        raise ConfigError(
            f"run.name={r.name!r} must be a plain directory name (the run goes to run.out_dir/run.name);"
            " set run.out_dir for another place"
        )
    if r.backend not in BACKENDS:
        raise ConfigError(
            f"unknown backend {r.backend!r}{_closest(r.backend, BACKENDS)}; choose one of {', '.join(BACKENDS)}"
        )
    return config


def require_positive(option: str, value: int) -> int:
    """For a tool's own integer flags (`--seq`, `--limit`, ...): one line naming the flag if < 1."""
    if value < 1:
        raise ConfigError(f"{option} {value}: must be at least 1")
    return value


def preset_name(path: str | Path | None) -> str:
    """A preset's name: its file name without .toml (`run` for no file)."""
    return Path(path).stem if path is not None else "run"


def default_run_name(path: str | Path | None, backend: str) -> str:
    """The run's name when neither the preset nor an override gives one: the preset's name and the
    backend, e.g. shakespeare-jax, so that the two backends' runs of one preset sit side by side."""
    return f"{preset_name(path)}-{backend}"


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file, then each `section.key=value` override, then the run's name
    where none was given (`default_run_name`), then validation."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; the presets are in configs/")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: invalid TOML ({e}); fix the file or start from configs/") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in values.items():
                config = _apply(config, section, key, value, str(path))
    for item in overrides:
        name, sep, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        config = _apply(config, section.strip(), key.strip(), value.strip(), f"override {item!r}")
    if config.run.name is None:
        run = dataclasses.replace(config.run, name=default_run_name(path, config.run.backend))
        config = dataclasses.replace(config, run=run)
    return validate(config)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> Config:
    config = Config()
    for section, values in data.items():
        for key, value in values.items():
            config = _apply(config, section, key, value, "saved config")
    return validate(config)


def dump_toml(config: Config) -> str:
    """The resolved config as TOML; `None` values are left out (TOML has no null)."""
    lines = []
    for section, values in config_to_dict(config).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                lines.append(f'{key} = "{escaped}"')
            else:
                lines.append(f"{key} = {value!r}")
        lines.append("")
    return "\n".join(lines)


def compute_dtype_name(dtype: str, platform: str) -> str:
    """`train.dtype` resolved: `auto` is bfloat16 matmuls on a GPU, float32 on a CPU (where bfloat16
    is slow and imprecise). `platform` is the framework's name for the device: gpu, cuda or cpu."""
    if dtype == "auto":
        return "bfloat16" if platform in ("gpu", "cuda") else "float32"
    return dtype
