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


# K in one chunk wider than K (masked past it), in three whole chunks, in a whole chunk and a part.
K_CASES = pytest.mark.parametrize("K, block_k", [(128, 1024), (192, 1024), (192, 64), (192, 128)])


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
    actual, expected = (
        np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t, np.float64)
        for t in (actual, expected)
    )
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rel * scale, (np.abs(actual - expected).max(), scale)


@pytest.mark.parametrize("gelu", [False, True])
@K_CASES
def test_triton_ln_linear_is_layernorm_then_linear(tk, monkeypatch, gelu, K, block_k):
    monkeypatch.setattr(tk, "BLOCK_K", block_k)
    torch.manual_seed(0)
    B, N = 3, 192
    x = 3 * torch.randn(B, K) + 1
    ln = torch.nn.LayerNorm(K)
    with torch.no_grad():
        ln.weight.add_(torch.randn(K) * 0.1), ln.bias.add_(torch.randn(K) * 0.1)
    weight, bias = torch.randn(N, K).bfloat16() * 0.05, torch.randn(N)
    out = tk.ln_linear(x, ln, weight, bias, torch.full((B, N), float("nan"), dtype=torch.bfloat16), gelu=gelu)
    expected = autocast_linear(ln(x), weight, bias)
    expected = bf16(F.gelu(expected, approximate="tanh")) if gelu else expected
    close(out.float(), expected.detach(), 4 * BF16)  # every entry written: no NaN left


def test_triton_ln_linear_masks_the_padded_vocabulary(tk):
    torch.manual_seed(0)
    x, ln, weight = torch.randn(2, 64), torch.nn.LayerNorm(64), torch.randn(128, 64).bfloat16()
    out = tk.ln_linear(x, ln, weight, None, torch.empty(2, 128), valid_n=100)
    assert torch.isinf(out[:, 100:]).all() and (out[:, 100:] < 0).all()
    close(out[:, :100], autocast_linear(ln(x), weight[:100]), 4 * BF16)


@K_CASES
def test_triton_linear_residual_adds_in_place(tk, monkeypatch, K, block_k):
    monkeypatch.setattr(tk, "BLOCK_K", block_k)
    torch.manual_seed(0)
    h, weight, bias = torch.randn(3, K).bfloat16(), torch.randn(64, K).bfloat16() * 0.05, torch.randn(64)
    x = torch.randn(3, 64)
    expected = x + autocast_linear(h, weight, bias)
    out = tk.linear_residual(h, weight, bias, x)
    assert out.data_ptr() == x.data_ptr()
    close(x, expected, 4 * BF16)


# 3 rows: each head's cache split across programs and combined; 9: one program per (row, head).
ATTENTION_ROWS = pytest.mark.parametrize("B", [3, 9], ids=["split", "rows"])


@pytest.mark.parametrize("pos", [0, 5, 64, 130])
@ATTENTION_ROWS
def test_triton_decode_attention_writes_the_cache_and_attends_up_to_pos(tk, pos, B):
    torch.manual_seed(pos)
    nh, S, hs = 2, 192, 64
    C = nh * hs
    qkv = torch.randn(B, 3 * C).bfloat16()
    k_cache, v_cache = torch.randn(B, nh, S, hs).bfloat16(), torch.randn(B, nh, S, hs).bfloat16()
    k_before, v_before = k_cache.clone(), v_cache.clone()
    part = torch.empty(3, tk.attention_blocks(S), B, C)
    y = tk.decode_attention(
        qkv, k_cache, v_cache, torch.tensor([pos]), torch.zeros(B, C, dtype=torch.bfloat16), part
    )
    q, k, v = (t.view(B, nh, hs) for t in qkv.float().split(C, dim=1))
    k_before[:, :, pos], v_before[:, :, pos] = k.bfloat16(), v.bfloat16()
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)  # only slot pos changed
    mask = torch.arange(S) <= pos
    expected = F.scaled_dot_product_attention(
        q[:, :, None], k_before.float(), v_before.float(), attn_mask=mask[None, :]
    )  # (B, nh, 1, hs)
    close(y.float(), expected.reshape(B, C), 4 * BF16)


def test_triton_embed_reads_each_rows_token_at_pos(tk):
    torch.manual_seed(0)
    wte, wpe = torch.randn(50, 128), torch.randn(20, 128)
    tokens = torch.randint(0, 50, (3, 21))
    x = tk.embed(tokens, torch.tensor([7]), wte, wpe, torch.full((3, 128), 5.0))
    assert torch.equal(x, wte[tokens[:, 7]] + wpe[7])


def test_triton_greedy_writes_the_argmax_or_the_prompt_token(tk, monkeypatch):
    monkeypatch.setattr(tk, "BLOCK_K", 64)  # V = 200: three whole chunks and a part
    torch.manual_seed(0)
    logits = torch.randn(4, 200)
    logits[0, 100] = logits[0, 150] = 9.0  # a tie across chunks: the first wins, as in torch.argmax
    logits[1, 3] = 9.0  # in the first chunk
    logits[2, 199] = 9.0  # the last entry of the partial chunk
    tokens = torch.randint(0, 200, (4, 9))
    before = tokens.clone()
    lengths = torch.tensor([2, 6, 1, 7])  # rows 1 and 3 are still inside their prompts at pos + 1 = 5
    tk.greedy(logits, tokens, lengths, torch.tensor([4]))
    expected = before.clone()
    expected[[0, 2], 5] = torch.tensor([100, 199])
    assert torch.equal(tokens, expected)


@pytest.fixture
def fewer_programs(monkeypatch):
    """Whole-model tests run every kernel many times; interpreted, each program is Python, so wider
    column blocks (the unit tests above cover 4) and K chunks no wider than this model's C (the
    GPU's 1024 would be 7/8 masked lanes here; the unit tests cover a chunk wider than K) keep
    them to seconds."""
    if DEVICE == "cpu":
        from babygpt_jax import kernels as pk
        from babygpt_torch import kernels as tk

        for kernels in (tk, pk):
            monkeypatch.setattr(kernels, "BLOCK_N", 128)
            monkeypatch.setattr(kernels, "BLOCK_K", CONFIG.n_embd)


def follow_model_decode(model, B, S, step, near_ties=False):
    """Prefill a prompt, then decode eight greedy tokens both with `step(tokens, pos, cache)` and
    with model.decode, from copies of the same cache: the logits within 8 bfloat16 steps of the
    module's, the padding -inf, the caches within 4. Both follow model.decode's tokens, and step
    chooses the same ones; with near_ties, the same or one within two bfloat16 steps of the best
    (the interpreter rounds to bfloat16 by truncating, a bias of up to one step, which can swap two
    logits one step apart, as in a tensor-core tile's sums)."""
    prompt, V = 6, CONFIG.vocab_size
    tokens = torch.randint(0, V, (B, S + 1))
    cache = model.init_cache(B, S, torch.bfloat16)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model.decode(tokens[:, :prompt], cache, 0)
        ref_cache = [(k.clone(), v.clone()) for k, v in cache]
        for pos in range(prompt, prompt + 8):
            expected, _ = model.decode(tokens[:, pos : pos + 1], ref_cache, pos)
            logits = step(tokens, torch.tensor([pos]), cache)
            want = expected[:, 0, :V].float()
            close(logits[:, :V], want, 8 * BF16)
            if near_ties:
                best = want.max(-1).values
                chosen = want.gather(1, logits.argmax(-1, keepdim=True))[:, 0]
                assert (chosen >= best - 2 * BF16 * best.abs().clamp(min=1)).all()
                assert (chosen == best).float().mean() > 0.8
            else:
                assert torch.equal(logits.argmax(-1), want.argmax(-1))
            tokens[:, pos + 1] = want.argmax(-1)  # feed the greedy token back
        assert torch.isinf(logits[:, V:]).all()
        for layer, ref_layer in zip(cache, ref_cache):
            for t, ref in zip(layer, ref_layer):  # keys, values
                close(t[:, :, : prompt + 8].float(), ref[:, :, : prompt + 8].float(), 4 * BF16)


def test_triton_fused_decoder_follows_model_decode(tk, fewer_programs):
    """One row's kernels (GEMVs), three rows of them."""
    decoder = tk.FusedDecoder(torch_model(), 3, 64)
    follow_model_decode(decoder.model, 3, 64, decoder.logits)


def test_triton_batch_decode_follows_model_decode(tk):
    """A batch: the model's modules around the attention kernel."""
    model = torch_model()
    y = torch.zeros(9, CONFIG.n_embd, dtype=torch.bfloat16)
    follow_model_decode(
        model, 9, 64, lambda tokens, pos, cache: tk.batch_decode(model, tokens, pos, cache, y)
    )


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles that divide the test model's matmuls (C = 128), a split K for two of them (the
    partial sums and the last program's epilogue), and 16-row tiles so that 20 rows are two."""
    from babygpt_torch import kernels as tk

    gemms = {"qkv": (32, 64, 1, 4, 1), "proj": (32, 32, 2, 4, 2), "fc": (64, 64, 1, 4, 1)}
    gemms |= {"proj2": (32, 64, 1, 4, 4), "head": (64, 64, 1, 4, 1)}
    monkeypatch.setattr(tk, "ROWS_GEMM", gemms)
    monkeypatch.setattr(tk, "ROWS_BM", 16)


def test_triton_rows_decoder_follows_model_decode(tk, small_tiles):
    """A batch in hand-written kernels: LayerNorm, then each matmul on tensor-core tiles with its
    bias, GELU or residual add, eight steps over the same buffers (so the split's counters must be
    left at 0 by each)."""
    decoder = tk.FusedDecoder(torch_model(), 20, 64)
    assert decoder.rows
    follow_model_decode(decoder.model, 20, 64, decoder.logits, near_ties=True)
    assert not decoder.scratch[1].any()  # every counter back at 0


# ---------------------------------------------------------------------------------------------
# Pallas (JAX), the same tests


def jax_model(seed=0):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from babygpt_jax.model import GPT

    model = GPT(CONFIG, rngs=nnx.Rngs(seed), dtype=jnp.bfloat16)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [p + 0.1 * jax.random.normal(k, p.shape) if p.ndim == 1 else p for p, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, moved))  # LayerNorm and biases away from (1, 0)
    return model


@pytest.fixture(scope="module")
def pk():
    from babygpt_jax import kernels

    return kernels


def jnp_ln(x, scale, bias, eps=1e-5):
    x = np.asarray(x, np.float32)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


@pytest.mark.parametrize("gelu", [False, True])
@K_CASES
def test_pallas_ln_linear_is_layernorm_then_linear(pk, monkeypatch, gelu, K, block_k):
    import jax.numpy as jnp

    monkeypatch.setattr(pk, "BLOCK_K", block_k)
    rng = np.random.default_rng(0)
    B, N = 3, 192
    x = (3 * rng.standard_normal((B, K)) + 1).astype(np.float32)
    scale, bias_ln = 1 + 0.1 * rng.standard_normal(K), 0.1 * rng.standard_normal(K)
    weight, bias = jnp.asarray(0.05 * rng.standard_normal((N, K)), jnp.bfloat16), rng.standard_normal(N)
    out = pk.ln_linear(jnp.asarray(x), jnp.asarray(scale, jnp.float32), jnp.asarray(bias_ln, jnp.float32),
                       weight, jnp.asarray(bias, jnp.float32), eps=1e-5, gelu=gelu)  # fmt: skip
    t = lambda a: torch.tensor(np.asarray(a, np.float32))
    expected = autocast_linear(t(jnp_ln(x, scale, bias_ln)), t(weight), t(bias))
    expected = bf16(F.gelu(expected, approximate="tanh")) if gelu else expected
    close(np.asarray(out, np.float32), expected, 2 * BF16)


def test_pallas_ln_linear_masks_the_padded_vocabulary(pk):
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((2, 64)).astype(np.float32), rng.standard_normal((128, 64))
    weight = jnp.asarray(weight, jnp.bfloat16)
    ones, zeros = jnp.ones(64), jnp.zeros(64)
    out = np.asarray(
        pk.ln_linear(
            jnp.asarray(x),
            ones,
            zeros,
            weight,
            None,
            eps=1e-5,
            valid_n=100,
            out_dtype=jnp.float32,
        )
    )
    assert np.isneginf(out[:, 100:]).all()
    t = lambda a: torch.tensor(np.asarray(a, np.float32))
    close(out[:, :100], autocast_linear(t(jnp_ln(x, 1.0, 0.0)), t(weight)[:100]), 2 * BF16)


@K_CASES
def test_pallas_linear_residual_adds_into_x(pk, monkeypatch, K, block_k):
    import jax.numpy as jnp

    monkeypatch.setattr(pk, "BLOCK_K", block_k)
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, K)), jnp.bfloat16)
    weight = jnp.asarray(0.05 * rng.standard_normal((64, K)), jnp.bfloat16)
    bias, x = rng.standard_normal(64).astype(np.float32), rng.standard_normal((3, 64)).astype(np.float32)
    out = np.asarray(pk.linear_residual(h, weight, jnp.asarray(bias), jnp.asarray(x)))
    t = lambda a: torch.tensor(np.asarray(a, np.float32))
    close(out, t(x) + autocast_linear(t(h), t(weight), t(bias)), 2 * BF16)


@pytest.mark.parametrize("pos", [0, 5, 64, 130])
@ATTENTION_ROWS
def test_pallas_decode_attention_writes_the_cache_and_attends_up_to_pos(pk, pos, B):
    import jax.numpy as jnp

    rng = np.random.default_rng(pos)
    S, nh, hs = 192, 2, 64
    C = nh * hs
    qkv = jnp.asarray(rng.standard_normal((B, 3 * C)), jnp.bfloat16)
    k_cache = jnp.asarray(rng.standard_normal((B, S, nh, hs)), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal((B, S, nh, hs)), jnp.bfloat16)
    k_before, v_before = np.asarray(k_cache, np.float32), np.asarray(v_cache, np.float32)
    y, k_after, v_after = pk.decode_attention(qkv, k_cache, v_cache, jnp.int32(pos))
    q, k, v = (a.reshape(B, nh, hs) for a in np.split(np.asarray(qkv, np.float32), 3, axis=1))
    k_before[:, pos], v_before[:, pos] = k, v
    assert np.array_equal(np.asarray(k_after, np.float32), k_before)  # only slot pos changed
    assert np.array_equal(np.asarray(v_after, np.float32), v_before)
    t = lambda a: torch.tensor(a).transpose(1, 2)  # (B, nh, S, hs)
    mask = torch.arange(S) <= pos
    expected = F.scaled_dot_product_attention(
        torch.tensor(q)[:, :, None], t(k_before), t(v_before), attn_mask=mask[None, :]
    )
    close(np.asarray(y, np.float32), expected.reshape(B, C), 2 * BF16)


@pytest.mark.parametrize("B", [3, 9], ids=["kernels", "batch"])
def test_pallas_fused_decode_follows_model_decode(pk, fewer_programs, B):
    """Prefill a prompt, then decode eight greedy tokens both ways from the same cache (from
    BATCH_FROM rows, `batch_decode`: the model's modules around the attention kernel)."""
    import jax
    import jax.numpy as jnp

    model = jax_model()
    S, prompt = 64, 6
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (B, S + 1)).astype(np.int32)
    weights = pk.decode_weights(model)
    _, cache = model.decode(jnp.asarray(tokens[:, :prompt]), model.init_cache(B, S, jnp.bfloat16), 0)
    ref_cache = cache
    fused = jax.jit(lambda *args: pk.fused_decode(model, *args))  # interpreted kernels: trace once
    V = CONFIG.vocab_size
    for pos in range(prompt, prompt + 8):
        token = jnp.asarray(tokens[:, pos])
        expected, ref_cache = model.decode(token[:, None], ref_cache, pos)
        logits, cache = fused(weights, token, cache, jnp.int32(pos))
        close(np.asarray(logits)[:, :V], np.asarray(expected[:, 0, :V], np.float32), 8 * BF16)
        assert np.array_equal(np.argmax(logits, -1), np.argmax(np.asarray(expected[:, 0], np.float32), -1))
        tokens[:, pos + 1] = np.argmax(logits, -1)  # feed the greedy token back
    assert np.isneginf(np.asarray(logits)[:, V:]).all()
    for layer, ref_layer in zip(cache, ref_cache):
        for a, ref in zip(layer, ref_layer):  # keys, values
            close(
                np.asarray(a[:, : prompt + 8], np.float32),
                np.asarray(ref[:, : prompt + 8], np.float32),
                4 * BF16,
            )


# ---------------------------------------------------------------------------------------------
# generate() with the kernels: the same greedy tokens as without them


PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7], [9]]  # different lengths: rows inside their prompts


def test_torch_generate_fused_gives_the_plain_greedy_tokens(tk, fewer_programs):
    from babygpt_torch.generate import generate

    model = torch_model()
    assert generate(model, PROMPTS, 6, temperature=0.0, fused=True) == generate(
        model, PROMPTS, 6, temperature=0.0, fused=False
    )
    with torch.no_grad():  # weights changed after a call (training) are taken again by the next one
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    assert generate(model, PROMPTS, 6, temperature=0.0, fused=True) == generate(
        model, PROMPTS, 6, temperature=0.0, fused=False
    )
    # every batch size and cache length reads one set of bfloat16 weights
    assert tk.FusedDecoder(model, 1, 64).weights is tk.FusedDecoder(model, 3, 128).weights


BATCH = [[i, i + 1, 2 * i + 3][: 1 + i % 3] for i in range(9)]  # BATCH_FROM rows or more: a batch


def test_torch_generate_fused_batch_gives_the_plain_greedy_tokens(tk):
    from babygpt_torch.generate import generate

    model = torch_model()
    assert not tk.rows_fit(model.config, len(BATCH))  # GPU tiles: `batch_decode`, the compiled modules
    assert generate(model, BATCH, 6, temperature=0.0, fused=True) == generate(
        model, BATCH, 6, temperature=0.0, fused=False
    )


def test_torch_generate_fused_rows_gives_the_plain_greedy_tokens(tk, small_tiles):
    """A batch of BATCH_FROM to ROWS_UP_TO rows whose matmuls the tiles divide: `FusedDecoder`'s
    GEMM kernels, in place of the compiled modules (which the test above takes)."""
    from babygpt_torch.generate import generate

    model = torch_model()
    assert tk.rows_fit(model.config, len(BATCH)) and not tk.rows_fit(model.config, tk.ROWS_UP_TO + 1)
    assert generate(model, BATCH, 6, temperature=0.0, fused=True) == generate(
        model, BATCH, 6, temperature=0.0, fused=False
    )


def test_jax_generate_fused_batch_gives_the_plain_greedy_tokens(pk):
    from babygpt_jax.generate import generate

    model = jax_model()
    assert generate(model, BATCH, 6, temperature=0.0, fused=True) == generate(
        model, BATCH, 6, temperature=0.0, fused=False
    )


def test_jax_generate_fused_gives_the_plain_greedy_tokens(pk, fewer_programs):
    from babygpt_jax.generate import generate

    model = jax_model()
    plain = generate(model, PROMPTS, 8, temperature=0.0, fused=False)
    assert generate(model, PROMPTS, 8, temperature=0.0, fused=True) == plain
    streamed = []  # the per-token path (a callback) takes the kernels too
    fused = generate(model, PROMPTS, 8, temperature=0.0, fused=True, on_token=lambda r, t: streamed.append(t))
    assert fused == plain and len(streamed) == sum(map(len, plain))


def test_the_kernels_fit_every_gpt2_preset():
    from babygpt.config import ModelConfig as M
    from babygpt.kernel_blocks import supported

    assert all(supported(M.preset(p)) for p in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"))
    assert supported(M(n_embd=32, n_head=2))  # head size 16
    assert not supported(M(n_embd=96, n_head=2)) and not supported(M(bias=False))  # head size 48


# The training loss's two kernels, on rows of 256 logits of which 200 are the vocabulary: blocks of
# 64 (four, the last reaching past the vocabulary) and of 1024 (one, masked past it). The padding
# holds large values, so a kernel that read it would show; the loss is doubled, so the upstream
# gradient must reach the kernel's scale.
LOSS_V, LOSS_VOCAB = 256, 200
LOSS_CASES = pytest.mark.parametrize("block_v", [64, 1024])


def loss_logits(seed=0):
    rng = np.random.default_rng(seed)
    logits = 3 * rng.normal(size=(2, 5, LOSS_V)).astype(np.float32)
    logits[..., LOSS_VOCAB:] = 1e4
    return logits, rng.integers(0, LOSS_VOCAB, (2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@LOSS_CASES
def test_triton_cross_entropy_is_the_written_out_loss(tk, dtype, block_v):
    from babygpt_torch.model import cross_entropy

    logits, targets = loss_logits()
    targets = torch.from_numpy(targets).to(DEVICE)
    a = torch.from_numpy(logits).to(DEVICE, dtype).requires_grad_()
    b = torch.from_numpy(logits).to(DEVICE, dtype).requires_grad_()
    loss = tk.cross_entropy(a, targets, LOSS_VOCAB, block_v=block_v)
    expected = cross_entropy(b, targets, LOSS_VOCAB)
    (2 * loss).backward()
    (2 * expected).backward()
    assert loss.dtype == torch.float32 and a.grad.dtype == dtype
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    scale = b.grad.abs().max().item()  # 2 / 10 rows
    atol = 1e-6 if dtype == torch.float32 else 2 * BF16 * scale  # the interpreter truncates
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=0, atol=atol)
    assert (a.grad[..., LOSS_VOCAB:] == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@LOSS_CASES
def test_pallas_cross_entropy_is_the_written_out_loss(pk, dtype, block_v):
    import jax
    import jax.numpy as jnp

    from babygpt_jax.model import cross_entropy

    logits, targets = loss_logits()
    logits, targets = jnp.asarray(logits, dtype), jnp.asarray(targets)
    kernel = lambda x: 2 * pk.cross_entropy(x, targets, LOSS_VOCAB, block_v=block_v)
    loss, grad = jax.value_and_grad(kernel)(logits)
    expected, expected_grad = jax.value_and_grad(lambda x: 2 * cross_entropy(x, targets, LOSS_VOCAB))(logits)
    assert loss.dtype == jnp.float32 and grad.dtype == logits.dtype
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    grad, expected_grad = np.asarray(grad, np.float32), np.asarray(expected_grad, np.float32)
    atol = 1e-6 if dtype == "float32" else BF16 * np.abs(expected_grad).max()
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=atol)
    assert np.all(grad[..., LOSS_VOCAB:] == 0)
