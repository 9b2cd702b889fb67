"""A 3-rung ladder end to end (real training, merge, sandboxed gate), its table, plot, resume; reports."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from kdkit.decide.ladder import parse_vary, run_ladder
from kdkit.decide.registry import Registry
from kdkit.decide.report import write_report
from kdkit.evaluate.passrate import GenerationSettings
from kdkit.evaluate.sandbox import Limits
from tests.helpers import TOY_TASKS, distill_world, save_model_dir, toy_rows, write_config, write_jsonl

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")

TASKS = TOY_TASKS


@pytest.fixture(scope="module")
def ladder_world(tmp_path_factory):
    root = distill_world(tmp_path_factory.mktemp("ladder"))
    cfg = {"student": {"path": "student", "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}},
           "teacher": {"cache": "cache"}, "data": {"train": "train.jsonl", "validation": "train.jsonl"},
           "optim": {"lr": 1e-2, "micro_batch": 4, "epochs": 1}, "checkpoint": {"every": 0}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_parse_vary():
    assert parse_vary(["objective.kd_weight=0.05,0.10,0.2"]) == [("objective.kd_weight", [0.05, 0.1, 0.2])]
    with pytest.raises(ValueError, match="expected key.sub=v1"):
        parse_vary(["nonsense"])


@needs_bwrap
def test_three_rung_ladder_table_plot_and_resume(ladder_world, tmp_path):
    root = ladder_world
    reg = Registry(tmp_path / "ws")
    reg.promote(reg.register(root / "student", name="base").id)
    kw = {"registry": reg, "settings": GenerationSettings(max_new_tokens=12), "limits": Limits(timeout_s=5),
          "log": lambda m: None}
    vary = ["objective.kd_weight=0.5,1.0,abc"]  # the third rung fails validation: the ladder goes on
    res = run_ladder(root / "cfg.yaml", vary, root / "tasks.jsonl", tmp_path / "lad", **kw)
    assert [r["status"] for r in res] == ["done", "done", "failed"], res[0].get("traceback")
    assert "kd_weight" in res[2]["error"]
    for r in res[:2]:  # 3 tasks cannot show a drop: no KEEP
        assert r["decision"] in ("REVERT", "UNDECIDED") and r["n_tasks"] == 3 and r["avg_ce"] > 0 and r["avg_kl"] >= 0
    md = (tmp_path / "lad" / "ladder.md").read_text()
    assert md.count("\n") == 5 and ("| rung | objective.kd_weight | avg CE | avg KL | val loss | drift train (KL b‖c / "
                                     "c‖b) | drift anchors (KL b‖c / c‖b) | anchor pass |") in md
    rows = list(csv.reader((tmp_path / "lad" / "ladder.csv").open()))
    assert rows[1][1] == "0.5" and rows[3][8] == "FAILED"
    # each rung's drift from the baseline: what `kdkit eval --drift-from` measures on the same rows
    from kdkit.evaluate.drift import drift

    base = reg.pack("base").path
    for r in res[:2]:
        direct = drift(Path(r["run_dir"]).parent / "pack", base, root / "train.jsonl", max_length=96)
        # the same figure; a KL, so >= 0 up to float32 rounding (a rung that barely moved sits at ~1e-8 either side)
        assert r["drift"]["train"]["kl_base_cand_mean"] == direct.kl_base_cand_mean >= -1e-6
        assert rows[1 + r["rung"]][5].startswith(f"{direct.kl_base_cand_mean:.4f} / ")
        answered = next((reg.workspace / "drift").glob("*.jsonl")).read_text().splitlines()
        assert (r["drift"]["anchors"] is None) == (not answered)
    assert (tmp_path / "lad" / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    assert len(reg.gates()) == 2
    from kdkit.decide.card import model_card  # each gate recorded the rung it judged; the model card names it
    from kdkit.decide.export import newest_gate

    g = newest_gate(reg, reg.pack(res[1]["pack"]))
    assert g["metrics"]["origin"] == {"ladder": str((tmp_path / "lad").resolve()), "rung": 1,
                                      "values": {"objective.kd_weight": 1.0}}
    assert "rung 1 (`objective.kd_weight` = 1.0)" in model_card(reg, reg.pack(res[1]["pack"]), g)
    # rerun: finished rungs are skipped (no new gate), the failed one is tried again
    before = (tmp_path / "lad" / "rungs" / "00.json").read_text()
    res2 = run_ladder(root / "cfg.yaml", vary, root / "tasks.jsonl", tmp_path / "lad", **kw)
    assert len(reg.gates()) == 2 and (tmp_path / "lad" / "rungs" / "00.json").read_text() == before
    assert [r["status"] for r in res2] == ["done", "done", "failed"]
    html = (tmp_path / "lad" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "Drift from the baseline against anchor pass" in html
    assert "Validation against objective.kd_weight=0.5" in html  # rung 1 against rung 0, paired over the rows
    for r in res2[:2]:  # each run's per-row validation sums are its validation loss
        vr = json.loads((Path(r["run_dir"]) / "validation_rows.json").read_text())
        last = [json.loads(x) for x in (Path(r["run_dir"]) / "epochs.jsonl").read_text().splitlines()][-1]
        assert sum(vr["ce_sum"]) / sum(vr["tokens"]) == pytest.approx(last["val_loss"], rel=1e-9)
        assert vr["step"] == last["step"] and len(vr["line"]) == 8
    with pytest.raises(ValueError, match="another config, --vary or --set"):
        run_ladder(root / "cfg.yaml", ["optim.lr=0.1"], root / "tasks.jsonl", tmp_path / "lad", **kw)


def test_run_report_is_self_contained(ladder_world, tmp_path):
    from kdkit.config.load import load_train_config
    from kdkit.train import train

    train(load_train_config(ladder_world / "cfg.yaml"), tmp_path / "run", progress=False, log=lambda m: None)
    out = write_report(tmp_path / "run")
    html = out.read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert not re.search(r"(src|href)=[\"']https?:", html)
    assert "kd_weight" in html  # the resolved config is embedded
    epochs = [json.loads(x) for x in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()]
    assert f"{epochs[0]['train_loss']:.4f}" in html
    with pytest.raises(ValueError, match="not a demo, ladder or run"):
        write_report(tmp_path)


def test_run_report_shows_the_coherence_trajectory_and_the_probe_outputs(ladder_world, tmp_path):
    from kdkit.config.load import load_train_config
    from kdkit.train import train

    write_jsonl(tmp_path / "probes.jsonl", [{"prompt": "def f(x):\n"}, {"prompt": "<b>bold</b>", "id": "html"}])
    cfg = yaml.safe_load((ladder_world / "cfg.yaml").read_text())
    cfg["probes"] = {"prompts": str(tmp_path / "probes.jsonl"), "every": 1, "max_new_tokens": 5}
    for k in ("student", "teacher"):
        cfg[k] = {**cfg[k], **{f: str(ladder_world / v) for f, v in cfg[k].items() if f in ("path", "cache")}}
    cfg["data"] = {"train": str(ladder_world / "train.jsonl")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train(load_train_config(tmp_path / "cfg.yaml"), tmp_path / "run", progress=False, log=lambda m: None)
    page = write_report(tmp_path / "run").read_text()
    probes = [json.loads(x) for x in (tmp_path / "run" / "probes.jsonl").read_text().splitlines()]
    assert "probe log-incoherence" in page and page.count("data:image/png;base64,") == 2
    assert "<h3>probe html</h3>" in page and "<h3>probe 1</h3>" in page
    for p in probes:  # every round of every probe is quoted, escaped
        assert f"<td>{p['step']}</td><td>{p['coherence']:.3f}</td><td><pre>{html_escape(p['text'])}</pre>" in page


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def _demo_json(d: Path, decision: str, holdout_delta: int) -> None:
    def model(name: str, holdout: int, pre: float) -> dict:
        return {"model": name, "parameters": 1000, "anchor_passed": 2, "anchor_total": 30,
                "anchor_interval": [0.01, 0.2], "holdout_passed": holdout, "holdout_total": 40, "val_loss": 0.2,
                "kl_to_teacher": 0.1, "wall_s": 50.0, "precompute_s": pre,
                "anchor_outcomes": {f"A/{i}": i < 2 for i in range(30)},
                "holdout_outcomes": {f"H/{i}": i < holdout for i in range(40)}}

    s = {"models": [model("teacher", 39, 0.0), model("distilled", 5 + holdout_delta, 7.5), model("baseline", 5, 0.0)],
         "gate": {"decision": decision, "reason": "1 task(s) that the baseline passes now fail",
                  "suites": [{"tasks": "/x/anchors.jsonl", "regressed_completions": {
                      "A/1": {"candidate": "    return x <script>", "baseline": "    return x + 1"}}}]},
         "distillation_wins_holdout": holdout_delta > 0, "holdout_delta": holdout_delta, "anchor_delta": -1,
         "total_seconds": 100.0}
    d.mkdir(parents=True, exist_ok=True)
    (d / "demo.json").write_text(json.dumps(s))


def test_demo_report_says_the_gate_is_anchors_only_and_fits_the_grid(tmp_path):
    import re

    _demo_json(tmp_path / "revert", "REVERT", 4)
    page = write_report(tmp_path / "revert").read_text()
    assert "distillation wins on the holdout (Δ = +4) but the gate REVERTs" in page
    assert "precompute s</th><th>train s" in page and "<td>7.5</td><td>50.0</td>" in page
    # 40 holdout + 30 anchor tasks in blocks of at most 20 columns (+ the model column)
    for table in re.findall(r"<table class='grid'><tr>(.*?)</tr>", page):
        assert 2 <= table.count("<th>") <= 21
    assert page.count("<table class='grid'>") == 2 + 2
    # each regressed task: the candidate's and the baseline's completion side by side, escaped
    assert "Regressed on anchors.jsonl" in page and "<pre>    return x &lt;script&gt;</pre>" in page
    assert "<pre>    return x + 1</pre>" in page and "<script>" not in page
    _demo_json(tmp_path / "keep", "KEEP", 4)
    page = write_report(tmp_path / "keep").read_text()
    assert "but the gate REVERTs" not in page and "decides on the anchor tasks only" in page


def test_rungs_over_seeds_aggregate_to_one_row_with_a_pooled_interval():
    from kdkit.decide.tables import seed_rows, table_rows
    from kdkit.evaluate.passrate import wilson_interval

    vary = [("objective.kd_weight", [0.5, 1.0]), ("optim.seed", [0, 1, 2])]
    results, rung = [], 0
    for w in (0.5, 1.0):
        for seed in (0, 1, 2):
            passed = {0.5: [2, 3, 1], 1.0: [4, 4, 5]}[w][seed]
            results.append({"rung": rung, "values": {"objective.kd_weight": w, "optim.seed": seed}, "status": "done",
                            "avg_ce": 1.0 + seed, "avg_kl": 0.1 * seed, "val_loss": 2.0 + 0.1 * seed, "passed": passed,
                            "n_tasks": 10, "decision": "KEEP" if passed >= 3 else "REVERT", "train_s": 10.0 * w})
            rung += 1
    results[-1] = {**results[-1], "status": "failed"}
    header, rows = seed_rows(vary, results)
    assert header[:2] == ["objective.kd_weight", "seeds"]
    lo, hi = wilson_interval(6, 30)
    half = 4.3027 * 0.1 / 3 ** 0.5  # the val losses 2.0, 2.1, 2.2: mean 2.1, sd 0.1, t(0.975, 2 df)
    assert rows[0] == ["0.5", "3/3", "2.0000", "0.1000", f"2.1000 ± {half:.4f}", f"6/30 [{100 * lo:.0f}–{100 * hi:.0f}%]",
                       "1/3", "5.0"]
    assert rows[1][1] == "2/3" and rows[1][4] == f"2.0500 ± {12.7062 * 0.1 / 2 ** 0.5 / 2 ** 0.5:.4f}"
    assert rows[1][5].startswith("8/20") and rows[1][6] == "2/2" and rows[1][7] == "10.0"
    assert seed_rows([("objective.kd_weight", [0.5])], results[:1]) is None
    # runs with probes get a coherence column: the last round's, and its mean over the seeds
    probed = [{**r, "coherence": 0.5 + 0.1 * r["values"]["optim.seed"], "coherence_min": 0.25, "interval": [0.1, 0.5],
               "regressed": []} for r in results]
    header, rows = seed_rows(vary, probed)
    assert header[5] == "coherence (mean of last)" and rows[0][5] == "0.600" and rows[1][5] == "0.550"
    header, rows = table_rows(vary, probed)
    assert header[6] == "coherence (last / min)" and rows[2][6] == "0.700 / 0.250" and rows[-1][6] == "—"


def test_a_seed_varies_the_data_order_and_identical_seeds_are_named(tmp_path):
    """A full fine-tune without dropout: optim.seed alone changes nothing (identical weights, said so); the seed
    as the ladder sets it (data.shuffle_seed too) gives other weights."""
    from safetensors.torch import load_file

    from kdkit.config.load import load_train_config
    from kdkit.decide.ladder import seed_settings
    from kdkit.decide.tables import identical_seeds
    from kdkit.train import train

    student = save_model_dir(tmp_path / "student", seed=2, hidden=16)
    cfg = write_config(tmp_path, {"student": {"path": str(student)},
                                  "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", toy_rows(12))),
                                           "max_length": 64, "shuffle_seed": 3},
                                  "objective": {"kd_weight": 0.0},
                                  "optim": {"lr": 5e-3, "micro_batch": 2, "max_steps": 3, "schedule": "constant"},
                                  "checkpoint": {"every": 0}})
    base = load_train_config(cfg)
    assert seed_settings(base, {"optim.seed": 2}) == {"data.shuffle_seed": 5}
    assert seed_settings(base, {"optim.seed": 2, "data.shuffle_seed": 0}) == {}  # the ladder varies it itself
    assert seed_settings(base, {"optim.lr": 1e-3}) == {}
    weights = {}
    for name, seed, seeded in (("plain0", 0, False), ("plain1", 1, False), ("seeded0", 0, True), ("seeded1", 1, True)):
        over = {"optim.seed": seed, **(seed_settings(base, {"optim.seed": seed}) if seeded else {})}
        train(load_train_config(cfg, [f"{k}={v}" for k, v in over.items()]), tmp_path / name, progress=False,
              log=lambda m: None)
        weights[name] = load_file(str(tmp_path / name / "final" / "model.safetensors"))
    same = all(torch.equal(weights["plain0"][k], weights["plain1"][k]) for k in weights["plain0"])
    assert same  # the premise: the seed alone does not reach a full fine-tune without dropout
    assert not all(torch.equal(weights["seeded0"][k], weights["seeded1"][k]) for k in weights["seeded0"])
    vary = [("optim.seed", [0, 1])]
    results = [{"status": "done", "values": {"optim.seed": s}, "weights_sha256": sha} for s, sha in ((0, "a"), (1, "a"))]
    (note,) = identical_seeds(vary, results)
    assert note.startswith("the config: seeds 0, 1 trained identical weights")
    assert identical_seeds(vary, [{**results[0]}, {**results[1], "weights_sha256": "b"}]) == []


@needs_bwrap
def test_a_ladder_with_set_two_suites_and_seeds(ladder_world, tmp_path):
    """--set for every rung, a second suite and a barrier: the tables show the barrier's divergence (under its
    aggregate, averaged over the logged steps), on how many steps it acted, and the second suite's pass
    counts, per rung and pooled."""
    root = ladder_world
    write_jsonl(root / "tasks2.jsonl", TASKS[:2])
    cfg = yaml.safe_load((root / "cfg.yaml").read_text())
    cfg.update(reference={"kind": "base"},
               objective={"barrier": {"kind": "kl_rev", "aggregate": "rmse", "tau": 0.0, "weight": 0.5}})
    (root / "cfg_barrier.yaml").write_text(yaml.safe_dump(cfg))
    reg = Registry(tmp_path / "ws")
    reg.promote(reg.register(root / "student", name="base").id)
    logs: list[str] = []
    res = run_ladder(root / "cfg_barrier.yaml", ["optim.seed=0,1"], [root / "tasks.jsonl", root / "tasks2.jsonl"],
                     tmp_path / "lad", registry=reg, settings=GenerationSettings(max_new_tokens=8),
                     limits=Limits(timeout_s=5), log=logs.append, overrides=["optim.lr=0.02"])
    assert [r["status"] for r in res] == ["done", "done"], res
    for r in res:
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == 0.02 and cfg["data"]["shuffle_seed"] == r["values"]["optim.seed"]
        assert r["seeded"] == {"data.shuffle_seed": r["values"]["optim.seed"]}
    assert res[0]["weights_sha256"] != res[1]["weights_sha256"]  # LoRA's init and the order differ
    assert not any("identical weights" in m for m in logs)
    assert len(reg.gates()) == 2
    assert len(reg.evaluations()) == 6  # both suites: the base once each (reused), each rung's pack on both
    seeds_md = (tmp_path / "lad" / "ladder_seeds.md").read_text()
    assert "A seed s sets optim.seed = s" in seeds_md
    md = (tmp_path / "lad" / "ladder.md").read_text().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header[4] == "avg barrier div" and header[-3] == "tasks2.jsonl pass"
    for r, line in zip(res, md[2:], strict=True):
        logged = [json.loads(x)["barrier_div_rmse"] for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
                  if "barrier_div_rmse" in x]
        assert logged and r["avg_barrier_div"] == pytest.approx(sum(logged) / len(logged), rel=1e-12)
        assert r["avg_barrier_div"] > 0  # LoRA's B starts at 0: the student leaves the base as it trains
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == f"{r['avg_barrier_div']:.4f}" and cells[-3] == f"{r['suites'][1]['candidate_passed']}/2"
        active = sum(d > 0.0 for d in logged)  # τ = 0: active wherever the divergence is above it
        assert r["barrier_active"] == [active, len(logged)] and cells[5] == f"{active}/{len(logged)}"
        i = r["rung"]
        (printed,) = [m for m in logs if m.startswith(f"rung {i + 1}/2 ") and "anchors" in m]  # as the rung ends
        assert printed == (f"rung {i + 1}/2 {r['values']}: {r['decision']} — anchors {r['passed']}/{r['n_tasks']} "
                           f"(baseline {r['baseline_passed']}), tasks2.jsonl {r['suites'][1]['candidate_passed']}/2 "
                           f"(baseline {r['suites'][1]['baseline_passed']}); barrier above τ on {active}/{len(logged)} "
                           f"steps")  # every step is logged here, and every step is counted
    assert header[5] == "barrier active"
    pooled = sum(r["suites"][1]["candidate_passed"] for r in res)
    assert f"| {pooled}/4 |" in seeds_md and "tasks2.jsonl pass (pooled)" in seeds_md


def test_an_inert_barrier_is_said_to_be_inert():
    """A barrier whose divergence never rose above τ did nothing: the tables and the rung's line say so."""
    from kdkit.decide.ladder import rung_line
    from kdkit.decide.tables import active_cell

    rec = {"values": {"objective.barrier.tau": 5.0}, "decision": "REVERT", "passed": 3, "n_tasks": 10,
           "baseline_passed": 4, "suites": [{}], "barrier_active": [0, 12]}
    assert active_cell([rec]) == "0/12 (inert)" and active_cell([rec, {**rec, "barrier_active": [3, 12]}]) == "3/24"
    assert active_cell([{"values": {}}]) == "—"
    assert rung_line(0, 3, rec) == ("rung 1/3 {'objective.barrier.tau': 5.0}: REVERT — anchors 3/10 (baseline 4); "
                                    "barrier above τ on 0/12 logged steps (it never acted)")  # a run from before
    assert rung_line(0, 3, {**rec, "barrier_counted": "steps"}).endswith("barrier above τ on 0/12 steps (it never acted)")


def test_the_configs_eval_server_is_the_default_server_and_a_flag_wins(ladder_world, tmp_path):
    """eval.server in a ladder's config (or a LoRA run's config.yaml, for `kdkit gate`) names the server that
    writes the answers; --server wins and says so; a rung cannot vary it; a bad section names its file."""
    from kdkit.config.load import ConfigError, load_train_config
    from kdkit.decide.gate import run_server
    from kdkit.decide.ladder import configured_server
    from kdkit.evaluate.served import ServerSpec

    cfg = yaml.safe_load((ladder_world / "cfg.yaml").read_text())
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**cfg, "eval": {"server": "http://h:1", "served_model": "m"}}))
    shutil.copytree(ladder_world, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("cfg.yaml"))
    loaded, logs = load_train_config(path), []
    assert configured_server(loaded, None, "cfg.yaml", logs.append) == ServerSpec("http://h:1", "m")
    assert logs == ["answers from http://h:1 (cfg.yaml: eval.server)"]
    assert configured_server(loaded, ServerSpec("http://g:2"), "cfg.yaml", logs.append) == ServerSpec("http://g:2")
    assert logs[-1] == "--server http://g:2 is used; cfg.yaml's eval.server (http://h:1) is not"
    assert configured_server(load_train_config(ladder_world / "cfg.yaml"), None, "x", logs.append) is None
    with pytest.raises(ConfigError, match=r"cfg.yaml:6: field 'eval': .*eval.server is not set: served_model names"):
        path.write_text(yaml.safe_dump({**cfg, "eval": {"served_model": "m"}}))
        load_train_config(path)
    with pytest.raises(ValueError, match="every rung of a ladder is evaluated alike"):
        run_ladder(ladder_world / "cfg.yaml", ["eval.server=http://a:1,http://b:2"], ladder_world / "tasks.jsonl",
                   tmp_path / "lad", registry=Registry(tmp_path / "ws"))
    with pytest.raises(ValueError, match="--served-lora merged: there is no server"):
        run_ladder(ladder_world / "cfg.yaml", ["optim.lr=0.01"], ladder_world / "tasks.jsonl", tmp_path / "lad2",
                   registry=Registry(tmp_path / "ws"), served_lora="merged")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "kdkit.json").write_text(json.dumps({"kind": "lora"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"server": "http://h:1"}}))
    assert run_server(str(run)) == ServerSpec("http://h:1") and run_server(str(ladder_world)) is None
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"server": "http://h:1", "port": 3}}))
    with pytest.raises(ConfigError, match=r"run/config.yaml: eval: Extra inputs are not permitted"):
        run_server(str(run))


@needs_bwrap
def test_a_rung_as_a_draft_for_its_teacher(ladder_world, tmp_path):
    """--draft: each rung's expected acceptance as a draft for the teacher its cache was made from, on the first
    training prompts — the figure `kdkit draft measure` gives for the same models and prompts — in the table."""
    from kdkit.decide.draft import expected
    from kdkit.models.load import load_causal_lm, load_tokenizer
    from kdkit.teacher.seqkd import prompt_tokens, read_prompts

    root = ladder_world
    reg = Registry(tmp_path / "ws")
    reg.promote(reg.register(root / "student", name="base").id)
    logs: list[str] = []
    res = run_ladder(root / "cfg.yaml", ["optim.lr=0.01"], root / "tasks.jsonl", tmp_path / "lad", registry=reg,
                     settings=GenerationSettings(max_new_tokens=12), limits=Limits(timeout_s=5), log=logs.append,
                     drift=False, draft=True)
    d = res[0]["draft"]
    tok = load_tokenizer(root / "teacher")
    prompts = [prompt_tokens(tok, o, root / "train.jsonl", n) for n, o in read_prompts(root / "train.jsonl")[:16]]
    want = expected(load_causal_lm(root / "teacher").eval(), load_causal_lm(tmp_path / "lad" / "rung-00" / "pack").eval(),
                    tok, prompts, 32, gamma=4, cost_ratio=1.0)
    assert d["teacher"] == str(root / "teacher") and d["rows"] == want.rows == 8
    assert d["alpha_sample"] == pytest.approx(want.alpha_sample, abs=1e-6) and 0 < d["alpha_sample"] < 1
    assert d["alpha_greedy"] == pytest.approx(want.alpha_greedy, abs=1e-6)
    table = (tmp_path / "lad" / "ladder.md").read_text()
    assert "as a draft (1−TVD / top-1)" in table and f"{d['alpha_sample']:.3f} / {d['alpha_greedy']:.3f}" in table
    assert any(f"as a draft for the teacher: acceptance {d['alpha_sample']:.3f}" in m for m in logs)
