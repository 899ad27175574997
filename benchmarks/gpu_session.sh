#!/usr/bin/env bash
# What one GPU lease runs (device tool; see benchmarks/results/ for what it measured).
# Usage: bash benchmarks/gpu_session.sh train|tests|speed-quick|speed [extra speed.py args]
# Needs the wheels in .whl (diffusers, transformers, open_clip, torchao: see README) and $OUT.
# The next int8 measurement, carrying .whl with diffusers, torchao and importlib_metadata
# (2026-12-04: a whole-model compile of the full FLUX.1 took minutes per variant; regional
# compilation compiles each block class once; fallback: --gpu-flux-blocks 4,8, the same shapes):
#   timeout 500 bash benchmarks/gpu_session.sh speed --gpu-models flux.1 --gpu-compile regional \
#     --gpu-variants dq-w8a8,torchao-int8-dyn,torchao-fp8-dyn
# Retraining the default pipeline in one 256 px stage on the GPU with the shipped model's
# settings (pipelines/default/README.md; the shipped one was trained in two stages on a CPU):
#   bash benchmarks/gpu_session.sh train --text-steps 600 --timestep-power 2 && bash benchmarks/gpu_session.sh eval
set -uo pipefail
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# the data packages as an installed dq names them (dq eval's attribute accuracy imports them)
ln -sfn "$PWD/pipelines" /tmp/site/dq_pipelines && ln -sfn "$PWD/calib" /tmp/site/dq_calib
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
what=$1; shift
case $what in
  setup) ;;
  train)
    python3 -m pipelines.default.train --device cuda --seed 0 --workers 12 \
      --vae-from pipelines/default/model/vae --num-images 30000 \
      --dit-steps "${DIT_STEPS:-10000}" --dit-batch 128 --warmup-steps 300 --save-every 1000 \
      --ema-decay 0.9995 --no-preview --out /tmp/model --cache-dir /tmp/cache "$@" \
      && cp -r /tmp/model "$OUT/model" ;;
  eval)
    python3 -m dq.cli eval /tmp/model --metrics attr,clip --num-prompts 256 --batch-size 64 \
      --device cuda --json "$OUT/eval.json" "$@" ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_layers.py tests/test_kernels_pipeline.py "$@" ;;
  speed-quick)
    python3 benchmarks/speed.py --quick --skip slice attention default memory --out "$OUT" "$@" ;;
  speed)
    python3 benchmarks/speed.py --skip slice attention default memory --rounds 5 --inner 5 --out "$OUT" "$@" ;;
esac
