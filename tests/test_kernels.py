"""The fused decode kernels (Triton for torch, Pallas for JAX) against the expressions they replace.

On a CPU both run in their interpreters (Triton's TRITON_INTERPRET, Pallas' interpret mode), so
these tests check each kernel's indexing, masking and arithmetic; the GPU run in
docs/benchmarks.md checks the compiled kernels and their speed. Tolerances: the kernels round
where bfloat16 autocast rounds, so against the same expression under autocast they agree to a few
bfloat16 steps of the values compared (Triton's interpreter truncates where a GPU rounds to
nearest, so up to twice as many there), and greedy tokens agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from babygpt.config import ModelConfig

CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=128, block_size=64, vocab_size=200)  # head size 64
BF16 = 2.0**-8  # bfloat16's relative step
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, interpreted here


def torch_model(seed=0):
    from babygpt_torch.model import GPT

    torch.manual_seed(seed)
    model = GPT(CONFIG).eval()
    with torch.no_grad():  # LayerNorm and biases away from their (1, 0) init, so a wrong index shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(autouse=True)
def on_device():
    with torch.device(DEVICE):  # every tensor a test makes
        yield


@pytest.fixture(scope="module")
def tk():
    pytest.importorskip("triton")
    from babygpt_torch import kernels

    return kernels


def bf16(t):
    return t.detach().float().bfloat16().float()


def autocast_linear(x, weight, bias=None):
    """F.linear as bfloat16 autocast computes it on a GPU: bfloat16 inputs, float32 sums, a bfloat16 result."""
    out = bf16(x) @ bf16(weight).T + (0 if bias is None else bf16(bias))
    return bf16(out)


def close(actual, expected, rel):
    """|actual - expected| within rel of the largest |expected|: a few bfloat16 steps."""
    actual, expected = (np.asarray(torch.as_tensor(t).cpu(), np.float64) for t in (actual, expected))
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rel * scale, (np.abs(actual - expected).max(), scale)


@pytest.mark.parametrize("gelu", [False, True])
def test_triton_ln_linear_is_layernorm_then_linear(tk, gelu):
    torch.manual_seed(0)
    BM, K, N = 16, 128, 192
    x = 3 * torch.randn(BM, K) + 1
    ln = torch.nn.LayerNorm(K)
    with torch.no_grad():
        ln.weight.add_(torch.randn(K) * 0.1), ln.bias.add_(torch.randn(K) * 0.1)
    weight, bias = torch.randn(N, K).bfloat16() * 0.05, torch.randn(N)
    out = tk.ln_linear(x, ln, weight, bias, torch.empty(BM, N, dtype=torch.bfloat16), gelu=gelu)
    expected = autocast_linear(ln(x), weight, bias)
    expected = bf16(F.gelu(expected, approximate="tanh")) if gelu else expected
    close(out.float(), expected.detach(), 4 * BF16)


def test_triton_ln_linear_masks_the_padded_vocabulary(tk):
    torch.manual_seed(0)
    x, ln, weight = torch.randn(16, 64), torch.nn.LayerNorm(64), torch.randn(128, 64).bfloat16()
    out = tk.ln_linear(x, ln, weight, None, torch.empty(16, 128), valid_n=100, block_n=64)
    assert torch.isinf(out[:, 100:]).all() and (out[:, 100:] < 0).all()
    close(out[:, :100], autocast_linear(ln(x), weight[:100]), 4 * BF16)


def test_triton_linear_residual_adds_in_place(tk):
    torch.manual_seed(0)
    h, weight, bias = torch.randn(16, 256).bfloat16(), torch.randn(64, 256).bfloat16() * 0.05, torch.randn(64)
    x = torch.randn(16, 64)
    expected = x + autocast_linear(h, weight, bias)
    out = tk.linear_residual(h, weight, bias, x)
    assert out.data_ptr() == x.data_ptr()
    close(x, expected, 4 * BF16)


@pytest.mark.parametrize("pos", [0, 5, 64, 130])
def test_triton_decode_attention_writes_the_cache_and_attends_up_to_pos(tk, pos):
    torch.manual_seed(pos)
    B, nh, S, hs = 3, 2, 192, 64
    C, BM = nh * hs, 16
    qkv = torch.randn(BM, 3 * C).bfloat16()
    k_cache, v_cache = torch.randn(B, nh, S, hs).bfloat16(), torch.randn(B, nh, S, hs).bfloat16()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    y = tk.decode_attention(qkv, k_cache, v_cache, torch.tensor([pos]), torch.zeros(BM, C), rows=B)
    q, k, v = (t.view(BM, nh, hs)[:B] for t in qkv.float().split(C, dim=1))
    k_before[:, :, pos], v_before[:, :, pos] = k.bfloat16(), v.bfloat16()
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)  # only slot pos changed
    mask = torch.arange(S) <= pos
    expected = F.scaled_dot_product_attention(
        q[:, :, None], k_before.float(), v_before.float(), attn_mask=mask[None, :]
    )  # (B, nh, 1, hs)
    close(y[:B].float(), expected.reshape(B, C), 4 * BF16)
    assert (y[B:] == 0).all()  # padded rows untouched


def test_triton_embed_reads_each_rows_token_at_pos(tk):
    torch.manual_seed(0)
    wte, wpe = torch.randn(50, 128), torch.randn(20, 128)
    tokens = torch.randint(0, 50, (3, 21))
    x = tk.embed(tokens, torch.tensor([7]), wte, wpe, torch.full((16, 128), 5.0), rows=3)
    assert torch.equal(x[:3], wte[tokens[:, 7]] + wpe[7]) and (x[3:] == 0).all()


def test_triton_fused_decoder_follows_model_decode(tk):
    """Prefill a prompt, then decode eight greedy tokens both ways from copies of the same cache."""
    model = torch_model()
    B, S, prompt = 3, 64, 6
    decoder = tk.FusedDecoder(model, B)
    tokens = torch.randint(0, CONFIG.vocab_size, (B, S + 1))
    cache = model.init_cache(B, S, torch.bfloat16)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model.decode(tokens[:, :prompt], cache, 0)
        ref_cache = [(k.clone(), v.clone()) for k, v in cache]
        for pos in range(prompt, prompt + 8):
            expected, _ = model.decode(tokens[:, pos : pos + 1], ref_cache, pos)
            logits = decoder.logits(tokens, torch.tensor([pos]), cache)
            V = CONFIG.vocab_size
            close(logits[:, :V], expected[:, 0, :V].float(), 8 * BF16)
            assert torch.equal(logits.argmax(-1), expected[:, 0].float().argmax(-1))
            tokens[:, pos + 1] = logits.argmax(-1)  # feed the greedy token back
        assert torch.isinf(logits[:, CONFIG.vocab_size :]).all()
        for layer, ref_layer in zip(cache, ref_cache):
            for t, ref in zip(layer, ref_layer):  # keys, values
                close(t[:, :, : prompt + 8].float(), ref[:, :, : prompt + 8].float(), 4 * BF16)
