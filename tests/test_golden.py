"""A pinned loss trajectory through the real `kdkit train` command on the bundled tiny world.

Relative invariants (cache == live, 8×1 == 2×4, resume == uninterrupted) cannot catch a bug both of
their sides share; this can: the demo world's first 48 training rows, a seeded fresh student, the
bundled teacher live, CE + KD (kl_fwd at T = 2) then a rmse barrier to the base, through the CLI, and
each step's losses against the numbers this code produced when they were pinned.

The pins hold on any CPU: the tolerances come from the spread measured across torch's CPU kernels
(``ATEN_CPU_CAPABILITY`` = default, avx2, avx512, each with ``KDKIT_THREADS`` = 1 and 2; torch 2.13.0,
x86-64 with AVX-512), the largest relative distance of any of the six from the pins:

=================  ==========  ==========  ==================  ======================
trajectory         total       CE          KL / barrier        tolerance (rel)
=================  ==========  ==========  ==================  ======================
KD (steps 1-6)     1.1e-7      1.4e-7      9.2e-8              1e-5 (every column)
barrier (1-6)      6.3e-6      2.4e-6      7.5e-5 (step 6)     1e-4 total/CE, 1e-3 barrier
=================  ==========  ==========  ==================  ======================

The barrier is a small hinge over a divergence that starts at 0, so rounding grows fastest there.
Deliberately broken variants, each run through the same command (``test_broken_variants_miss_the_pins``,
slow), miss the pins by far more; the largest relative miss of a step, at its smallest over the six steps:
no T² (0.75), reverse KL for the KD (0.19), another CE normalisation (``sqrt_row``: 1.2e-4, 2.5e-3 at
step 1), the barrier aggregated by mean (0.31), the barrier on forward KL (2.8e-2 from step 2 on; step 1,
at the base, cannot tell), every row weighed by 1/√n under the barrier (2.2e-2).
Recompute the pins (and say why in the commit) only when a change is meant to change the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from kdkit.demo.assets_build import STUDENT_SHAPE, fresh_model_dir
from kdkit.demo.run import TEACHER_DIR
from kdkit.demo.world import make_world, training_rows

# step: (total_loss, ce_loss, kl_loss, barrier), pinned from this code on torch 2.13.0 (CPU)
PINNED_KD = {1: (18.087087631225586, 4.3383450832414985, 13.748743014011335, 0.0),
             2: (17.158231735229492, 3.911735431101527, 13.246495863970589, 0.0),
             3: (16.37189483642578, 3.635527531126552, 12.736366702525395, 0.0),
             4: (15.44921588897705, 3.4795332425378365, 11.969680580857624, 0.0),
             5: (15.039897918701172, 3.267193426799137, 11.77270453438196, 0.0),
             6: (14.938096046447754, 3.140977229315804, 11.797119140625, 0.0)}
# step: (total_loss, ce_loss, barrier): the bundled teacher + LoRA, anchored to itself (adapters off)
PINNED_BARRIER = {1: (0.28112784028053284, 0.2810278443305258, 9.999999747378752e-05),
                  2: (0.25706854462623596, 0.24744543015147766, 0.009623115882277489),
                  3: (0.27518272399902344, 0.21217270414124223, 0.06301000714302063),
                  4: (0.2034498006105423, 0.16440347919549642, 0.03904631361365318),
                  5: (0.4290514588356018, 0.24163162469332894, 0.1874198168516159),
                  6: (0.26329049468040466, 0.23907825285117532, 0.024212265387177467)}


KD_RTOL = (1e-5, 1e-5, 1e-5, 1e-5)
BARRIER_RTOL = (1e-4, 1e-4, 1e-3)
KD = {"teacher": {"model": str(TEACHER_DIR)}, "objective": {"kd": {"kind": "kl_fwd", "temperature": 2.0}}}
BARRIER = {"student": {"path": str(TEACHER_DIR), "lora": {"r": 4, "alpha": 8}}, "reference": {"kind": "base"},
           "objective": {"barrier": {"kind": "kl_rev", "aggregate": "rmse", "tau": 0.0, "weight": 1.0}}}


def misses(got: dict[int, tuple[float, ...]], pinned: dict[int, tuple[float, ...]], rtol: tuple[float, ...]
           ) -> list[tuple[int, int, float]]:
    """(step, column, relative distance) for every value farther from its pin than its column's tolerance."""
    assert got.keys() == pinned.keys()
    out = []
    for step, want in pinned.items():
        for j, (g, w, tol) in enumerate(zip(got[step], want, rtol, strict=True)):
            rel = abs(g - w) / max(abs(w), 1e-12)
            if rel > tol and abs(g - w) > 1e-12:
                out.append((step, j, rel))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    rows = training_rows(make_world(0).train[:48])
    (root / "train.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    fresh_model_dir(root / "student", STUDENT_SHAPE, seed=1)
    return root


def _trajectory(root, name: str, body: dict) -> dict[int, tuple[float, ...]]:
    base = {"student": {"path": str(root / "student")}, "data": {"train": str(root / "train.jsonl"), "max_length": 128},
            "optim": {"lr": 3e-3, "micro_batch": 8, "grad_accum": 1, "epochs": 1, "schedule": "cosine",
                      "warmup_steps": 2, "seed": 0}, "checkpoint": {"every": 0}}
    cfg = root / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**base, **body}))
    proc = subprocess.run([sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(root / name), "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: tuple(m[k] for k in ("total_loss", "ce_loss", "kl_loss", "barrier") if k in m) for m in rows}


def test_distillation_trajectory_is_pinned(world):
    assert misses(_trajectory(world, "kd", KD), PINNED_KD, KD_RTOL) == []


def test_barrier_trajectory_is_pinned(world):
    assert misses(_trajectory(world, "barrier", BARRIER), PINNED_BARRIER, BARRIER_RTOL) == []


def _with(body: dict, section: str, **kw) -> dict:
    out = json.loads(json.dumps(body))
    out["objective"].setdefault(section, {}).update(kw) if section else out["objective"].update(kw)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, body, pinned, rtol", [
    ("no_t2", _with(KD, "kd", t2_scale=False), PINNED_KD, KD_RTOL),
    ("kd_reverse", _with(KD, "kd", kind="kl_rev"), PINNED_KD, KD_RTOL),
    ("kd_sqrt_row", _with(KD, "", ce_norm="sqrt_row"), PINNED_KD, KD_RTOL),
    ("barrier_mean", _with(BARRIER, "barrier", aggregate="mean"), PINNED_BARRIER, BARRIER_RTOL),
    ("barrier_forward", _with(BARRIER, "barrier", kind="kl_fwd"), PINNED_BARRIER, BARRIER_RTOL),
    ("barrier_sqrt_row", _with(BARRIER, "", ce_norm="sqrt_row"), PINNED_BARRIER, BARRIER_RTOL),
])
def test_broken_variants_miss_the_pins(world, name, body, pinned, rtol):
    # what the tolerances let through is far smaller than what a wrong convention changes
    missed = misses(_trajectory(world, name, body), pinned, rtol)
    assert missed and max(rel for _, _, rel in missed) > 10 * max(rtol), (name, missed)
