"""FLOP accounting: the numbers nanoGPT and the PaLM paper give for GPT-2 124M, and MFU arithmetic."""

from __future__ import annotations

import pytest

from babygpt.config import ModelConfig
from babygpt.flops import PEAK_BF16_FLOPS, flops_per_token, matmul_params, mfu, num_params, peak_flops

GPT2 = ModelConfig.preset("gpt2")


def test_gpt2_124m_parameter_count_with_padded_vocabulary():
    # 124,439,808 with the 50257-row table (HF); + 47 padded rows x 768 = 124,475,904
    assert num_params(GPT2) == 124_475_904
    assert num_params(ModelConfig.preset("gpt2", vocab_multiple=1)) == 124_439_808


def test_gpt2_124m_training_flops_per_token_at_1024():
    # 6 x 123,568,128 matmul params + 12 x 12 layers x 1024 x 768 for attention
    assert matmul_params(GPT2) == 123_568_128
    assert flops_per_token(GPT2, 1024) == 854_654_976
    assert flops_per_token(GPT2, 1024, training=False) == 854_654_976 / 3


def test_attention_flops_grow_with_the_context():
    assert flops_per_token(GPT2, 2048) - flops_per_token(GPT2, 1024) == 12 * 12 * 1024 * 768


def test_mfu_is_achieved_over_peak():
    tokens_per_s = 400_000.0
    expected = tokens_per_s * 854_654_976 / 989e12
    assert mfu(tokens_per_s, GPT2, 1024, 989e12) == pytest.approx(expected, rel=1e-12)
    assert mfu(tokens_per_s, GPT2, 1024, None) is None  # CPU: no known peak


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),  # more specific keys win
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("cpu", None),
    ],
)
def test_peak_flops_by_device_name(name, peak, monkeypatch):
    monkeypatch.delenv("BABYGPT_PEAK_FLOPS", raising=False)
    assert peak_flops(name) == peak


def test_peak_flops_override(monkeypatch):
    monkeypatch.setenv("BABYGPT_PEAK_FLOPS", "1e15")
    assert peak_flops("some new chip") == 1e15
    assert "H100" in PEAK_BF16_FLOPS
