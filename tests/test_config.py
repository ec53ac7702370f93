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


def test_a_presets_runs_are_named_after_it_and_the_backend_unless_named():
    # so that `make train` and `make train BACKEND=torch` leave two runs side by side
    assert load_config(SHAKESPEARE).run_dir == Path("out/shakespeare-jax")
    assert load_config(SHAKESPEARE, ["run.backend=torch"]).run.name == "shakespeare-torch"
    assert load_config(SHAKESPEARE, ["run.name=x", "run.backend=torch"]).run.name == "x"
    assert load_config(None).run.name == "run-jax"


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
        # once tracebacks or silently accepted, several making the two backends compute differently
        ("model.n_head=0", r"model.n_head=0 must be positive"),
        ("model.layer_norm_epsilon=0", r"model.layer_norm_epsilon=0.0 must be in \(0, 1\)"),
        ("train.checkpoint_interval=0", r"train.checkpoint_interval=0 must be at least 1; set it above"),
        ("train.checkpoint_interval=-1", r"train.checkpoint_interval=-1 must be at least 1"),
        ("train.eval_interval=0", r"train.eval_interval=0 must be at least 1"),
        ("train.log_interval=-5", r"train.log_interval=-5 must be at least 1"),
        ("train.keep_checkpoints=-3", r"train.keep_checkpoints=-3 must be at least 1"),
        ("train.keep_checkpoints=0", r"train.keep_checkpoints=0 must be at least 1"),
        ("train.beta2=1.5", r"train.beta2=1.5 must be in \[0, 1\)"),
        ("train.beta1=-0.1", r"train.beta1=-0.1 must be in \[0, 1\)"),
        ("train.beta2=1", r"train.beta2=1.0 must be in \[0, 1\)"),
        ("train.max_lr=nan", r"train.max_lr=nan must be a positive number"),
        ("train.max_lr=inf", r"train.max_lr=inf must be a positive number"),
        ("train.max_lr=-1e-3", r"train.max_lr=-0.001 must be a positive number"),
        ("train.min_lr=inf", r"train.min_lr=inf must be a number in \[0, train.max_lr"),
        ("train.min_lr=-1e-5", r"train.min_lr=-1e-05 must be a number in \[0, train.max_lr"),
        ("train.grad_clip=-1", r"train.grad_clip=-1.0 must be a number >= 0 \(0 turns clipping off\)"),
        ("train.grad_clip=nan", r"train.grad_clip=nan must be a number >= 0"),
        ("train.eps=0", r"train.eps=0.0 must be a small positive number"),
        ("train.weight_decay=-0.1", r"train.weight_decay=-0.1 must be a number >= 0"),
        ("train.sample_tokens=-1", r"train.sample_tokens=-1 must be >= 0"),
        ("run.name=", r"run.name='' must be a plain directory name"),
        ("run.name=a/b", r"run.name='a/b' must be a plain directory name"),
        ("run.name=..", r"run.name='..' must be a plain directory name"),
        ("data.dataset=", r"data.dataset is empty"),
    ],
)
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [override])
    assert "\n" not in str(error.value)


def test_the_documented_off_switches_are_accepted():
    config = load_config(
        None, ["train.grad_clip=0", "train.sample_tokens=0", "train.eval_steps=0", "train.beta1=0"]
    )
    assert (config.train.grad_clip, config.train.sample_tokens, config.train.eval_steps) == (0, 0, 0)


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
    bad.write_bytes(b"[train]\nsample_prompt = '\xff\xfe'\n")  # not UTF-8
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    bad.write_text("[train]\nmax_lr = [1, 2]\n")
    with pytest.raises(ConfigError, match="expected a single value"):
        load_config(bad)
    bad.write_text("[train]\nmax_lr = {a = 1}\n")
    with pytest.raises(ConfigError, match="expected a single value"):
        load_config(bad)
