"""babygpt_bench.bench end to end on CPU (training, decoding, --profile, bad input) and babygpt_bench.profile's trace parsing.

Each bench run is a real subprocess with the smallest model that still works, shared by the tests
that read it. The children see one CPU device and no GPU, as a one-GPU run sees one device, so the
rows carry no MFU or peak memory. babygpt_bench.profile is tested on hand-written Chrome traces of both
shapes it parses, since a CPU run writes no device kernels. Nothing here asserts a speed.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from babygpt.flops import flops_per_token
from babygpt_bench import bench
from babygpt_bench.profile import CATEGORIES, _load, categorize, device_kernels, format_summary, summarize

ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = {f.name for f in dataclasses.fields(bench.Row)}
REL = 1e-9  # tokens/s and MFU are computed from the stored ms, so they agree to rounding


def run_bench(*args: str) -> subprocess.CompletedProcess:
    # One CPU device and no GPU: without the conftest's eight virtual devices the JAX child does not
    # shard the batch, and torch does not find a GPU on a machine that has one.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "BABYGPT_PEAK_FLOPS")}
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", "babygpt_bench.bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, kind) == (13, b"IHDR") and width > 0 and height > 0
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"  # complete: ends with the empty IEND chunk


def assert_timings(row: dict) -> None:
    assert set(row) == ROW_FIELDS
    assert 0 < row["ms_min"] <= row["ms_median"] <= row["ms_max"]
    assert row["compile_s"] >= 0
    assert row["device"] == "cpu"
    assert row["mfu"] is None and row["peak_mem_gb"] is None  # no known peak, no device allocator on CPU


# ---------------------------------------------------------------------------------------------
# training, with --profile


TRAIN_B, TRAIN_T, PROFILE_STEPS = 2, 32, 2


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-train")
    result = run_bench(
        "--backend", "jax,torch", "--preset", "tiny", "--batch", str(TRAIN_B), "--seq", str(TRAIN_T),
        "--steps", "3", "--warmup", "1",  # no --compile: on a CPU the default leaves torch eager
        "--out", str(out), "--profile", str(out / "prof"), "--profile-steps", str(PROFILE_STEPS),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result, out


def test_train_prints_one_row_per_backend_and_a_profile_summary(train_run):
    result, out = train_run
    assert "Traceback" not in result.stderr and "failed" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["backend", "mode", "preset"]
    rows = [line.split() for line in lines if line.split()[:2] in (["jax", "train"], ["torch", "train"])]
    assert [r[:5] for r in rows] == [
        ["jax", "train", "tiny", str(TRAIN_B), str(TRAIN_T)],
        ["torch", "train", "tiny", str(TRAIN_B), str(TRAIN_T)],
    ]
    for backend in ("jax", "torch"):
        assert (
            sum(line.startswith(f"{backend}: ") and "ms of kernels per step" in line for line in lines) == 1
        )
    assert lines[-1] == f"wrote {out / 'bench.json'} and {out / 'bench.png'}"
    # torch.compile only where train.py's presets use it, a GPU: on a CPU inductor's build takes a minute
    torch_row = next(
        r for r in json.loads((out / "bench.json").read_text())["rows"] if r["backend"] == "torch"
    )
    assert torch_row["extra"]["compiled"] is False


def test_train_bench_json_rows_are_consistent(train_run):
    _, out = train_run
    report = json.loads((out / "bench.json").read_text())
    assert "--backend jax,torch" in report["command"]
    rows = report["rows"]
    assert [r["backend"] for r in rows] == ["jax", "torch"]
    for row in rows:
        assert_timings(row)
        assert (row["mode"], row["preset"], row["batch"], row["seq"]) == ("train", "tiny", TRAIN_B, TRAIN_T)
        # tokens/s is one step's tokens over the median step time
        assert math.isclose(row["tokens_per_s"], TRAIN_B * TRAIN_T * 1000 / row["ms_median"], rel_tol=REL)
        torch_only = {"compiled"} if row["backend"] == "torch" else set()
        assert set(row["extra"]) == {"profile", "ms_pipelined", "ms_dispatch", *torch_only}
        assert row["extra"]["ms_pipelined"] > 0
        # the launch is part of each waited step: its median is at most the step's
        assert 0 < row["extra"]["ms_dispatch"] <= row["ms_median"]
    assert_png(out / "bench.png")


def test_profile_writes_each_backends_trace_and_the_row_summarizes_it(train_run):
    _, out = train_run
    rows = {r["backend"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    prof = out / "prof"
    torch_trace = prof / "torch" / "torch_trace.json"
    # jax.profiler.trace writes DIR/plugins/profile/<timestamp>/; the summary reads its perfetto trace
    (jax_trace,) = (prof / "jax").rglob("perfetto_trace.json.gz")
    assert jax_trace.relative_to(prof / "jax").parts[:2] == ("plugins", "profile")
    for backend, trace_path in (("torch", torch_trace), ("jax", jax_trace)):
        trace = _load(trace_path)
        assert trace["traceEvents"], backend  # the profiled steps are in the trace
        summary = rows[backend]["extra"]["profile"]
        # What the code guarantees: the row's summary is the summary of the trace it kept, per step.
        assert summary == summarize(device_kernels(trace), PROFILE_STEPS)
        assert summary["steps"] == PROFILE_STEPS
        # On CPU neither trace has device-kernel rows (torch: no cat "kernel"; jax: only /host:CPU).
        assert summary["kernel_ms_per_step"] == 0 and summary["kernels_per_step"] == 0
        assert summary["categories"] == {} and summary["top_kernels"] == []


# ---------------------------------------------------------------------------------------------
# decoding


GEN_BATCHES, PROMPT_LEN, NEW_TOKENS = (1, 2), 4, 3


@pytest.fixture(scope="module")
def generate_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-generate")
    result = run_bench(
        "--mode", "generate", "--backend", "jax,torch,hf", "--preset", "tiny",
        "--batch", ",".join(map(str, GEN_BATCHES)), "--prompt-len", str(PROMPT_LEN),
        "--new-tokens", str(NEW_TOKENS), "--steps", "2", "--hf-cache", "dynamic", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result, out


def test_generate_gives_a_row_per_backend_and_batch_size(generate_run):
    result, out = generate_run
    assert "Traceback" not in result.stderr and "failed" not in result.stderr
    rows = json.loads((out / "bench.json").read_text())["rows"]
    expected = [(b, batch) for b in ("jax", "torch", "hf") for batch in GEN_BATCHES]
    assert [(r["backend"], r["batch"]) for r in rows] == expected
    for row in rows:
        assert_timings(row)
        assert (row["mode"], row["preset"], row["seq"]) == ("generate", "tiny", PROMPT_LEN)
        assert row["tokens_per_s"] > 0
        # new tokens (not prompt tokens) per second, over the whole batch
        assert math.isclose(
            row["tokens_per_s"], row["batch"] * NEW_TOKENS * 1000 / row["ms_median"], rel_tol=REL
        )
        hf_cache = {"hf_cache": "dynamic"} if row["backend"] == "hf" else {}
        assert row["extra"] == {"new_tokens": NEW_TOKENS, **hf_cache}  # and no profile without --profile
    table = [line.split() for line in result.stdout.splitlines()]
    labels = [r[0] for r in table if len(r) > 1 and r[1] == "generate"]
    assert labels == ["jax", "jax", "torch", "torch", "hf/dynamic", "hf/dynamic"]
    assert_png(out / "bench.png")


def test_generate_profile_is_per_new_token_for_each_batch_size(tmp_path):
    result = run_bench(
        "--mode", "generate", "--backend", "jax,torch", "--preset", "tiny", "--batch", "1,2",
        "--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW_TOKENS), "--steps", "1",
        "--out", str(tmp_path), "--profile", str(tmp_path / "prof"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    for row in rows:
        backend, batch = row["backend"], row["batch"]
        folder = tmp_path / "prof" / f"{backend}-generate-b{batch}"
        trace = _load(
            folder / "torch_trace.json" if backend == "torch" else max(folder.rglob("perfetto_trace.json.gz"))
        )
        summary = dict(row["extra"]["profile"])
        assert summary.pop("unit") == f"new token at batch {batch}"
        assert summary == summarize(device_kernels(trace), NEW_TOKENS)  # one call, NEW_TOKENS tokens
    assert "ms of kernels per new token at batch 2" in result.stdout


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before any child starts


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "jaxx"], "unknown backend 'jaxx' for --mode train; choose from jax, torch"),
        (["--backend", "jax,hf"], "unknown backend 'hf' for --mode train; choose from jax, torch"),
        (["--mode", "generate", "--backend", "jax,foo"], "choose from jax, torch, hf"),
        (["--backend", " , "], "name at least one of jax, torch"),
        (["--preset", "nope"], "unknown model preset 'nope'"),
        (["--batch", "2,x"], "--batch '2,x': expected integers separated by commas"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--profile", "prof", "--profile-steps", "0"], "--profile-steps 0: must be at least 1"),
        (["--seq", "0"], "--seq 0: must be at least 1"),
        (["--batch", "4,0"], "--batch 0: must be at least 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    result = run_bench(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the row arithmetic, in process


def test_train_row_mfu_uses_the_devices_peak_and_none_on_cpu(monkeypatch):
    monkeypatch.delenv("BABYGPT_PEAK_FLOPS", raising=False)
    args = SimpleNamespace(preset="tiny", seq=32, batch_list=[4, 8], remat=False, fsdp=False, compile=False)
    config = bench._config(args)
    assert config.model.block_size == 32 and config.train.micro_batch_size == 4
    times = [0.030, 0.010, 0.020]  # seconds
    row = bench._train_row("torch", args, config, "NVIDIA H100 80GB HBM3", times, 1.5, 2.0)
    assert (row.ms_median, row.ms_min, row.ms_max) == pytest.approx((20.0, 10.0, 30.0), rel=1e-12)
    assert row.batch == 4 and row.seq == 32  # the first batch size: training runs one micro batch
    assert row.tokens_per_s == pytest.approx(4 * 32 / 0.020, rel=1e-12)
    assert row.mfu == pytest.approx(row.tokens_per_s * flops_per_token(config.model, 32) / 989e12, rel=1e-12)
    assert 0 < row.mfu < 1
    monkeypatch.setenv("BABYGPT_PEAK_FLOPS", "1e15")  # the override is for accelerators, never for CPU
    assert bench._train_row("jax", args, config, "cpu", times, 1.5, None).mfu is None


def test_format_table_marks_missing_values_and_hf_cache():
    base = dict(mode="generate", preset="tiny", batch=1, seq=4, device="cpu", ms_median=2.0, ms_min=1.0)
    base.update(ms_max=3.0, tokens_per_s=1500.0, compile_s=0.25)
    rows = [
        {**base, "backend": "torch", "mfu": None, "peak_mem_gb": None, "extra": {}},
        {**base, "backend": "hf", "mfu": 0.4567, "peak_mem_gb": 1.25, "extra": {"hf_cache": "static"}},
        {
            **base,
            "backend": "jax",
            "mode": "train",
            "mfu": None,
            "peak_mem_gb": None,
            "extra": {"ms_pipelined": 1.5, "ms_dispatch": 0.25},
        },
    ]
    head, rule, torch_line, hf_line, train_line = bench.format_table(rows).splitlines()
    assert set(rule) == {"-"} and len(rule) == len(head)
    assert torch_line.split() == [
        "torch",
        "generate",
        "tiny",
        "1",
        "4",
        "2.00",
        "(1.0-3.0)",
        "1,500",
        "-",
        "-",
        "0.2",
        "-",  # dispatch: training rows only
        "-",  # pipelined: training rows only
    ]
    assert hf_line.split()[0] == "hf/static" and hf_line.split()[-5:] == ["45.7%", "1.2", "0.2", "-", "-"]
    assert train_line.split()[-2:] == ["0.25", "1.50"]


# ---------------------------------------------------------------------------------------------
# babygpt_bench.profile on synthetic traces

KERNEL_CATEGORIES = [
    # attention first: flash kernels also name cutlass, cuDNN's fused attention names sdpa or flash
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_6_64x64x128_4x1x1_kernel0_0", "attention"),
    ("sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0", "attention"),
    ("fused_attn_fwd_kernel", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas", "matmul"),
    ("cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8", "matmul"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NNT", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_32x5_tn", "matmul"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("adam_update_kernel", "optimizer"),
    ("triton_red_fused__to_copy_add_native_layer_norm_0", "fused reduction"),  # not "copy": first match wins
    ("triton_per_fused__log_softmax_nll_loss_forward_3", "fused reduction"),
    ("input_reduce_fusion_3", "fused reduction"),  # XLA's reduction fusion: "reduce" before "fusion"
    ("triton_poi_fused__to_copy_gelu_1", "fused elementwise"),
    ("loop_add_fusion_7", "fused elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "fused elementwise"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("Memset (Device)", "copy"),
    ("void at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)", "copy"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "other"),
    ("", "other"),
]  # fmt: skip


@pytest.mark.parametrize("kernel, category", KERNEL_CATEGORIES)
def test_categorize(kernel, category):
    assert categorize(kernel) == category
    assert categorize(kernel.upper()) == category  # matching ignores case


def test_every_category_has_an_example():
    assert {c for _, c in KERNEL_CATEGORIES} == {c for c, _ in CATEGORIES} | {"other"}


def _x(name, dur, pid, tid, **kw):
    return {
        "ph": "X",
        "name": name,
        "pid": pid,
        "tid": tid,
        "ts": 0.0,
        **({"dur": dur} if dur is not None else {}),
        **kw,
    }


# torch.profiler: device kernels have cat "kernel"; cpu ops and their launches do not count.
TORCH_KERNELS = [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas", 120.0),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NNT", 80.0),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", 40.0),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", 30.0),
    ("triton_red_fused__to_copy_add_native_layer_norm_0", 12.5),
    ("triton_poi_fused__to_copy_gelu_1", 8.0),
    ("triton_red_fused__to_copy_add_native_layer_norm_0", 12.5),
    ("void at::native::cunn_SoftMaxForward<4, float>", 0.0),  # no "dur": counted as 0
]
TORCH_TRACE = {
    "schemaVersion": 1,
    "traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "python3"}},
        _x("aten::mm", 50.0, 1, 1, cat="cpu_op"),
        _x("cudaLaunchKernel", 5.0, 1, 1, cat="cuda_runtime"),
        _x("ProfilerStep#1", 900.0, 1, 1, cat="user_annotation"),
        *[_x(name, dur or None, 0, 7, cat="kernel") for name, dur in TORCH_KERNELS],
        {"ph": "f", "name": "", "cat": "ac2g", "id": 3, "pid": 0, "tid": 7, "ts": 0.0},
    ],
}

# jax.profiler's perfetto trace: one process per device; only its "Stream #..." rows are kernels,
# since "XLA Ops" and "XLA Modules" overlap them and the host process is CPU time.
JAX_KERNELS = [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", 100.0),
    ("cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8", 60.0),
    ("sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0", 50.0),
    ("input_reduce_fusion_3", 20.0),
    ("loop_add_fusion_7", 10.0),
    ("loop_add_fusion_7", 10.0),
    ("Memcpy DtoH (Device -> Pinned)", 4.0),  # on its own stream
]
JAX_TRACE = {
    "displayTimeUnit": "ns",
    "traceEvents": [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "python"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "name": "process_sort_index", "args": {"sort_index": 2}},
        {"ph": "M", "pid": 2, "tid": 1, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "tid": 3, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": 2, "tid": 4, "name": "thread_name", "args": {"name": "Stream #14(MemcpyD2H)"}},
        _x("$profiler.py:307 trace", 5000.0, 1, 10),
        _x("loop_add_fusion_7", 9.0, 1, 10),  # a host row with a kernel's name
        _x("jit_train_step(1234)", 300.0, 2, 3),
        _x("fusion.12", 250.0, 2, 2),
        _x("dot.3", 100.0, 2, 2),
        *[_x(name, dur, 2, 4 if name.startswith("Memcpy") else 1) for name, dur in JAX_KERNELS],
        {"ph": "i", "name": "marker", "pid": 2, "tid": 1, "ts": 0.0, "s": "t"},  # not a duration event
        _x("thread without a name", 7.0, 2, 99),
    ],
}


@pytest.mark.parametrize(
    "trace, kernels", [(TORCH_TRACE, TORCH_KERNELS), (JAX_TRACE, JAX_KERNELS)], ids=["torch", "jax"]
)
def test_device_kernels_reads_only_device_kernels(trace, kernels):
    assert device_kernels(trace) == kernels


def test_device_kernels_of_a_trace_without_device_rows_is_empty():
    host_only = {"traceEvents": [e for e in JAX_TRACE["traceEvents"] if e.get("pid") == 1]}
    assert device_kernels(host_only) == []
    assert device_kernels({}) == []


def test_load_reads_gzip_and_bare_event_lists(tmp_path):
    with gzip.open(tmp_path / "perfetto_trace.json.gz", "wt") as f:
        json.dump(JAX_TRACE, f)
    (tmp_path / "events.json").write_text(
        json.dumps(TORCH_TRACE["traceEvents"])
    )  # a bare list is legal Chrome trace
    assert _load(tmp_path / "perfetto_trace.json.gz") == JAX_TRACE
    assert _load(tmp_path / "events.json") == {"traceEvents": TORCH_TRACE["traceEvents"]}
    assert device_kernels(_load(tmp_path / "events.json")) == TORCH_KERNELS


def test_summarize_divides_by_steps_and_adds_up():
    kernels = [("sm90_xmma_gemm_a", 300.0), ("flash_fwd", 250.0), ("sm90_xmma_gemm_a", 100.0)]
    kernels += [("triton_poi_fused_add_0", 50.0), ("mystery", 0.5)]
    s = summarize(kernels, steps=2)
    assert s["steps"] == 2
    assert s["kernels_per_step"] == 2.5
    assert s["categories"] == pytest.approx(
        {"matmul": 0.2, "attention": 0.125, "fused elementwise": 0.025, "other": 0.00025}, abs=1e-12
    )
    assert list(s["categories"]) == ["matmul", "attention", "fused elementwise", "other"]  # heaviest first
    assert s["kernel_ms_per_step"] == pytest.approx(0.35025, abs=1e-12)
    assert abs(sum(s["categories"].values()) - s["kernel_ms_per_step"]) < 1e-9
    assert [(k["name"], k["calls_per_step"], k["category"]) for k in s["top_kernels"]] == [
        ("sm90_xmma_gemm_a", 1.0, "matmul"),
        ("flash_fwd", 0.5, "attention"),
        ("triton_poi_fused_add_0", 0.5, "fused elementwise"),
        ("mystery", 0.5, "other"),
    ]
    assert s["top_kernels"][0]["ms_per_step"] == pytest.approx(0.2, abs=1e-12)
    assert [k["name"] for k in summarize(kernels, steps=2, top=2)["top_kernels"]] == [
        "sm90_xmma_gemm_a",
        "flash_fwd",
    ]


@pytest.mark.parametrize(
    "trace, steps", [(TORCH_TRACE, 1), (TORCH_TRACE, 4), (JAX_TRACE, 3)], ids=["torch1", "torch4", "jax3"]
)
def test_summary_of_a_trace_adds_up_to_its_kernel_time(trace, steps):
    kernels = device_kernels(trace)
    s = summarize(kernels, steps)
    total_ms = sum(us for _, us in kernels) / 1000
    assert abs(s["kernel_ms_per_step"] - total_ms / steps) < 1e-9
    assert abs(sum(s["categories"].values()) - s["kernel_ms_per_step"]) < 1e-9
    assert abs(sum(k["ms_per_step"] for k in s["top_kernels"]) - s["kernel_ms_per_step"]) < 1e-9  # < 40 names
    assert s["kernels_per_step"] == len(kernels) / steps
    assert sum(k["calls_per_step"] for k in s["top_kernels"]) == pytest.approx(
        len(kernels) / steps, abs=1e-12
    )
    for category, ms in s["categories"].items():
        expected = sum(us for name, us in kernels if categorize(name) == category) / 1000 / steps
        assert abs(ms - expected) < 1e-9, category


def test_summaries_of_both_traces_use_the_same_categories():
    torch_s, jax_s = summarize(device_kernels(TORCH_TRACE), 1), summarize(device_kernels(JAX_TRACE), 1)
    assert set(torch_s["categories"]) == {
        "matmul",
        "attention",
        "optimizer",
        "fused reduction",
        "fused elementwise",
        "other",
    }
    assert set(jax_s["categories"]) == {"matmul", "attention", "fused reduction", "fused elementwise", "copy"}
    assert jax_s["categories"]["matmul"] == pytest.approx(0.160, abs=1e-12)
    assert jax_s["categories"]["fused elementwise"] == pytest.approx(0.020, abs=1e-12)
    assert torch_s["categories"]["fused reduction"] == pytest.approx(0.025, abs=1e-12)


def test_format_summary_lists_categories_and_heaviest_kernels():
    text = format_summary("jax", summarize(device_kernels(JAX_TRACE), 2))
    lines = text.splitlines()
    assert lines[0] == "jax: 0.127 ms of kernels per step, 4 kernels per step"  # 254 us / 2, 7 kernels / 2
    assert lines[1].split() == ["matmul", "0.080", "ms"]
    assert "  heaviest kernels (ms/step, calls/step):" in lines
    assert lines[-1].split() == [
        "0.002",
        "0.5",
        "Memcpy",
        "DtoH",
        "(Device",
        "->",
        "Pinned)",
    ]  # 4 us over 2 steps: 0.002 ms and half a call per step


def test_kernel_sweep_attention_checks_every_setting_against_sdpa(tmp_path):
    """--attention: the batch attention kernel under two settings, SDPA and the split kernels,
    each at three cache positions, all within a few bfloat16 steps of SDPA in float32."""
    pytest.importorskip("triton")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "babygpt_bench.kernel_sweep", "--preset", "tiny", "--attention"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "sweep-attention.json").read_text())["rows"]
    assert [r["kernel"] for r in rows[:4]] == ["sdpa", "split", "rows", "rows"] and len(rows) == 12
    assert {r.get("stages") for r in rows if r["kernel"] == "rows"} == {1, 2}  # pipelined or not
    assert len({r["pos"] for r in rows}) == 3 and all(r["us"] is None for r in rows)
    assert all(r["rel_error"] <= 4 * 2.0**-8 for r in rows), [r["rel_error"] for r in rows]


def test_kernel_sweep_checks_every_setting_against_f_linear(tmp_path):
    """Without CUDA the sweep runs its settings in Triton's interpreter: each must compute the same
    matmul as F.linear (a few bfloat16 steps: the interpreter truncates where a GPU rounds), and
    nothing is timed."""
    pytest.importorskip("triton")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "babygpt_bench.kernel_sweep", "--preset", "tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    shapes = ["qkv", "fc", "head", "proj", "mlp_proj"]
    assert list(dict.fromkeys(r["shape"] for r in rows)) == shapes
    triton = [r for r in rows if r["kernel"] == "triton"]
    assert len(triton) == 2 * len(shapes) and all(r["us"] is None for r in rows)
    assert all(r["rel_error"] <= 4 * 2.0**-8 for r in triton), [r["rel_error"] for r in triton]
