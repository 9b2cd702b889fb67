"""README's demo table, from the demo itself: run `kdkit demo --seed N` for each seed, keep the figures in
docs/demo_seeds.json and write the table and its averages into README between the demo-seeds markers.

    python scripts/readme_demo.py [--seeds 0 1 2]            # runs the demos (about a minute each, 2 cores)
    python scripts/readme_demo.py --from-json                 # README from docs/demo_seeds.json, no run

tests/test_readme_demo.py checks that README shows what docs/demo_seeds.json holds, and (slow) that the
demo of seed 0 still prints those figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "demo_seeds.json"
README = ROOT / "README.md"
START, END = "<!-- demo-seeds:start -->\n", "<!-- demo-seeds:end -->"
MODELS = ("teacher", "distilled", "baseline")


def figures(demo_json: dict) -> dict:
    """One seed's row: what the demo's table prints (pass counts, losses, the gate), not its seconds."""
    m = {x["model"]: x for x in demo_json["models"]}
    return {"anchors": {k: f"{m[k]['anchor_passed']}/{m[k]['anchor_total']}" for k in MODELS},
            "holdout": {k: f"{m[k]['holdout_passed']}/{m[k]['holdout_total']}" for k in MODELS},
            "val_loss": {k: round(m[k]["val_loss"], 4) for k in ("distilled", "baseline")},
            "gate": demo_json["gate"]["decision"]}


def table(rows: dict[str, dict]) -> str:
    head = ("| seed | anchors: teacher | distilled | baseline | holdout: teacher | distilled | baseline | "
            "val loss: distilled | baseline | gate |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {s} | {' | '.join(r['anchors'][k] for k in MODELS)} | "
                   f"{' | '.join(r['holdout'][k] for k in MODELS)} | {r['val_loss']['distilled']:.4f} | "
                   f"{r['val_loss']['baseline']:.4f} | {r['gate']} |\n" for s, r in rows.items())
    n = len(rows)

    def mean(get) -> float:
        return sum(get(r) for r in rows.values()) / n

    held = {k: mean(lambda r, k=k: int(r["holdout"][k].split("/")[0])) for k in ("distilled", "baseline")}
    val = {k: mean(lambda r, k=k: r["val_loss"][k]) for k in ("distilled", "baseline")}
    wins = sum(r["val_loss"]["distilled"] < r["val_loss"]["baseline"] for r in rows.values())
    return (body and head + body) + (
        f"\nOver the {n} seeds: validation loss {val['distilled']:.4f} distilled against {val['baseline']:.4f} "
        f"baseline (lower on {wins} of {n} seeds); holdout pass {held['distilled']:.1f} against "
        f"{held['baseline']:.1f} tasks on average.\n")


def write_readme(rows: dict[str, dict]) -> None:
    text = README.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    README.write_text(before + START + table(rows) + END + after)


def run(seeds: list[int]) -> dict[str, dict]:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in seeds:
            out = Path(tmp) / f"seed-{s}"
            subprocess.run([sys.executable, "-m", "kdkit", "demo", "--seed", str(s), "--out", str(out), "--no-progress"],
                           check=True, cwd=ROOT)
            rows[str(s)] = figures(json.loads((out / "demo.json").read_text()))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--from-json", action="store_true", help="rewrite README from docs/demo_seeds.json only")
    args = ap.parse_args()
    if args.from_json:
        rows = json.loads(FIGURES.read_text())["seeds"]
    else:
        rows = run(args.seeds)
        import torch

        FIGURES.write_text(json.dumps({"command": "python scripts/readme_demo.py --seeds "
                                       + " ".join(map(str, args.seeds)), "torch": torch.__version__,
                                       "seeds": rows}, indent=1, sort_keys=True) + "\n")
    write_readme(rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
