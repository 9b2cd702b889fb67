"""Registry, gate and ladder: decisions, atomicity under kill -9, the paired test, the table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import binomtest
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.decide import gate as gate_mod
from kdkit.decide.gate import GateRule, decide, format_tasks, gate, mcnemar_exact
from kdkit.decide.registry import FAULT_ENV, Registry, RegistryError
from kdkit.decide.stats import paired_drop_bounds
from kdkit.evaluate.passrate import EvalSummary, TaskResult, wilson_interval
from tests.helpers import save_model_dir, write_jsonl

# 8 tasks: a baseline that passes >= 6 of them lets the exact test show a drop (the gate's power rule)
ANCHORS = [f"MBPP/{i}" for i in (11, 12, 20, 53, 93)] + [f"HE/{i}" for i in (2, 27, 34)]


@pytest.mark.parametrize("b, c", [(0, 0), (1, 0), (3, 1), (5, 5), (10, 2), (0, 7), (13, 4)])
def test_mcnemar_exact_matches_scipy_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_format_tasks_like_the_seeds():
    ids = ["HE/85", "MBPP/53", "HE/27", "MBPP/20", "HE/45"]
    assert format_tasks(ids) == "HE/27, /45, /85, MBPP/20, /53"
    assert format_tasks(["MBPP/53", "HE/34"]) == "HE/34, MBPP/53"
    assert format_tasks([]) == "—"


def test_decide_rules():
    base = dict.fromkeys(ANCHORS, True) | {"HE/34": False}
    lose_one = base | {"MBPP/53": False, "HE/34": True}
    d, reg, fix, p, reason = decide(base, lose_one, GateRule())
    assert d == "REVERT" and reg == ["MBPP/53"] and fix == ["HE/34"] and p == 1.0
    assert "allowed: 0" in reason
    assert decide(base, lose_one, GateRule(max_regressions=1))[0] == "KEEP"
    better = base | {"HE/34": True}
    assert decide(base, better, GateRule())[0] == "KEEP"
    assert decide(base, dict(base), GateRule())[0] == "KEEP"
    with pytest.raises(ValueError, match="different task sets"):
        decide(base, {"x": True}, GateRule())
    assert GateRule.parse("max_regressions=2,require_not_worse=false") == GateRule(2, False)
    with pytest.raises(ValueError, match="unknown key"):
        GateRule.parse("tau=1")


def test_the_noise_rule_reverts_only_a_fall_beyond_noise():
    """drop_alpha: flips both ways are allowed; a fall is a REVERT only where the exact paired test calls it
    beyond noise (6 regressions, 0 fixed: p = 2·0.5⁶ = 0.03125 < 0.05; 5 of them: p = 0.0625, kept)."""
    tasks = [f"T/{i}" for i in range(40)]
    base = {t: i < 20 for i, t in enumerate(tasks)}
    noise = GateRule.parse("drop_alpha=0.05")
    assert noise == GateRule(max_regressions=None, require_not_worse=False, drop_alpha=0.05)
    for lost, decision in ((5, "KEEP"), (6, "REVERT")):
        cand = base | {f"T/{i}": False for i in range(lost)}
        d, reg, fix, p, reason = decide(base, cand, noise)
        assert (d, len(reg), fix) == (decision, lost, []) and p == pytest.approx(2 * 0.5 ** lost)
        assert reason.startswith("pass count fell 20 → 14, beyond noise" if lost == 6 else "no fall beyond noise")
        assert decide(base, cand, GateRule())[0] == "REVERT"  # the seeds' rule reverts any regression
    swap = base | {"T/0": False, "T/1": False, "T/30": True}  # two lost, one gained: a fall, but noise
    d, _, _, p, reason = decide(base, swap, noise)
    assert d == "KEEP" and p == 1.0 and reason.startswith("no fall beyond noise (p < 0.05): 2 regressed, 1 fixed")
    with pytest.raises(ValueError, match="drop_alpha .* replaces max_regressions"):
        GateRule.parse("drop_alpha=0.05,max_regressions=1")
    with pytest.raises(ValueError, match="drop_alpha='2': expected a p-value"):
        GateRule.parse("drop_alpha=2")


def test_the_margin_rule_keeps_only_a_fall_shown_within_the_margin():
    """max_drop: exact one-sided 95% bounds on the fall of the pass rate from the discordant tasks (Clopper-Pearson
    on the share of them that regressed, checked against scipy's beta quantiles); KEEP when the upper bound is
    within the margin, REVERT when the lower one is beyond it, else UNDECIDED — the 9 → 4 of 164 fall that the
    noise rule keeps (p = 0.125) is not a KEEP here."""
    from scipy.stats import beta

    for k, n in ((6, 7), (2, 7), (0, 5), (5, 5), (13, 40)):
        lo, hi = paired_drop_bounds(k, n - k, 164, 0.05)
        ref_lo = 0.0 if k == 0 else beta.ppf(0.05, k, n - k + 1)
        ref_hi = 1.0 if k == n else beta.ppf(0.95, k + 1, n - k)
        assert lo == pytest.approx(n * (2 * ref_lo - 1) / 164, abs=1e-12)
        assert hi == pytest.approx(n * (2 * ref_hi - 1) / 164, abs=1e-12)
    tasks = [f"HumanEval/{i}" for i in range(164)]
    base = {t: i < 9 for i, t in enumerate(tasks)}
    margin = GateRule.parse("max_drop=0.03")
    assert margin == GateRule(max_regressions=None, require_not_worse=False, max_drop=0.03)
    fell = base | {f"HumanEval/{i}": False for i in range(6)} | {"HumanEval/100": True}
    d, reg, fix, p, reason = decide(base, fell, margin)
    assert (d, len(reg), len(fix), p) == ("UNDECIDED", 6, 1, 0.125)
    assert decide(base, fell, GateRule.parse("drop_alpha=0.05"))[0] == "KEEP"
    assert reason.startswith("the suite cannot show that the pass rate fell by at most 3.0% (it may have fallen by "
                             "4.2%): pass count 9 → 4 of 164 (6 regressed, 1 fixed)")
    rose = base | {"HumanEval/0": False, "HumanEval/1": False} | {f"HumanEval/{i}": True for i in range(100, 105)}
    d, _, _, _, reason = decide(base, rose, margin)
    assert d == "KEEP" and reason.startswith("the pass rate fell by at most 1.4%, within the margin of 3.0%")
    big = {t: i < 60 for i, t in enumerate(tasks)}
    d, _, _, _, reason = decide(big, big | {f"HumanEval/{i}": False for i in range(20)}, margin)
    assert d == "REVERT" and reason.startswith("the pass rate fell by more than the margin of 3.0%")
    with pytest.raises(ValueError, match=r"max_drop \(a fall within a margin\) replaces max_regressions"):
        GateRule.parse("max_drop=0.03,max_regressions=1")
    with pytest.raises(ValueError, match="is one of drop_alpha and max_drop"):
        GateRule.parse("max_drop=0.03,drop_alpha=0.05")
    with pytest.raises(ValueError, match="max_drop='3': expected a fraction of the tasks"):
        GateRule.parse("max_drop=3")


@pytest.fixture
def packs(tmp_path):
    """Three distinct tiny model dirs and a 5-task anchor file."""
    dirs = {n: save_model_dir(tmp_path / n, seed=s) for n, s in (("prod", 1), ("good", 2), ("bad", 3))}
    tasks = write_jsonl(tmp_path / "anchors.jsonl", [
        {"task_id": t, "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    pass\n"} for t in ANCHORS])
    return dirs, tasks


def _fake_eval(outcomes_by_dirname: dict[str, dict[str, bool]], calls: list[str]):
    """Stands in for generation + sandbox: outcomes keyed by the ORIGINAL dir name recorded in config.json."""

    def fake(model_dir, tasks_path, **kw):
        name = json.loads((Path(model_dir) / "kdkit_test_name.json").read_text())
        calls.append(name)
        res = [TaskResult(t, ok, "passed" if ok else "failed", "", 0.0, completion=f"<{name}> {t}")
               for t, ok in outcomes_by_dirname[name].items()]
        k = sum(r.passed for r in res)
        return res, EvalSummary(len(res), k, k / len(res), wilson_interval(k, len(res)), {}, {}), []

    return fake


def _tag(dirs):
    for n, d in dirs.items():
        (d / "kdkit_test_name.json").write_text(json.dumps(n))


def test_gate_reverts_a_regression_and_keeps_an_improvement(packs, tmp_path, monkeypatch):
    dirs, tasks = packs
    _tag(dirs)
    base = dict.fromkeys(ANCHORS, True) | {"HE/34": False}
    outcomes = {"prod": base, "bad": base | {"MBPP/53": False}, "good": base | {"HE/34": True}}
    calls: list[str] = []
    monkeypatch.setattr(gate_mod, "evaluate_model", _fake_eval(outcomes, calls))
    reg = Registry(tmp_path / "ws")
    prod = reg.register(dirs["prod"], name="prod")
    reg.promote(prod.id)

    bad = gate(reg, str(dirs["bad"]), tasks, log=lambda m: None)
    assert bad.decision == "REVERT" and bad.regressed == ["MBPP/53"]
    # the gate keeps what both models wrote for each regressed task
    assert bad.suites[0]["regressed_completions"] == {"MBPP/53": {"prompt": "def f():\n", "candidate": "<bad> MBPP/53",
                                                                  "baseline": "<prod> MBPP/53"}}
    assert reg.production().name == "prod"
    assert reg.pack(bad.candidate).status == "archived"

    good = gate(reg, str(dirs["good"]), tasks, log=lambda m: None)
    assert good.decision == "KEEP" and good.fixed == ["HE/34"]
    assert reg.production().name == good.candidate
    # the production evaluation was stored once and reused for the second gate
    assert calls == ["prod", "bad", "good"]
    assert [g["decision"] for g in reg.gates()] == ["REVERT", "KEEP"]

    back = reg.rollback()
    assert back.name == "prod" and reg.production().name == "prod"
    with pytest.raises(RegistryError, match="is production"):
        reg.archive("prod")


def test_a_first_gate_against_a_model_directory_starts_the_workspace(packs, tmp_path, monkeypatch):
    """README's first job gates a trained student against the student before training, in a fresh checkout: the
    baseline directory needs no production, so the gate starts the workspace; against 'production' it does not."""
    dirs, tasks = packs
    _tag(dirs)
    base = dict.fromkeys(ANCHORS, True)
    monkeypatch.setattr(gate_mod, "evaluate_model", _fake_eval({"prod": base, "good": dict(base)}, []))
    ws = tmp_path / "fresh-ws"
    r = CliRunner()
    res = r.invoke(app, ["gate", str(dirs["good"]), "--tasks", str(tasks), "--workspace", str(ws)], terminal_width=200)
    assert res.exit_code == 2 and "no kdkit workspace here" in res.output and not ws.exists()
    res = r.invoke(app, ["gate", str(dirs["good"]), "--against", str(dirs["prod"]), "--tasks", str(tasks),
                         "--workspace", str(ws)], terminal_width=200)
    assert res.exit_code == 0 and "KEEP" in res.output, res.output
    reg = Registry(ws)
    assert [g["decision"] for g in reg.gates()] == ["KEEP"] and reg.production() is not None


def test_gate_cli_exit_codes(packs, tmp_path, monkeypatch):
    dirs, tasks = packs
    _tag(dirs)
    base = dict.fromkeys(ANCHORS, True)
    outcomes = {"prod": base, "bad": base | {"MBPP/53": False, "HE/27": False}, "good": dict(base)}
    monkeypatch.setattr(gate_mod, "evaluate_model", _fake_eval(outcomes, []))
    ws = str(tmp_path / "ws")
    r = CliRunner()
    assert r.invoke(app, ["registry", "promote", str(dirs["prod"]), "--workspace", ws]).exit_code == 0
    res = r.invoke(app, ["gate", str(dirs["bad"]), "--tasks", str(tasks), "--workspace", ws], terminal_width=200)
    assert res.exit_code == 1 and "REVERT" in res.output and "HE/27, MBPP/53" in res.output
    res = r.invoke(app, ["gate", str(dirs["good"]), "--tasks", str(tasks), "--workspace", ws], terminal_width=200)
    assert res.exit_code == 0 and "KEEP" in res.output
    listing = r.invoke(app, ["registry", "list", "--workspace", ws], terminal_width=250)
    assert "archived" in listing.output and "★" in listing.output
    show = r.invoke(app, ["registry", "show", "--workspace", ws], terminal_width=250)
    assert show.exit_code == 0 and "production history" in show.output


def test_a_gate_that_cannot_see_a_drop_does_not_promote(packs, tmp_path, monkeypatch):
    # The new user's case: production passes none of the anchors, the candidate is garbage that passes none
    # either. "No disallowed regression" is vacuous there: UNDECIDED, exit 3, nothing promoted or archived.
    dirs, tasks = packs
    _tag(dirs)
    none = dict.fromkeys(ANCHORS, False)
    five = none | dict.fromkeys(ANCHORS[:5], True)  # passes 5 < 6: the exact test still cannot see a drop
    outcomes = {"prod": none, "bad": dict(none), "good": five}
    monkeypatch.setattr(gate_mod, "evaluate_model", _fake_eval(outcomes, []))
    ws = str(tmp_path / "ws")
    r = CliRunner()
    assert r.invoke(app, ["registry", "promote", str(dirs["prod"]), "--workspace", ws]).exit_code == 0
    res = r.invoke(app, ["gate", str(dirs["bad"]), "--tasks", str(tasks), "--workspace", ws], terminal_width=250)
    assert res.exit_code == 3, res.output
    assert "UNDECIDED: anchors.jsonl cannot show a drop at p < 0.05: the baseline passes 0 of 8 tasks" in res.output
    assert "needs >= 6" in res.output and "KEEP" not in res.output.replace("the rule alone", "")
    reg = Registry(tmp_path / "ws")
    assert reg.production().name == "prod" and reg.pack("bad").status != "archived"
    assert [g["decision"] for g in reg.gates()] == ["UNDECIDED"]

    # a baseline that passes 5 of 8: still blind, and the reason says how many tasks it would take
    reg.promote(reg.register(dirs["good"], name="good").id)
    res = gate(reg, str(dirs["bad"]), tasks, log=lambda m: None)
    assert res.decision == "REVERT"  # five regressions: a REVERT needs no power to stand
    reg.promote("prod")
    kept = gate(reg, str(dirs["good"]), tasks, log=lambda m: None)
    assert kept.decision == "UNDECIDED" and reg.production().name == "prod"

    # an explicit opt-in promotes it, and the registry says it was asked for
    res = r.invoke(app, ["gate", str(dirs["bad"]), "--tasks", str(tasks), "--workspace", ws, "--promote-undecided",
                         "--against", "prod"], terminal_width=250)
    assert res.exit_code == 0 and "UNDECIDED, promoted as asked (--promote-undecided)" in res.output, res.output
    reg = Registry(tmp_path / "ws")
    last = reg.gates()[-1]
    assert last["decision"] == "KEEP" and json.loads(last["rule"])["promote_undecided"] is True
    assert reg.production().name == "bad"
    assert reg.production_history()[-1]["reason"].endswith("UNDECIDED, promoted as asked")


def test_one_blind_suite_leaves_the_whole_decision_undecided(packs, tmp_path, monkeypatch):
    dirs, tasks = packs
    _tag(dirs)
    weak = write_jsonl(tmp_path / "weak.jsonl", [
        {"task_id": f"W/{i}", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    pass\n"}
        for i in range(8)])
    base = dict.fromkeys(ANCHORS, True) | {f"W/{i}": i < 2 for i in range(8)}

    def fake(model_dir, tasks_path, **kw):
        from kdkit.evaluate.tasks import load_tasks
        ids = [t.task_id for t in load_tasks(tasks_path)]
        res = [TaskResult(t, base[t], "passed" if base[t] else "failed", "", 0.0) for t in ids]
        k = sum(x.passed for x in res)
        return res, EvalSummary(len(res), k, k / len(res), wilson_interval(k, len(res)), {}, {}), []

    monkeypatch.setattr(gate_mod, "evaluate_model", fake)
    reg = Registry(tmp_path / "ws")
    reg.promote(reg.register(dirs["prod"], name="prod").id)
    res = gate(reg, str(dirs["good"]), [tasks, weak], log=lambda m: None)
    assert [s["decision"] for s in res.suites] == ["KEEP", "UNDECIDED"] and res.decision == "UNDECIDED"
    assert "weak.jsonl: UNDECIDED — weak.jsonl cannot show a drop" in res.reason
    assert "about 24 tasks" in res.reason  # 6 passes needed at the baseline's rate of 2/8
    assert reg.production().name == "prod"


_PROMOTE = """
import sys
from kdkit.decide.registry import Registry
reg = Registry(sys.argv[1])
reg.promote(sys.argv[2])
"""

_GATE = """
import sys
from kdkit.decide.registry import Registry
reg = Registry(sys.argv[1])
cand, base = reg.pack(sys.argv[2]), reg.pack(sys.argv[3])
reg.record_gate(cand.id, base.id, {}, sys.argv[4], ["T/1"], [], 1.0, "test", expected_production=base.id)
"""


def _workspace_a_in_production(packs, tmp_path) -> Path:
    """A workspace with packs 'a' (production) and 'b' (active), closed for a subprocess to open."""
    dirs, _ = packs
    ws = tmp_path / "ws"
    reg = Registry(ws)
    reg.promote(reg.register(dirs["prod"], name="a").id)
    reg.register(dirs["good"], name="b")
    reg.close()
    return ws


@pytest.mark.parametrize("point", ["promote:between", "promote:before_commit"])
def test_kill_during_promote_leaves_the_old_production(packs, tmp_path, point):
    ws = _workspace_a_in_production(packs, tmp_path)
    proc = subprocess.run([sys.executable, "-c", _PROMOTE, str(ws), "b"], env={**os.environ, FAULT_ENV: point},
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    reg = Registry(ws)
    assert reg.production().name == "a" and len(reg.production_history()) == 1
    proc = subprocess.run([sys.executable, "-c", _PROMOTE, str(ws), "b"], capture_output=True, text=True)
    assert proc.returncode == 0
    reg2 = Registry(ws)
    assert reg2.production().name == "b"


@pytest.mark.parametrize("decision", ["KEEP", "REVERT"])
@pytest.mark.parametrize("point", ["gate:after_insert", "gate:before_commit"])
def test_kill_during_gate_record_is_all_or_nothing(packs, tmp_path, decision, point):
    ws = _workspace_a_in_production(packs, tmp_path)
    proc = subprocess.run([sys.executable, "-c", _GATE, str(ws), "b", "a", decision],
                          env={**os.environ, FAULT_ENV: point}, capture_output=True, text=True)
    assert proc.returncode == -9
    reg = Registry(ws)
    assert reg.gates() == [] and reg.production().name == "a" and reg.pack("b").status == "active"


def test_register_is_idempotent_and_survives_source_deletion(packs, tmp_path):
    import shutil

    dirs, _ = packs
    reg = Registry(tmp_path / "ws")
    p1 = reg.register(dirs["prod"])
    assert reg.register(dirs["prod"]).id == p1.id
    shutil.rmtree(dirs["prod"])
    assert (Path(reg.pack(p1.id).path) / "model.safetensors").is_file()
    with pytest.raises(RegistryError, match="not a Hugging Face model directory"):
        reg.register(tmp_path)
    with pytest.raises(RegistryError, match="no pack 'nope'"):
        reg.pack("nope")


def test_two_gates_at_once_apply_only_a_decision_about_the_current_production(packs, tmp_path, monkeypatch):
    """Gate A compares 'good' with production 'prod'; while A evaluates, gate B (another process's view of
    the same workspace) keeps 'bad2'. A's KEEP is about a production that is gone: it must not be applied."""
    dirs, tasks = packs
    dirs["bad2"] = save_model_dir(tmp_path / "bad2", seed=4)
    _tag(dirs)
    base = dict.fromkeys(ANCHORS, True) | {"HE/34": False}
    outcomes = {"prod": base, "good": base | {"HE/34": True}, "bad2": dict(base), "bad": base}
    calls: list[str] = []
    fake = _fake_eval(outcomes, calls)
    ws = tmp_path / "ws"
    reg_a = Registry(ws)
    reg_a.promote(reg_a.register(dirs["prod"], name="prod").id)

    def racing_eval(model_dir, tasks_path, **kw):
        if json.loads((Path(model_dir) / "kdkit_test_name.json").read_text()) == "good":
            reg_b = Registry(ws)
            assert gate(reg_b, str(dirs["bad2"]), tasks, log=lambda m: None).decision == "KEEP"
            reg_b.close()
        return fake(model_dir, tasks_path, **kw)

    monkeypatch.setattr(gate_mod, "evaluate_model", racing_eval)
    with pytest.raises(RegistryError, match="production changed from 'prod' to 'bad2'"):
        gate(reg_a, str(dirs["good"]), tasks, log=lambda m: None)
    assert reg_a.production().name == "bad2"
    assert [g["decision"] for g in reg_a.gates()] == ["KEEP"]  # only B's decision was recorded
    # gated again, A's candidate is compared with the new production
    again = gate(reg_a, "good", tasks, log=lambda m: None)
    assert again.baseline == "bad2" and again.decision == "KEEP"


def test_writes_to_the_source_directory_cannot_reach_a_registered_pack(packs, tmp_path, monkeypatch):
    dirs, tasks = packs
    _tag(dirs)
    base = dict.fromkeys(ANCHORS, True)
    monkeypatch.setattr(gate_mod, "evaluate_model", _fake_eval({"prod": base, "good": base, "bad": base}, []))
    reg = Registry(tmp_path / "ws")
    prod = reg.register(dirs["prod"], name="prod")
    reg.promote(prod.id)
    stored = Path(prod.path) / "model.safetensors"
    before = stored.read_bytes()
    # `cp other/model.safetensors prod/model.safetensors` writes in place (same inode)
    with (dirs["prod"] / "model.safetensors").open("r+b") as fh:
        fh.write((dirs["good"] / "model.safetensors").read_bytes())
    assert stored.read_bytes() == before
    assert not os.access(stored, os.W_OK) or os.geteuid() == 0
    assert stored.stat().st_mode & 0o222 == 0
    assert reg.check_weights(prod) == prod


def test_a_pack_changed_on_disk_is_neither_reused_nor_promoted(packs, tmp_path, monkeypatch):
    dirs, tasks = packs
    _tag(dirs)
    base = dict.fromkeys(ANCHORS, True)
    calls: list[str] = []
    monkeypatch.setattr(gate_mod, "evaluate_model", _fake_eval({"prod": base, "good": base, "bad": base}, calls))
    ws = tmp_path / "ws"
    reg = Registry(ws)
    prod = reg.register(dirs["prod"], name="prod")
    reg.promote(prod.id)
    good = reg.register(dirs["good"], name="good")
    stored = Path(prod.path) / "model.safetensors"
    stored.chmod(0o644)
    with stored.open("r+b") as fh:  # tamper with the stored copy itself
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x01\x02\x03")
    fresh = Registry(ws)  # a new process: nothing verified yet
    with pytest.raises(RegistryError, match="no longer matches its registered files"):
        gate(fresh, "good", tasks, log=lambda m: None)
    with pytest.raises(RegistryError, match="no longer matches its registered files"):
        fresh.promote(prod.id)
    assert calls == [] and fresh.gates() == [] and fresh.production().name == "prod"
    assert fresh.pack(good.id).status == "active"


def test_a_pack_is_its_tokenizer_chat_template_and_generation_config_too(packs, tmp_path):
    dirs, _ = packs
    reg = Registry(tmp_path / "ws")
    prod = reg.register(dirs["prod"], name="prod")
    other = tmp_path / "other-template"
    shutil.copytree(dirs["prod"], other)
    (other / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    twin = reg.register(other, name="prod-new-template")  # same weights, another template: another pack
    assert twin.id != prod.id and twin.name == "prod-new-template"
    assert reg.register(dirs["prod"], name="again").id == prod.id  # the very same files: the same pack
    stored = Path(prod.path) / "chat_template.jinja"
    stored.chmod(0o644)
    stored.write_text("{{ messages[0]['content'] }}")  # a stored pack's template edited behind kdkit's back
    with pytest.raises(RegistryError, match="no longer matches its registered files"):
        Registry(tmp_path / "ws").check_weights(prod)


def test_a_pack_registered_by_weights_alone_is_upgraded_to_its_full_identity_once(packs, tmp_path):
    from kdkit.models.load import model_fingerprint

    dirs, _ = packs
    reg = Registry(tmp_path / "ws")
    prod = reg.register(dirs["prod"], name="prod")
    with reg.tx() as c:  # as an older kdkit recorded it
        c.execute("UPDATE packs SET weights_sha256 = ? WHERE id = ?", (model_fingerprint(prod.path)["sha256"], prod.id))
    fresh = Registry(tmp_path / "ws")
    assert fresh.check_weights(fresh.pack(prod.id)).weights_sha256 == reg.register(dirs["prod"]).weights_sha256
    stored = Path(prod.path) / "chat_template.jinja"
    stored.chmod(0o644)
    stored.write_text("{{ messages[0]['content'] }}")
    with pytest.raises(RegistryError, match="no longer matches its registered files"):
        Registry(tmp_path / "ws").check_weights(prod)


def test_a_copy_a_killed_promote_left_is_removed_by_the_next_registry_command(packs, tmp_path):
    dirs, _ = packs
    ws = tmp_path / "ws"
    Registry(ws)
    code = ("import os, sys\nfrom kdkit.decide import registry\n"
            "def die(src, dst):\n    registry.shutil.copytree(src, dst, copy_function=registry.shutil.copyfile)\n"
            "    os._exit(9)\n"
            "registry._copy_read_only = die\nregistry.Registry(sys.argv[1]).register(sys.argv[2])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ws), str(dirs["good"])], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    left = list((ws / "packs").glob(".tmp-*"))
    assert len(left) == 1 and any(left[0].iterdir())
    Registry(ws)  # the next command, whatever it is
    assert list((ws / "packs").glob(".tmp-*")) == []


def test_registry_commands_do_not_create_a_workspace_for_a_typo(tmp_path):
    r = CliRunner()
    for args in (["registry", "list"], ["registry", "show"], ["registry", "rollback"], ["registry", "archive", "x"]):
        res = r.invoke(app, [*args, "--workspace", str(tmp_path / "TYPO")])
        assert res.exit_code == 2 and "no kdkit workspace" in res.output, res.output
        assert not (tmp_path / "TYPO").exists()


def test_a_gate_over_several_suites_reverts_on_a_regression_in_any_suite(packs, tmp_path, monkeypatch):
    dirs, anchors = packs
    dirs["worse"] = save_model_dir(tmp_path / "worse", seed=4)
    _tag(dirs)
    mbpp_ids = [f"MBPP/{i}" for i in range(1, 21)]
    mbpp = write_jsonl(tmp_path / "mbpp.jsonl", [
        {"task_id": t, "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    pass\n"} for t in mbpp_ids])
    a = dict.fromkeys(ANCHORS, True)
    m = dict.fromkeys(mbpp_ids, True) | {"MBPP/20": False}
    outcomes = {  # keyed by model; each model's outcomes on both suites
        "prod": a | m,
        "good": a | m | {"MBPP/20": True, "MBPP/3": False},  # one swap on MBPP: noise
        "bad": a | m | {f"MBPP/{i}": False for i in range(1, 8)},  # seven MBPP tasks lost: beyond noise
        "worse": a | {"HE/27": False} | m,  # an anchor lost
    }

    def fake(model_dir, tasks_path, **kw):
        name = json.loads((Path(model_dir) / "kdkit_test_name.json").read_text())
        ids = ANCHORS if Path(tasks_path).name == "anchors.jsonl" else mbpp_ids
        res = [TaskResult(t, outcomes[name][t], "passed" if outcomes[name][t] else "failed", "", 0.0) for t in ids]
        k = sum(r.passed for r in res)
        return res, EvalSummary(len(res), k, k / len(res), wilson_interval(k, len(res)), {}, {}), []

    monkeypatch.setattr(gate_mod, "evaluate_model", fake)
    reg = Registry(tmp_path / "ws")
    reg.promote(reg.register(dirs["prod"], name="prod").id)
    both = [anchors, mbpp]
    bad = gate(reg, str(dirs["bad"]), both, log=lambda m: None)
    assert bad.decision == "REVERT" and [s["decision"] for s in bad.suites] == ["KEEP", "REVERT"]
    assert "mbpp.jsonl: REVERT — pass count fell 19 → 12, beyond noise" in bad.reason
    worse = gate(reg, str(dirs["worse"]), both, log=lambda m: None)
    assert worse.decision == "REVERT" and [s["decision"] for s in worse.suites] == ["REVERT", "KEEP"]
    # a margin makes the rule explicit: 7 lost tasks are within a margin of 7
    assert gate_mod.decide(outcomes["prod"] | {}, outcomes["bad"], gate_mod.SuiteRule(margin=7))[0] == "KEEP"
    good = gate(reg, str(dirs["good"]), both, log=lambda m: None)
    assert good.decision == "KEEP" and reg.production().name == good.candidate
    stored = json.loads(reg.gates()[-1]["rule"])
    assert [s["decision"] for s in stored["suites"]] == ["KEEP", "KEEP"] and len(reg.gates()) == 3
    r = CliRunner().invoke(app, ["gate", "prod", "--tasks", str(anchors), "--suite-rule", "margin=1",
                                 "--workspace", str(tmp_path / "ws")])
    assert r.exit_code == 2 and "--suite-rule only takes effect with a second --tasks file" in r.output


def test_the_gates_power_and_the_improvement_rule():
    from kdkit.decide.gate import GateRule, decide, fewest_significant, mcnemar_exact, power, power_line
    from kdkit.util.errors import KdkitError

    assert fewest_significant(0.05) == 6 and mcnemar_exact(6, 0) == 2 / 64 and mcnemar_exact(5, 0) == 2 / 32
    assert fewest_significant(0.01) == 8
    base = {f"HE/{i}": i < 5 for i in range(40)}  # the base passes 5 of 40 (the SmolLM2 case)
    pw = power(base, 0.05)
    assert pw == {"alpha": 0.05, "fewest_detectable": 6, "baseline_passes": 5, "baseline_fails": 35,
                  "can_show_drop": False, "can_show_gain": True}
    assert "a drop cannot be shown (the baseline passes 5 < 6 tasks)" in power_line(pw)
    assert "a gain needs >= 6 of its 35 failures fixed" in power_line(pw)
    rule = GateRule.parse("require_gain_p=0.05")
    assert rule.require_gain_p == 0.05
    two_more = {**base, "HE/10": True, "HE/11": True}
    decision, _, fixed, p, reason = decide(base, two_more, rule)
    assert decision == "REVERT" and len(fixed) == 2 and "no gain beyond noise: pass count 5 → 7" in reason
    six_more = {**base, **{f"HE/{i}": True for i in range(10, 16)}}
    decision, _, _, p, reason = decide(base, six_more, rule)
    assert decision == "KEEP" and p == 2 / 64, reason
    assert decide(base, two_more, GateRule())[0] == "KEEP"  # the default rule: no regression is enough
    with pytest.raises(KdkitError, match="require_gain_p='2'"):
        GateRule.parse("require_gain_p=2")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_the_gate_reuses_a_matching_kdkit_eval_out_directory(packs, tmp_path, monkeypatch):
    dirs, tasks = packs
    r = CliRunner()
    for name in ("prod", "good"):
        res = r.invoke(app, ["eval", str(dirs[name]), "--tasks", str(tasks), "--max-new-tokens", "8",
                             "--out", str(tmp_path / f"ev-{name}")])
        assert res.exit_code == 0, res.output
    res = r.invoke(app, ["eval", str(dirs["good"]), "--tasks", str(tasks), "--max-new-tokens", "9",
                         "--out", str(tmp_path / "ev-good-9")])
    assert res.exit_code == 0, res.output

    def no_eval(*a, **kw):
        raise AssertionError("the gate evaluated again instead of reusing kdkit eval --out")

    monkeypatch.setattr(gate_mod, "evaluate_model", no_eval)
    ws = str(tmp_path / "ws")
    assert r.invoke(app, ["registry", "promote", str(dirs["prod"]), "--workspace", ws]).exit_code == 0
    res = r.invoke(app, ["gate", str(dirs["good"]), "--tasks", str(tasks), "--workspace", ws, "--max-new-tokens", "8",
                         "--reuse-eval", str(tmp_path / "ev-good-9"), "--reuse-eval", str(tmp_path / "ev-prod"),
                         "--reuse-eval", str(tmp_path / "ev-good")], terminal_width=250)
    assert res.exit_code in (0, 1, 3), res.output
    assert f"not reusing {tmp_path / 'ev-good-9'} for good on anchors.jsonl: other generation settings" in res.output
    assert f"reusing `kdkit eval --out {tmp_path / 'ev-prod'}` for prod" in res.output
    assert f"reusing `kdkit eval --out {tmp_path / 'ev-good'}` for good" in res.output
    stored = Registry(tmp_path / "ws").evaluations()
    assert sorted(e["metrics"]["imported_from"] for e in stored) == [str(tmp_path / "ev-good"), str(tmp_path / "ev-prod")]
    passed = json.loads((tmp_path / "ev-good" / "summary.json").read_text())["n_passed"]
    assert {e["n_passed"] for e in stored if e["metrics"]["imported_from"].endswith("ev-good")} == {passed}


def test_gate_drift_is_the_kl_from_the_baseline_on_its_anchor_answers(packs, tmp_path, monkeypatch):
    from kdkit.evaluate.drift import drift

    dirs, tasks = packs
    _tag(dirs)
    base = dict.fromkeys(ANCHORS, True)
    monkeypatch.setattr(gate_mod, "evaluate_model", _fake_eval({"prod": base, "good": dict(base)}, []))
    ws = tmp_path / "ws"
    r = CliRunner()
    assert r.invoke(app, ["registry", "promote", str(dirs["prod"]), "--workspace", str(ws)]).exit_code == 0
    res = r.invoke(app, ["gate", str(dirs["good"]), "--tasks", str(tasks), "--workspace", str(ws), "--drift"],
                   terminal_width=250)
    assert res.exit_code == 0 and "KEEP" in res.output, res.output
    rows = next((ws / "drift").glob("*.jsonl"))
    answered = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [a["completion"] for a in answered] == [f"<prod> {t}" for t in ANCHORS]  # the baseline's answers
    direct = drift(dirs["good"], dirs["prod"], rows)
    assert f"drift from prod on anchors: KL(base‖cand) mean {direct.kl_base_cand_mean:.4g}" in res.output
    assert "on train" not in res.output  # a pack, not a run: its training rows are not known
