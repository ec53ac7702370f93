"""The Hugging Face directory format in the core: shapes, vocabulary padding, and the model checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from babygpt.config import BabyGPTError, ModelConfig
from babygpt.hf import (
    MODEL_FIELDS,
    hf_shapes,
    pad_vocab,
    read_hf_config,
    read_hf_dir,
    read_pretrained,
    shape_mismatches,
    unpad_vocab,
    write_hf_dir,
)

CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)


def test_hf_shapes_are_transformers_own(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=100))
    expected = {
        name: tuple(t.shape)
        for name, t in hf.state_dict().items()
        if name != "lm_head.weight" and not name.endswith(".attn.bias")  # tied; a causal-mask buffer
    }
    assert hf_shapes(CONFIG) == expected


def test_vocabulary_pad_and_unpad_round_trip():
    rng = np.random.default_rng(0)
    tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in hf_shapes(CONFIG).items()}
    padded = pad_vocab(tensors, CONFIG)
    wte = padded["transformer.wte.weight"]
    assert wte.shape == (128, 32) and not wte[100:].any()
    assert np.array_equal(pad_vocab(padded, CONFIG)["transformer.wte.weight"], wte)  # already padded: kept
    assert np.array_equal(
        unpad_vocab(padded, CONFIG)["transformer.wte.weight"], tensors["transformer.wte.weight"]
    )
    with pytest.raises(
        BabyGPTError, match="transformer.wpe.weight is \\(8, 32\\), the model's is \\(16, 32\\)"
    ):
        pad_vocab({**tensors, "transformer.wpe.weight": tensors["transformer.wpe.weight"][:8]}, CONFIG)


def test_shape_mismatches_name_every_differing_field_and_default_what_old_files_lack():
    other = dataclasses.replace(CONFIG, n_embd=64, layer_norm_epsilon=1e-2)
    assert shape_mismatches(other, CONFIG, "out/R") == [
        "model.n_embd=64 in out/R but 32 in the config",
        "model.layer_norm_epsilon=0.01 in out/R but 1e-05 in the config",
    ]
    saved_before_epsilon = {k: v for k, v in dataclasses.asdict(CONFIG).items() if k != "layer_norm_epsilon"}
    assert shape_mismatches(saved_before_epsilon, CONFIG) == []
    assert "vocab_multiple" not in MODEL_FIELDS  # HF tables are unpadded; checkpoints add it themselves
    wider = dataclasses.replace(CONFIG, vocab_multiple=128)
    assert shape_mismatches(wider, CONFIG, fields=(*MODEL_FIELDS, "vocab_multiple")) == [
        "model.vocab_multiple=128 in the checkpoint but 64 in the config"
    ]


def test_init_from_refuses_another_model_and_reads_its_own(tmp_path):
    from babygpt_torch.model import GPT, hf_tensors

    torch.manual_seed(0)
    path = write_hf_dir(tmp_path / "hf", CONFIG, hf_tensors(GPT(CONFIG)))
    assert read_hf_config(path) == CONFIG
    tensors = read_pretrained(path, CONFIG)
    assert all(np.array_equal(tensors[k], v) for k, v in read_hf_dir(path)[1].items())
    with pytest.raises(
        BabyGPTError, match=r"train.init_from=.* has model.n_layer=2 in .* but 3 in the config"
    ):
        read_pretrained(path, dataclasses.replace(CONFIG, n_layer=3))


def test_epsilon_travels_through_export_and_import(tmp_path):
    from babygpt_torch.model import GPT, hf_tensors

    config = dataclasses.replace(CONFIG, layer_norm_epsilon=1e-3)
    path = write_hf_dir(tmp_path / "hf", config, hf_tensors(GPT(config)))
    assert read_hf_config(path).layer_norm_epsilon == 1e-3
    assert GPT.from_pretrained(path).transformer.ln_f.eps == 1e-3
