#!/usr/bin/env bash
# Reproduces the README's 3-seed table: the demo at its defaults for seeds 0, 1, 2.
set -euo pipefail
mkdir -p demo-seeds
for seed in ${SEEDS:-0 1 2}; do
  kdkit demo --seed "$seed" --out "demo-seeds/seed-$seed" --no-progress > "demo-seeds/seed-$seed.log" 2>&1 || true
  python - "$seed" <<'PY'
import json, sys
s = sys.argv[1]
d = json.load(open(f"demo-seeds/seed-{s}/demo.json"))
m = {x["model"]: x for x in d["models"]}
row = [s] + [f"{m[k]['anchor_passed']}/{m[k]['anchor_total']}" for k in ("teacher", "distilled", "baseline")]
row += [f"{m[k]['holdout_passed']}/{m[k]['holdout_total']}" for k in ("teacher", "distilled", "baseline")]
row += [f"{m['distilled']['val_loss']:.4f}", f"{m['baseline']['val_loss']:.4f}", d["gate"]["decision"], f"{d['total_seconds']:.0f}"]
print("| " + " | ".join(row) + " |")
PY
done
