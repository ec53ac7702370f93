"""The config layer: presets load, overrides apply with their types, every mistake is one clear line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from babygpt.config import ConfigError, ModelConfig, dump_toml, load_config

CONFIG_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.toml"))
SHAKESPEARE = CONFIG_DIR / "shakespeare.toml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_in_configs_loads(path):
    config = load_config(path)
    assert config.model.n_embd % config.model.n_head == 0


def test_shakespeare_is_the_small_default_and_gpt2_124m_is_gpt2():
    shakespeare = load_config(SHAKESPEARE)
    assert (shakespeare.model.n_layer, shakespeare.data.dataset) == (4, "shakespeare")
    gpt2 = load_config(CONFIG_DIR / "gpt2-124m.toml")
    assert (gpt2.model.n_layer, gpt2.model.n_head, gpt2.model.n_embd) == (12, 12, 768)
    assert gpt2.train.total_batch_tokens == 524288


def test_overrides_apply_after_the_file_with_the_field_types():
    config = load_config(
        SHAKESPEARE,
        [
            "train.max_steps=1_000",
            "train.max_lr=1e-3",
            "train.compile=true",
            "run.name=x",
            "train.min_lr=none",
        ],
    )
    assert config.train.max_steps == 1000 and isinstance(config.train.max_steps, int)
    assert config.train.max_lr == 1e-3
    assert config.train.compile is True
    assert config.run.name == "x"
    assert config.train.min_lr is None and config.train.final_lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=5", "did you mean 'train.max_steps'"),
        ("trian.max_steps=5", "did you mean 'train'"),
        ("model.n_embed=64", "did you mean 'model.n_embd'"),
    ],
)
def test_unknown_key_names_the_closest_valid_one(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=abc", "expected an integer"),
        ("train.max_steps=1.5", "expected an integer"),
        ("train.compile=maybe", "expected true or false"),
        ("train.max_lr=fast", "expected a number"),
        ("train.max_steps", "must look like section.key=value"),
        ("model.n_head=5", "divisible"),
        ("train.dtype=float16", "choose one of"),
        ("run.backend=tensorflow", "choose one of jax, torch"),
    ],
)
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_model_preset_sets_the_shape_and_keeps_the_context_length():
    config = load_config(SHAKESPEARE, ["model.preset=gpt2"])
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd) == (12, 12, 768)
    assert config.model.block_size == 128  # from the file: a preset is only the shape
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_config(None, ["model.preset=gpt5"])


def test_padded_vocab_is_the_next_multiple_of_64():
    assert ModelConfig().padded_vocab_size == 50304


def test_dump_toml_round_trips(tmp_path):
    config = load_config(SHAKESPEARE, ["train.min_lr=3e-5", "run.resume=true", "train.compile=true"])
    # quotes, a newline and a backslash: the characters a TOML string must escape
    prompt = 'a "quoted"\nline\\'
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, sample_prompt=prompt))
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(config))
    assert load_config(path) == config


def test_missing_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nmax_steps = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
