"""The Hugging Face GPT-2 directory format (config.json + model.safetensors), framework-free.

Both backends read and write through these numpy dicts keyed by HF names
(`transformer.h.0.attn.c_attn.weight`, ...). HF stores its Conv1D weights as (in, out), like Flax
kernels and unlike `nn.Linear`; the vocabulary is unpadded (50257 rows) and `lm_head` is tied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from babygpt.config import BabyGPTError, ModelConfig
from babygpt.files import set_usual_mode

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_names(config: ModelConfig) -> list[str]:
    """Every tensor name of a GPT2LMHeadModel's state, minus the tied lm_head."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(config.n_layer):
        for layer in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names.append(f"transformer.h.{i}.{layer}.weight")
            if config.bias:
                names.append(f"transformer.h.{i}.{layer}.bias")
    names.append("transformer.ln_f.weight")
    if config.bias:
        names.append("transformer.ln_f.bias")
    return names


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
        "layer_norm_epsilon": 1e-5,
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


def shape_mismatches(pretrained: ModelConfig, wanted: ModelConfig) -> list[str]:
    """The shape fields in which a checkpoint's model differs from the configured one."""
    fields = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "bias")
    have, want = dataclasses.asdict(pretrained), dataclasses.asdict(wanted)
    return [f"model.{k}={have[k]!r} (config: {want[k]!r})" for k in fields if have[k] != want[k]]


def read_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise BabyGPTError(
            f"{path} is not a Hugging Face GPT-2 directory (needs config.json and model.safetensors)"
        )
    hf = json.loads(config_file.read_text())
    if hf.get("model_type", "gpt2") != "gpt2":
        raise BabyGPTError(f"{path} holds a {hf.get('model_type')!r} model, not GPT-2")
    tensors = {
        k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
        for k, v in load_file(weights_file).items()
    }
    # Our exports of bias-free models carry zero biases (HF GPT-2 always has them) and say so here.
    bias = hf.get("babygpt_bias", "transformer.h.0.attn.c_attn.bias" in tensors)
    config = ModelConfig(
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        bias=bool(bias),
    )
    missing = [n for n in hf_names(config) if n not in tensors]
    if missing:
        raise BabyGPTError(f"{weights_file} lacks {len(missing)} GPT-2 tensors, e.g. {missing[0]}")
    return config, {n: tensors[n].astype(np.float32) for n in hf_names(config)}


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
    staging = write_hf_dir(run_dir / ".export", config, tensors)
    try:
        for name in ("model.safetensors", "config.json"):
            os.replace(staging / name, run_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return run_dir


def _zero_biases(config: ModelConfig) -> dict[str, np.ndarray]:
    C = config.n_embd
    widths = {
        "ln_1": C,
        "attn.c_attn": 3 * C,
        "attn.c_proj": C,
        "ln_2": C,
        "mlp.c_fc": 4 * C,
        "mlp.c_proj": C,
    }
    out = {
        f"transformer.h.{i}.{layer}.bias": np.zeros(w, np.float32)
        for i in range(config.n_layer)
        for layer, w in widths.items()
    }
    out["transformer.ln_f.bias"] = np.zeros(C, np.float32)
    return out
