"""The Hugging Face GPT-2 directory format (config.json + model.safetensors), framework-free.

Both backends read and write through these numpy dicts keyed by HF names
(`transformer.h.0.attn.c_attn.weight`, ...). HF stores its Conv1D weights as (in, out), like Flax
kernels and unlike `nn.Linear`; the vocabulary is unpadded (50257 rows) and `lm_head` is tied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from babygpt.config import BabyGPTError, ModelConfig
from babygpt.files import set_usual_mode

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# config.json fields that change the function GPT-2 computes, with the value babyGPT computes. A
# missing field means the value here (transformers' default); any other value is refused, by name.
GPT2_FUNCTION = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # the tanh GELU, two names for it
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),
}


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT2LMHeadModel's state, minus the tied lm_head, and its HF shape."""
    C = config.n_embd
    layer = {"ln_1": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "ln_2": C, "mlp.c_fc": 4 * C, "mlp.c_proj": C}
    fan_in = {"attn.c_attn": C, "attn.c_proj": C, "mlp.c_fc": C, "mlp.c_proj": 4 * C}
    shapes = {
        "transformer.wte.weight": (config.vocab_size, C),
        "transformer.wpe.weight": (config.block_size, C),
    }
    for i in range(config.n_layer):
        for name, width in layer.items():
            # Conv1D weights are (in, out); LayerNorm weights and every bias are (out,)
            shapes[f"transformer.h.{i}.{name}.weight"] = (fan_in[name], width) if name in fan_in else (width,)
            if config.bias:
                shapes[f"transformer.h.{i}.{name}.bias"] = (width,)
    shapes["transformer.ln_f.weight"] = (C,)
    if config.bias:
        shapes["transformer.ln_f.bias"] = (C,)
    return shapes


def hf_names(config: ModelConfig) -> list[str]:
    """Every tensor name of a GPT2LMHeadModel's state, minus the tied lm_head."""
    return list(hf_shapes(config))


def pad_vocab(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensors for a model of `config`: shapes checked, the embedding padded with zero rows.

    An embedding that has its padded rows already (the parity tests' full layout) keeps them.
    """
    shapes = {name: array.shape for name, array in tensors.items()}
    if shapes.get("transformer.wte.weight", (0,))[0] == config.padded_vocab_size:
        shapes["transformer.wte.weight"] = (config.vocab_size, *shapes["transformer.wte.weight"][1:])
    check_shapes(shapes, config, "the weights")
    wte = tensors["transformer.wte.weight"]
    pad = np.zeros((config.padded_vocab_size - wte.shape[0], wte.shape[1]), wte.dtype)
    return {**tensors, "transformer.wte.weight": np.concatenate([wte, pad])}


def unpad_vocab(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """The model's tensors in HF layout: the embedding cut back to the tokenizer's vocabulary."""
    return {**tensors, "transformer.wte.weight": tensors["transformer.wte.weight"][: config.vocab_size]}


def check_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, what: str, fix: str = "") -> None:
    """One line if a tensor is missing or its shape (by HF name) is not the one `config`'s model needs."""
    for name, shape in hf_shapes(config).items():
        if name not in shapes:
            raise BabyGPTError(f"{what} lack the GPT-2 tensor {name}{fix}")
        if tuple(shapes[name]) != shape:
            raise BabyGPTError(
                f"{what} do not fit the model: {name} is {tuple(shapes[name])}, the model's is {shape}{fix}"
            )


def hf_config_dict(config: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "vocab_size": config.vocab_size,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "babygpt_bias": config.bias,
    }


# The ModelConfig fields that decide the function a model's weights compute.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "bias", "layer_norm_epsilon")


def shape_mismatches(
    have: ModelConfig | dict,
    want: ModelConfig,
    where: str = "the checkpoint",
    fields: tuple[str, ...] = MODEL_FIELDS,
) -> list[str]:
    """The fields in which a stored model (a ModelConfig, or one saved as a dict) differs from `want`.

    One rule for every place that loads weights into a configured model: `train.init_from` here,
    and each backend's checkpoint restore (which adds `vocab_multiple`: its tables are padded). A
    field a dict lacks was saved before the field existed, and had its default.
    """
    defaults = dataclasses.asdict(ModelConfig())
    have = have if isinstance(have, dict) else dataclasses.asdict(have)
    current = dataclasses.asdict(want)
    return [
        f"model.{k}={have.get(k, defaults[k])!r} in {where} but {current[k]!r} in the config"
        for k in fields
        if have.get(k, defaults[k]) != current[k]
    ]


def read_pretrained(path: str | Path, want: ModelConfig) -> dict[str, np.ndarray]:
    """The tensors of the HF directory `train.init_from` names, refused unless its model is `want`'s."""
    pretrained, tensors = read_hf_dir(path)
    diffs = shape_mismatches(pretrained, want, str(path))
    if diffs:
        raise BabyGPTError(f"train.init_from={path} has {'; '.join(diffs)}; set the [model] section to match")
    return tensors


def read_hf_config(path: str | Path) -> ModelConfig:
    """The model of a Hugging Face GPT-2 directory, checked without loading its weights.

    config.json is read whole and the safetensors header checked against it: a file that cannot be
    read, a function babyGPT does not compute (`GPT2_FUNCTION`), tensors that are missing or do not
    fit the config are each refused with one line, before any backend is imported.
    """
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise BabyGPTError(
            f"{path} is not a Hugging Face GPT-2 directory (needs config.json and model.safetensors)"
        )
    fields = _read_config(config_file)
    with _readable(weights_file), safe_open(weights_file, framework="numpy") as stored:
        keys = {_hf_key(k): k for k in stored.keys()}
        shapes = {name: tuple(stored.get_slice(k).get_shape()) for name, k in keys.items()}
        # transformers writes the output layer only when it is not tied to wte: refuse, unless equal
        untied = {"lm_head.weight", "transformer.wte.weight"} <= keys.keys() and not np.array_equal(
            stored.get_tensor(keys["lm_head.weight"]), stored.get_tensor(keys["transformer.wte.weight"])
        )
    if untied:
        raise BabyGPTError(
            f"{weights_file} has an lm_head.weight of its own (tie_word_embeddings=false);"
            " babyGPT computes GPT-2's output layer tied to wte only, so it cannot load this model"
        )
    # Our exports of bias-free models carry zero biases (HF GPT-2 always has them) and say so.
    fields.setdefault("bias", "transformer.h.0.attn.c_attn.bias" in shapes)
    config = ModelConfig(**fields)
    check_shapes(
        shapes,
        config,
        f"{weights_file}'s tensors (config.json: {_shape_text(config)})",
        "; config.json does not describe these weights: export the model again",
    )
    return config


def read_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The model config (`read_hf_config`) and the float32 tensors of a Hugging Face GPT-2 directory."""
    config = read_hf_config(path)
    weights_file = Path(path) / "model.safetensors"
    with _readable(weights_file):
        tensors = {_hf_key(k): v for k, v in load_file(weights_file).items()}
    return config, {n: tensors[n].astype(np.float32) for n in hf_names(config)}


def _hf_key(name: str) -> str:
    """transformers saves a bare GPT2Model's tensors without the `transformer.` prefix."""
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


@contextlib.contextmanager
def _readable(weights_file: Path):
    """A corrupt, truncated or unreadable safetensors file as one line."""
    try:
        yield
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BabyGPTError(
            f"{weights_file} is not a readable safetensors file ({reason}); export or download it again"
        ) from None


def _read_config(config_file: Path) -> dict:
    """config.json as ModelConfig fields, read whole: every field that changes the function is checked.

    `bias` is among them only when the file says (`babygpt_bias`, written by our exports).
    """
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BabyGPTError(f"{config_file} is not valid JSON ({e}); export or download it again") from None
    if not isinstance(hf, dict):
        raise BabyGPTError(f"{config_file} holds a {type(hf).__name__}, not a JSON object of GPT-2 settings")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise BabyGPTError(f"{config_file.parent} holds a {hf.get('model_type')!r} model, not GPT-2")
    for key, supported in GPT2_FUNCTION.items():
        if key in hf and hf[key] not in supported:
            raise BabyGPTError(
                f"{config_file} sets {key}={json.dumps(hf[key])}; babyGPT computes GPT-2 only"
                f" ({key}={json.dumps(supported[0])}), so it cannot load this model"
            )
    shape = {}
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
        value = hf.get(key)
        if type(value) is not int or value < 1:
            raise BabyGPTError(f"{config_file}: {key} must be a positive integer, got {json.dumps(value)}")
        shape[key] = value
    if shape["n_embd"] % shape["n_head"]:
        raise BabyGPTError(
            f"{config_file}: n_embd={shape['n_embd']} is not divisible by n_head={shape['n_head']}"
        )
    if hf.get("n_inner") not in (None, 4 * shape["n_embd"]):
        raise BabyGPTError(
            f"{config_file} sets n_inner={json.dumps(hf['n_inner'])}; babyGPT computes GPT-2's MLP"
            f" of 4 * n_embd = {4 * shape['n_embd']} only, so it cannot load this model"
        )
    epsilon = hf.get("layer_norm_epsilon", 1e-5)
    if type(epsilon) not in (int, float) or not 0 < epsilon < 1:
        raise BabyGPTError(
            f"{config_file}: layer_norm_epsilon must be a number in (0, 1), got {json.dumps(epsilon)}"
        )
    fields = dict(
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        vocab_size=shape["vocab_size"],
        block_size=shape["n_positions"],
        layer_norm_epsilon=float(epsilon),
    )
    if "babygpt_bias" in hf:
        if type(hf["babygpt_bias"]) is not bool:
            raise BabyGPTError(
                f"{config_file}: babygpt_bias must be true or false, got {hf['babygpt_bias']!r}"
            )
        fields["bias"] = hf["babygpt_bias"]
    return fields


def _shape_text(config: ModelConfig) -> str:
    c = config
    return f"n_layer={c.n_layer}, n_embd={c.n_embd}, vocab_size={c.vocab_size}, n_positions={c.block_size}"


def write_hf_dir(path: str | Path, config: ModelConfig, tensors: dict[str, np.ndarray]) -> Path:
    """Write atomically: a directory that appears is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        set_usual_mode(tmp)
        full = dict(tensors)
        if not config.bias:  # HF GPT-2 always has biases: zeros compute the same function
            full.update(_zero_biases(config))
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in full.items()},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        set_usual_mode(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def export_into_run_dir(run_dir: str | Path, config: ModelConfig, tensors: dict[str, np.ndarray]) -> Path:
    """model.safetensors + config.json beside a run's other files, each appearing complete.

    The pair is written whole into a hidden directory first, then moved in (weights first), so a
    reader of the run directory never sees a half-written export.
    """
    run_dir = Path(run_dir)
    try:
        staging = write_hf_dir(run_dir / ".export", config, tensors)
    except (OSError, SafetensorError) as e:  # a full disk or a read-only directory
        reason = getattr(e, "strerror", None) or str(e).rsplit(":", 1)[-1].strip()
        raise BabyGPTError(
            f"cannot write {run_dir / 'model.safetensors'} ({reason}); free space or choose another run.out_dir"
        ) from None
    try:
        for name in ("model.safetensors", "config.json"):
            os.replace(staging / name, run_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return run_dir


def _zero_biases(config: ModelConfig) -> dict[str, np.ndarray]:
    shapes = hf_shapes(dataclasses.replace(config, bias=True))
    return {name: np.zeros(shape, np.float32) for name, shape in shapes.items() if name.endswith(".bias")}
