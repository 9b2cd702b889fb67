"""The demo end to end at reduced size (slow: `make test-all`), and its report in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kdkit.decide.registry import Registry
from kdkit.demo.run import TEACHER_DIR, DemoSettings, run_demo
from kdkit.teacher.cache import verify_cache

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
              pytest.mark.skipif(not (TEACHER_DIR / "model.safetensors").is_file(), reason="no demo teacher")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    settings = DemoSettings(student_rows=128, epochs=1, n_anchors=10, n_holdout=10, max_new_tokens=64)
    res = run_demo(out, settings, progress=False, log=lambda m: None)
    return out, res


def test_demo_artefacts_are_consistent(demo):
    out, res = demo
    assert verify_cache(out / "cache") == []
    for name in ("distilled", "baseline"):
        epochs = [json.loads(x) for x in (out / "runs" / name / "epochs.jsonl").read_text().splitlines()]
        assert epochs and "val_loss" in epochs[-1]
        assert (out / "packs" / name / "model.safetensors").is_file()
    reg = Registry(out / ".kdkit")
    gates = reg.gates()
    assert len(gates) == 1 and gates[0]["decision"] == res["gate"]["decision"]
    assert reg.production().name in ("baseline", "distilled")
    models = {m["model"]: m for m in res["models"]}
    assert set(models) == {"teacher", "distilled", "baseline"}
    assert models["teacher"]["parameters"] > models["distilled"]["parameters"] == models["baseline"]["parameters"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Anchors" in html and "Holdout" in html
    saved = json.loads((out / "demo.json").read_text())
    assert saved["holdout_delta"] == models["distilled"]["holdout_passed"] - models["baseline"]["holdout_passed"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(demo, tmp_path):
    out, _ = demo
    shot = tmp_path / "report.png"
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=3000", "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    assert dom.stdout.count("<img") >= 1 and "data:image/png;base64," in dom.stdout
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p2'}",
         f"--screenshot={shot}", "--window-size=1200,1600", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))
    assert pixels.std() > 0.05  # rendered plots and tables, not a blank page
    Path("/tmp/kdkit-report-screenshot.png").write_bytes(shot.read_bytes())
