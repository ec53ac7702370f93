#!/usr/bin/env bash
# One device-machine session: set up, check, and time everything that needs a GPU, logging under
# $OUT (or out/gpu). Parts: smoke | bench | generate | train | parity | dist | nanogpt | profile |
# genprofile | kernelsweep | generate-big | xla | sweep | fsdp2 | fsdpprobe | xl | xlremat (default: the first seven).
#   bash scripts/gpu_session.sh bench generate
# The device tool brings back at most 8 files from $OUT, so the results also go into one results.tgz.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# grain is missing from the GPU image: carried as wheels (.whl, see ../shared/device/fetch-wheels.sh)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
parts=${*:-smoke nanogpt bench generate train parity dist}
run() { echo "=== $*" | tee -a "$OUT/session.log"; "$@" 2>&1 | tee -a "$OUT/session.log"; }

for part in $parts; do case $part in
smoke)
  run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  run python3 -c "import jax, flax, torch, optax, orbax.checkpoint as o, grain, transformers; print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__, 'torch', torch.__version__, 'optax', optax.__version__, 'grain', grain.__version__, 'transformers', transformers.__version__)"
  ;;
nanogpt)  # the reference, timed in the same session: nanoGPT's own bench.py, GPT-2 124M, B=32, T=1024
  if [ -d .nanogpt ]; then
    (cd .nanogpt && run python3 bench.py --batch_size=32 --real_data=False --compile=True --bias=True)
  fi
  ;;
nanogpt-curve)  # issue 19: nanoGPT's train.py and both backends, our Shakespeare split, one recipe, 300 steps
  if [ -d .nanogpt ]; then
    run python3 scripts/compare_nanogpt.py --out /tmp/nanogpt-curve/out --runs /tmp/nanogpt-curve/runs ${NANOGPT_CURVE_PARTS:+--parts $NANOGPT_CURVE_PARTS}
    mkdir -p "$OUT/nanogpt-curve" && cp /tmp/nanogpt-curve/out/* "$OUT/nanogpt-curve/"
  else
    echo "nanogpt-curve: no .nanogpt/ here; carry a copy of nanoGPT" | tee -a "$OUT/session.log"
  fi
  ;;
bench)
  run python3 -m babygpt_bench.bench --backend jax,torch --preset gpt2 --batch 32 --seq 1024 --steps 30 --out "$OUT/bench-124m"
  run python3 -m babygpt_bench.bench --backend jax,torch --preset gpt2-medium --batch 16 --seq 1024 --steps 20 --out "$OUT/bench-350m"
  run python3 -m babygpt_bench.bench --backend jax,torch --preset gpt2-large --batch 8 --seq 1024 --steps 10 --out "$OUT/bench-774m"
  ;;
generate)
  run python3 -m babygpt_bench.bench --mode generate --backend jax,torch,hf --batch 1,32 --prompt-len 128 --new-tokens 256 --steps 3 --out "$OUT/gen"
  ;;
genprofile)  # where a decoded token's time goes: kernels per new token in both backends, and torch's host ops
  run python3 -m babygpt_bench.bench --mode generate --backend jax,torch --batch 1,32 --prompt-len 128 --new-tokens 256 --steps 3 --out "$OUT/genprofile" --profile /tmp/gprof
  for b in 1 32; do echo "--- torch host ops, batch $b"; head -30 /tmp/gprof/torch-generate-b$b/torch_ops.txt | cut -c1-190 | tee -a "$OUT/session.log"; done
  ;;
kernelsweep)  # the fused decode kernels' launch settings against cuBLAS (babygpt/kernel_blocks.py)
  run python3 -m babygpt_bench.kernel_sweep --out "$OUT/kernel-sweep"
  run python3 -m babygpt_bench.kernel_sweep --attention --out "$OUT/kernel-sweep"
  ;;
generate-big)  # decoding for the 350M and 774M presets
  for preset in gpt2-medium gpt2-large; do
    run python3 -m babygpt_bench.bench --mode generate --backend jax,torch,hf --preset $preset --batch 1,32 --prompt-len 128 --new-tokens 256 --steps 3 --out "$OUT/gen-$preset"
  done
  ;;
train)
  run python3 train.py --backend=torch --config configs/shakespeare-gpt2.toml run.out_dir=/tmp/runs train.max_steps=200 train.eval_interval=100
  run python3 train.py --backend=jax --config configs/shakespeare-gpt2.toml run.out_dir=/tmp/runs run.name=shakespeare-gpt2-jax train.max_steps=200 train.eval_interval=100
  cp /tmp/runs/*/metrics.jsonl "$OUT/" 2>/dev/null; for d in /tmp/runs/*/; do cp "$d/metrics.jsonl" "$OUT/$(basename "$d").jsonl"; done
  ;;
parity)
  [ -f babygpt_bench/gpu_check.py ] && run python3 -m babygpt_bench.gpu_check
  ;;
profile)  # both profilers over 5 steps; the traces stay on the machine, the summaries come back
  run python3 -m babygpt_bench.bench --backend jax,torch --preset gpt2 --batch 32 --seq 1024 --steps 20 --out "$OUT/profile-124m" --profile /tmp/traces
  ;;
xla)  # XLA GPU flags that might pay for the JAX step, each against the default in the same session
  for flags in "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_enable_cublaslt=true"; do
    run env XLA_FLAGS="$flags" python3 -m babygpt_bench.bench --backend jax --preset gpt2 --batch 32 --seq 1024 --steps 20 --out "/tmp/xla/${flags//[^a-z]/}"
  done
  ;;
sweep)  # which default Shakespeare config learns most per CPU-second (losses do not depend on the hardware)
  python3 prepare.py shakespeare >/dev/null
  run python3 scripts/sweep_shakespeare.py --out /tmp/sweep --parallel 8 train.dtype=float32
  cp /tmp/sweep/sweep.json "$OUT/"
  ;;
dist)  # the distributed code paths on one GPU, each beside the plain run of the same session
  C="--config configs/shakespeare-gpt2.toml run.out_dir=/tmp/dist train.max_steps=40 train.eval_interval=1000 train.checkpoint_interval=1000 train.sample_tokens=0"
  run python3 train.py --backend=torch $C run.name=torch-plain
  run torchrun --standalone --nproc_per_node=1 train.py --backend=torch $C run.name=torch-ddp
  run torchrun --standalone --nproc_per_node=1 train.py --backend=torch $C run.name=torch-fsdp2 train.fsdp=true
  run torchrun --standalone --nproc_per_node=1 train.py --backend=torch $C run.name=torch-fsdp2-remat train.fsdp=true train.remat=true
  run python3 train.py --backend=jax $C run.name=jax-plain
  run env JAX_COORDINATOR_ADDRESS=127.0.0.1:12355 JAX_NUM_PROCESSES=1 JAX_PROCESS_ID=0 python3 train.py --backend=jax $C run.name=jax-distributed
  run python3 train.py --backend=jax $C run.name=jax-fsdp train.fsdp=true
  run python3 train.py --backend=jax $C run.name=jax-fsdp-remat train.fsdp=true train.remat=true
  run python3 scripts/summarize_runs.py /tmp/dist/torch-plain /tmp/dist/torch-ddp /tmp/dist/torch-fsdp2 /tmp/dist/torch-fsdp2-remat /tmp/dist/jax-plain /tmp/dist/jax-distributed /tmp/dist/jax-fsdp /tmp/dist/jax-fsdp-remat
  grep -h "peak memory" "$OUT/session.log" | tail -8
  ;;
fsdp2)  # torch's FSDP2 and remat paths beside the plain run (the torch half of dist, plus remat alone)
  C="--backend=torch --config configs/shakespeare-gpt2.toml run.out_dir=/tmp/fsdp2 train.max_steps=40 train.eval_interval=1000 train.checkpoint_interval=1000 train.sample_tokens=0"
  run python3 train.py $C run.name=torch-plain
  run python3 train.py $C run.name=torch-remat train.remat=true
  run torchrun --standalone --nproc_per_node=1 train.py $C run.name=torch-fsdp2 train.fsdp=true
  run torchrun --standalone --nproc_per_node=1 train.py $C run.name=torch-fsdp2-remat train.fsdp=true train.remat=true
  run python3 scripts/summarize_runs.py /tmp/fsdp2/torch-plain /tmp/fsdp2/torch-remat /tmp/fsdp2/torch-fsdp2 /tmp/fsdp2/torch-fsdp2-remat
  grep -h "peak memory" "$OUT/session.log" | tail -4
  ;;
xl)  # GPT-2 1.5B on one H200 (141 GB), both backends
  run python3 -m babygpt_bench.bench --backend jax,torch --preset gpt2-xl --batch 8 --seq 1024 --steps 10 --out "$OUT/bench-1558m"
  ;;
xlremat)  # the same with activation checkpointing and twice the micro-batch
  run python3 -m babygpt_bench.bench --backend jax,torch --preset gpt2-xl --batch 16 --seq 1024 --steps 10 --remat --out "$OUT/bench-1558m-remat"
  ;;
fsdpprobe)  # where torch's FSDP2 step loses time on one GPU: kernels and host ops, beside the plain step
  for b in 16 32; do
    run python3 -m babygpt_bench.bench --backend torch --preset gpt2 --batch $b --seq 1024 --steps 10 --out "$OUT/fsdp-plain-$b"
    run python3 -m babygpt_bench.bench --backend torch --preset gpt2 --batch $b --seq 1024 --steps 10 --fsdp --profile /tmp/fp/fsdp-$b --profile-steps 2 --out "$OUT/fsdp-fsdp-$b"
  done
  echo "--- host ops, fsdp, batch 16"; head -34 /tmp/fp/fsdp-16/torch/torch_ops.txt | cut -c1-190 | tee -a "$OUT/session.log"
  ;;
esac; done
echo "=== done" | tee -a "$OUT/session.log"
(cd "$OUT" && find . -name '*.json' -o -name '*.jsonl' -o -name '*.png' | tar czf results.tgz -T - 2>/dev/null)
