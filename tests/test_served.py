"""The served teacher against a real vLLM server on 127.0.0.1 (a tiny Llama the test builds, float32)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config.load import load_train_config
from kdkit.data import rows as kdata
from kdkit.loss.divergences import TopK
from kdkit.models.generation import GenerationSettings, generate_ids
from kdkit.models.load import load_causal_lm, load_tokenizer
from kdkit.teacher.cache import TeacherCache
from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
from kdkit.teacher.fleet import Fleet, agreement
from kdkit.teacher.parity import teacher_parity
from kdkit.teacher.served import ServedError, Server
from kdkit.train import TrainingError, train
from kdkit.train.rollout import open_rollout_server
from kdkit.util.errors import KdkitError, UsageError
from tests.helpers import save_model_dir, toy_rows, write_jsonl
from tests.vllm_server import DEV, LORA, Relay, VllmServer, free_port

QUIET = {"progress": False, "log": lambda m: None}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The module's two vLLM servers, loading side by side: the teacher, in dev mode (a fully fine-tuned
    student's weights can be reloaded in place), and a server of the same weights that loads LoRA adapters at
    run time (vLLM 0.32's CPU build fails prompt log-probs with --enable-lora: a teacher is served without it)."""
    root = tmp_path_factory.mktemp("served")
    save_model_dir(root / "teacher", seed=1, hidden=64, heads=2)  # vLLM's CPU attention: head size >= 32
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(16))
    write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": f"add {i} and 2"},
                                                    {"role": "assistant", "content": str(i + 2)}]} for i in range(4)])
    teacher = VllmServer(root / "teacher", root / "vllm.log", extra=DEV[0], env=DEV[1])
    lora = VllmServer(root / "teacher", root / "lora.log", extra=LORA[0], env=LORA[1])
    twin = VllmServer(root / "teacher", root / "twin.log")
    try:
        for server in (teacher.launch(), lora.launch(), twin.launch()):
            server.wait()
        yield root, teacher, lora.url, twin.url
    finally:
        teacher.stop()
        lora.stop()
        twin.stop()


@pytest.fixture(scope="module")
def served(servers):
    root, teacher = servers[:2]
    return root, teacher.url


@pytest.fixture(scope="module")
def lora_server(servers):
    return servers[2]


@pytest.fixture(scope="module")
def twin(servers):
    """A second server of the teacher's weights, in its own process: with the teacher's, a fleet of two."""
    return servers[3]


def _cfg(root: Path, tmp: Path, teacher: dict, **over) -> Path:
    body = {"student": {"path": str(root / "student")}, "teacher": teacher,
            "data": {"train": str(root / "train.jsonl"), "max_length": 128}, "objective": {"kd_weight": 1.0},
            "optim": {"lr": 5e-3, "micro_batch": 4, "grad_accum": 2, "epochs": 2, "schedule": "constant"},
            "checkpoint": {"every": 0}, **over}
    p = tmp / f"cfg-{len(list(tmp.glob('cfg-*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_prompt_topk_is_the_float64_log_softmax(served):
    root, url = served
    ids = [1, 40, 41, 42, 43, 77, 12]
    (tk,) = Server(url).prompt_topk([ids], 16)
    model = load_causal_lm(root / "teacher", "float32").double()
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    assert tk.ids.shape == (len(ids) - 1, 16)
    torch.testing.assert_close(tk.logprobs.double(), ref.gather(-1, tk.ids), atol=2e-5, rtol=0)
    # the server's K are the K most likely, sorted; the tail is 1 − Σ_K p
    assert torch.all(ref.gather(-1, tk.ids)[:, -1] >= ref.topk(16, -1).values[:, -1] - 2e-5)
    assert torch.all(tk.logprobs[:, :-1] >= tk.logprobs[:, 1:])
    tail = torch.log1p(-ref.topk(16, -1).values.exp().sum(-1))
    torch.testing.assert_close(tk.tail.double(), tail, atol=2e-5, rtol=0)


def test_served_capture_is_byte_identical_and_equals_the_local_capture(served, tmp_path):
    root, url = served
    s = PrecomputeSettings(top_k=16, shard_rows=8, max_length=128, teacher_url=url)
    m1 = precompute(root / "teacher", root / "train.jsonl", tmp_path / "a", s, **QUIET)
    # the OpenAI base URL, as vLLM's and OpenAI's clients take it, names the same server: same key, same bytes
    m2 = precompute(root / "teacher", root / "train.jsonl", tmp_path / "b",
                    PrecomputeSettings(top_k=16, shard_rows=8, max_length=128, teacher_url=url + "/v1/"), **QUIET)
    assert m2["key"] == m1["key"]
    for shard in m1["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()
    served_info = m1["teacher"]["served"]
    assert served_info["model"] == str(root / "teacher") and served_info["max_logprobs"] == 64
    assert served_info["vllm_version"] and m1["teacher"]["weights"]  # the local weights are fingerprinted
    assert m1["stats"]["teacher_entropy_mean"] is None  # a server gives the top-K alone
    local = precompute(root / "teacher", root / "train.jsonl", tmp_path / "local",
                       PrecomputeSettings(top_k=16, shard_rows=8, max_length=128), **QUIET)
    assert local["key"] != m1["key"]  # a served capture is another teacher identity
    a, b = TeacherCache(tmp_path / "a"), TeacherCache(tmp_path / "local")
    same_ids = positions = 0
    for r in range(len(a)):
        ra, rb = a.row(r), b.row(r)
        assert np.array_equal(ra.pos, rb.pos)
        # sorted log-probs agree slot by slot; ids may swap where two tokens tie to ~1e-7
        assert np.abs(ra.logprobs.astype(np.float64) - rb.logprobs.astype(np.float64)).max() <= 1e-3  # float16
        assert np.abs(ra.tail - rb.tail).max() <= 1e-5
        same_ids, positions = same_ids + int((ra.ids == rb.ids).all(-1).sum()), positions + len(ra.pos)
    assert same_ids >= 0.95 * positions


def test_served_capture_refusals_write_nothing(served, tmp_path):
    root, url = served
    data, teacher = root / "train.jsonl", root / "teacher"
    with pytest.raises(UsageError, match="--top-k 65 with --teacher-url: the server at .* allows --max-logprobs 64"):
        precompute(teacher, data, tmp_path / "k", PrecomputeSettings(top_k=65, teacher_url=url), **QUIET)
    with pytest.raises(UsageError, match="temperature 1"):
        precompute(teacher, data, tmp_path / "t", PrecomputeSettings(temperature=2.0, teacher_url=url), **QUIET)
    with pytest.raises(ServedError, match="not 'other'"):
        precompute(teacher, data, tmp_path / "m", PrecomputeSettings(teacher_url=url, served_model="other"), **QUIET)
    with pytest.raises(ServedError, match="did not answer /v1/models after 1 tries"):
        Server(f"http://127.0.0.1:{free_port()}", retries=0).info()
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 300}])
    with pytest.raises(UsageError, match="a row of 301 tokens exceeds the server's max_model_len 256"):
        precompute(teacher, long, tmp_path / "n", PrecomputeSettings(max_length=512, teacher_url=url), **QUIET)
    assert not any((tmp_path / d).exists() for d in ("k", "t", "m", "n"))
    # training refuses the same, naming its own fields, before any weight is loaded
    for teacher_cfg, data, match in (({"url": url, "top_k": 65}, root / "train.jsonl", r"teacher.top_k is 65: .*64"),
                                     ({"url": url}, long, "data.max_length is 512: a row of 301 tokens")):
        cfg = _cfg(root, tmp_path, teacher_cfg, data={"train": str(data), "max_length": 512})
        with pytest.raises(KdkitError, match=match):
            train(load_train_config(cfg), tmp_path / f"run-{teacher_cfg.get('top_k', 0)}", **QUIET)


def test_teacher_check_agrees_and_names_the_first_difference(served, tmp_path):
    root, url = served
    runner = CliRunner()
    ok = runner.invoke(app, ["teacher", "check", "--teacher-url", url + "/v1", "--teacher", str(root / "teacher"),
                             "--data", str(root / "chat.jsonl"), "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["max_abs"] < 1e-5 and report["top1"] == 1.0 and report["positions"] > 50

    class Recording(Server):  # the real server; what parity asks it is kept
        def prompt_topk(self, prompts, k):
            self.asked = prompts
            return super().prompt_topk(prompts, k)

    server = Recording(url)
    teacher_parity(server, root / "teacher", root / "train.jsonl", 3, max_length=20)
    tok = load_tokenizer(root / "teacher")
    rows = kdata.load_dataset(tok, root / "train.jsonl", max_length=20, truncation="right")[0][:3]
    assert server.asked == [r.input_ids for r in rows] and max(map(len, server.asked)) == 20
    other = runner.invoke(app, ["teacher", "check", "--teacher-url", url, "--teacher", str(root / "student"),
                                "--data", str(root / "train.jsonl")])
    assert other.exit_code == 1 and "DIFFER" in other.output and "first difference: line 1, position" in other.output
    # the same weights with another chat template: the server renders chat rows otherwise
    edited = tmp_path / "edited"
    shutil.copytree(root / "teacher", edited)
    (edited / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}> {{ m['content'] }}\n"
                                                "{% endfor %}")
    cfg = json.loads((edited / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (edited / "tokenizer_config.json").write_text(json.dumps(cfg))
    tmpl = runner.invoke(app, ["teacher", "check", "--teacher-url", url, "--teacher", str(edited),
                               "--data", str(root / "chat.jsonl")])
    assert tmpl.exit_code == 1 and "chat template renders the row otherwise" in tmpl.output, tmpl.output


def test_training_on_the_server_equals_training_on_its_float32_cache(served, tmp_path):
    root, url = served
    precompute(root / "teacher", root / "train.jsonl", tmp_path / "c32",
               PrecomputeSettings(top_k=16, max_length=128, logprob_dtype="float32", teacher_url=url), **QUIET)
    live = _cfg(root, tmp_path, {"url": url, "top_k": 16, "model": str(root / "teacher")})
    cached = _cfg(root, tmp_path, {"cache": str(tmp_path / "c32")})
    train(load_train_config(live), tmp_path / "live", **QUIET)
    train(load_train_config(cached), tmp_path / "cached", **QUIET)
    a, b = _metrics(tmp_path / "live"), _metrics(tmp_path / "cached")
    assert len(a) == 4 and [m["total_loss"] for m in a] == [m["total_loss"] for m in b]
    assert [m["kl_loss"] for m in a] == [m["kl_loss"] for m in b] and a[-1]["tail_mass"] > 0
    # the run's identity holds what the server says it serves: a resume on another server is refused
    inputs_path = tmp_path / "live" / "inputs.json"
    inputs = json.loads(inputs_path.read_text())
    assert inputs["teacher.url"]["files"]["model"] == str(root / "teacher")
    inputs["teacher.url"]["files"]["vllm_version"] = "0.0.1"
    inputs["teacher.url"]["sha256"] = "0" * 64
    inputs_path.write_text(json.dumps(inputs))
    with pytest.raises(TrainingError, match="teacher.url: vllm_version changed"):
        train(load_train_config(live), tmp_path / "live", resume=True, **QUIET)


def test_a_server_that_dies_mid_run_ends_with_a_checkpoint_and_resume_is_bitwise(served, tmp_path):
    """The teacher's server dies while a step computes: the run reaches it through a relay that then resets
    every connection, as a killed server does, and comes back on the same port for the resume."""
    root, url = served
    own = Relay(url).start()
    cfg = _cfg(root, tmp_path, {"url": own.url, "top_k": 16, "retries": 0, "timeout_s": 30})
    reference = _cfg(root, tmp_path, {"url": url, "top_k": 16, "retries": 0, "timeout_s": 30})
    train(load_train_config(reference), tmp_path / "full", **QUIET)

    def kill_at_step_2(model, step):  # a grad hook: the server dies while step 2 computes
        if step == 1:
            own.stop()

    with pytest.raises(TrainingError, match=r"Stopped before step \d: saved .*step-000000\d.*--resume"):
        train(load_train_config(cfg), tmp_path / "run", grad_hooks=[kill_at_step_2], **QUIET)
    own.start()
    try:
        train(load_train_config(cfg), tmp_path / "run", resume=True, **QUIET)
    finally:
        own.stop()
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "run")
    assert [m["total_loss"] for m in a] == [m["total_loss"] for m in b]
    fa, fb = (load_file(str(p / "final" / "model.safetensors")) for p in (tmp_path / "full", tmp_path / "run"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def _greedy(model, tokenizer, prompts):
    return generate_ids(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8))


def test_a_lora_students_served_rollouts_follow_its_weights_and_show_their_lag(served, lora_server, tmp_path):
    """The adapter reaches the server at each sync; between syncs the server writes with the old weights."""
    root, _ = served
    url = lora_server
    tokenizer = load_tokenizer(root / "teacher")
    torch.manual_seed(0)
    student = get_peft_model(load_causal_lm(root / "teacher", "float32"),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prompts = [[1, 40, 41, 42], [1, 50, 13, 70, 71]]
    rollout = open_rollout_server(url + "/v1", None, tmp_path, sync_every=2, lora=True)  # the base URL form
    rollout.sync(student, 0)
    first = _greedy(student, tokenizer, prompts)
    assert rollout.generate(prompts, 8, 0.0, 1.0, 0, [2]) == first  # vLLM greedy = transformers greedy
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    moved = _greedy(student, tokenizer, prompts)
    assert moved != first
    rollout.sync(student, 1)  # not due: step 1 is in the window of step 0
    assert rollout.generate(prompts, 8, 0.0, 1.0, 0, [2]) == first and rollout.lag(1)["rollout_lag"] == 1.0
    rollout.sync(student, 2)
    assert rollout.generate(prompts, 8, 0.0, 1.0, 0, [2]) == moved and rollout.lag(2)["rollout_lag"] == 0.0
    assert json.loads((tmp_path / "rollout-weights" / "synced.json").read_text()) == {
        "step": 2, "model": f"kdkit-{rollout.nonce}-step-2"}  # what every rank asks for, under several


def test_on_policy_with_served_rollouts_equals_generate_rollouts(served, lora_server, tmp_path):
    """Greedy, synced every step, teacher and student served: the run is the run whose student generates."""
    root, url = served
    on_policy = {"fraction": 1.0, "max_new_tokens": 6, "temperature": 0.0, "loss": "sampled_kl_rev"}
    body = dict(student={"path": str(root / "teacher"), "lora": {"r": 4, "alpha": 8,
                                                                   "target_modules": ["q_proj", "v_proj"]}},
                optim={"lr": 5e-2, "micro_batch": 4, "grad_accum": 1, "max_steps": 3, "schedule": "constant"})
    teacher = {"url": url, "top_k": 16}
    here = _cfg(root, tmp_path, teacher, objective={"kd_weight": 1.0, "on_policy": on_policy}, **body)
    served_cfg = _cfg(root, tmp_path, teacher, objective={"kd_weight": 1.0, "on_policy": {
        **on_policy, "rollout_url": lora_server}}, **body)
    train(load_train_config(here), tmp_path / "here", **QUIET)
    train(load_train_config(served_cfg), tmp_path / "served", **QUIET)
    a, b = _metrics(tmp_path / "here"), _metrics(tmp_path / "served")
    assert [m["kl_loss"] for m in a] == [m["kl_loss"] for m in b]
    assert [m["rollout_lag"] for m in b] == [0.0, 0.0, 0.0]


def _torchrun(cfg: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "kdkit", "train", str(cfg), "--out", str(out),
                           "--no-progress", *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_served_rollouts_under_two_ranks_equal_one_rank_and_resume_bitwise(served, lora_server, tmp_path):
    """torchrun, 2 ranks × micro-batch 2 against 1 × 4: rank 0 pushes the adapter every 2 steps, both ranks
    ask the server for their rows' rollouts once it is in (greedy); killed after a checkpoint and resumed,
    the 2-rank run goes on bit for bit."""
    root, url = served
    objective = {"kd_weight": 1.0, "on_policy": {"fraction": 1.0, "max_new_tokens": 6, "temperature": 0.0,
                                                 "loss": "sampled_kl_rev", "rollout_url": lora_server,
                                                 "sync_every": 2}}
    student = {"path": str(root / "teacher"), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}

    def cfg(micro: int) -> Path:
        return _cfg(root, tmp_path, {"url": url, "top_k": 16}, objective=objective, student=student,
                    optim={"lr": 5e-2, "micro_batch": micro, "grad_accum": 1, "max_steps": 4, "schedule": "constant"},
                    checkpoint={"every": 1})

    train(load_train_config(cfg(4)), tmp_path / "one", **QUIET)
    two = _torchrun(cfg(2), tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one_m, two_m = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["rollout_lag"] for m in two_m] == [m["rollout_lag"] for m in one_m] == [0.0, 1.0, 0.0, 1.0]
    for a, b in zip(one_m, two_m, strict=True):
        assert b["total_loss"] == pytest.approx(a["total_loss"], rel=1e-5)
    killed = _torchrun(cfg(2), tmp_path / "again", env={"KDKIT_FAULT_TRAIN": "after_checkpoint:3"})
    assert killed.returncode != 0 and not (tmp_path / "again" / "final").exists()
    resumed = _torchrun(cfg(2), tmp_path / "again", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["total_loss"] for m in _metrics(tmp_path / "again")] == [m["total_loss"] for m in two_m]
    fa, fb = (load_file(str(p / "final" / "adapter_model.safetensors")) for p in (tmp_path / "two", tmp_path / "again"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_a_fully_fine_tuned_students_weights_are_reloaded_in_place(served, tmp_path):
    root, url = served
    tokenizer = load_tokenizer(root / "teacher")
    student = load_causal_lm(root / "teacher", "float32")
    prompts = [[1, 40, 41, 42]]
    rollout = open_rollout_server(url, None, tmp_path, sync_every=1, lora=False)
    try:
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        rollout.sync(student, 0)
        assert rollout.generate(prompts, 8, 0.0, 1.0, 0, [2]) == _greedy(student, tokenizer, prompts)
    finally:  # the teacher's own weights again, for any test after this one
        rollout.server.post("/collective_rpc", {"method": "reload_weights",
                                                "kwargs": {"weights_path": str(root / "teacher")}})
        rollout.server.post("/reset_prefix_cache", {})


def test_the_next_steps_requests_are_answered_before_the_step_asks(served):
    """ServedSignal.prefetch sends a step's requests from a background thread; the step's call then takes
    the answers without asking again, and they are the answers a direct request gives."""
    from kdkit.teacher.signals import ServedSignal

    root, url = served

    class Counting(Server):
        asked = 0

        def prompt_topk(self, prompts, k):
            type(self).asked += 1
            return super().prompt_topk(prompts, k)

    tok = load_tokenizer(root / "teacher")
    rows = kdata.load_dataset(tok, root / "train.jsonl", max_length=64)[0]
    batches = [kdata.collate(rows[i:i + 4], 0, list(range(i, i + 4))) for i in (0, 4)]
    signal = ServedSignal(Counting(url), 8)
    signal.prefetch(batches)
    signal.wait(batches)
    assert Counting.asked == 2
    got = [signal(b, None) for b in batches]
    assert Counting.asked == 2 and not signal._pending  # taken from the prefetched answers
    direct = signal(batches[0], None)
    assert Counting.asked == 3 and torch.equal(got[0].logprobs, direct.logprobs) and torch.equal(got[0].ids, direct.ids)


def test_generate_on_the_server_writes_the_local_generations_bytes(served, tmp_path):
    """`kdkit generate --teacher-url`: vLLM's greedy completions of the same prompt ids are transformers'
    (the tiny teacher in float32), so the rows are byte-identical; the served model is in the inputs."""
    root, url = served
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"def f{i}(x):\n", "task": f"T/{i}"} for i in range(6)]
                          + [{"messages": [{"role": "user", "content": "add 3 and 2"}]}])
    common = ["generate", "--model", str(root / "teacher"), "--data", str(prompts), "--max-new-tokens", "12",
              "--batch-size", "3", "--no-progress"]
    local = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "local.jsonl")])
    remote = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "served.jsonl"), "--teacher-url", url + "/v1"])
    assert local.exit_code == 0 and remote.exit_code == 0, local.output + remote.output
    assert (tmp_path / "served.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "served.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(r.get("completion") or r.get("messages") for r in rows)
    side = json.loads((tmp_path / "served.jsonl.kdkit.json").read_text())
    assert side["complete"] and side["served"]["model"] == str(root / "teacher")
    # the local file was made without the server: resuming it with one is another input
    again = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "local.jsonl"), "--teacher-url", url])
    assert again.exit_code != 0 and "served" in again.output and "choose another --out" in again.output
    lone = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "x.jsonl"), "--served-model", "m"])
    assert lone.exit_code == 2 and "without --teacher-url it does nothing" in lone.output


def _lora_config(root: Path, tmp: Path, max_steps: int, server: str | None = None) -> Path:
    """A LoRA run on the served teacher's weights (the LoRA server's base), a few steps long; ``server``: the
    config's eval.server."""
    cfg = tmp / "lora.yaml"
    cfg.write_text(yaml.safe_dump({**({"eval": {"server": server}} if server else {}),
        "student": {"path": str(root / "teacher"), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train": str(root / "train.jsonl"), "max_length": 96},
        "optim": {"lr": 5e-2, "micro_batch": 4, "max_steps": max_steps, "schedule": "constant"},
        "checkpoint": {"every": 0}}))
    return cfg


def _eval(model: Path, tasks: Path, out: Path, *extra: str) -> tuple[list[dict], list[dict], dict, str]:
    res = CliRunner().invoke(app, ["eval", str(model), "--tasks", str(tasks), "--max-new-tokens", "24",
                                   "--out", str(out), *extra], terminal_width=200)
    assert res.exit_code == 0, res.output
    rows = [[json.loads(x) for x in (out / f).read_text().splitlines()] for f in ("generations.jsonl", "results.jsonl")]
    return rows[0], rows[1], json.loads((out / "summary.json").read_text()), "".join(res.output.split())


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")
def test_eval_through_the_server_equals_the_local_path_task_by_task(served, lora_server, tmp_path):
    """The served model, a LoRA adapter loaded at run time (against its merged pack evaluated locally) and another
    full model loaded in place: the server's greedy answers, extracted code and verdicts are the local path's,
    task by task, and the server is left as it was."""
    from kdkit.demo.world import make_world

    root, url = served
    tasks = write_jsonl(tmp_path / "anchors.jsonl", make_world(0).anchors[:12])
    tok = load_tokenizer(root / "teacher")
    torch.manual_seed(0)
    adapter = get_peft_model(load_causal_lm(root / "teacher"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                          target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(str(tmp_path / "adapter"))
    tok.save_pretrained(str(tmp_path / "adapter"))
    adapter.merge_and_unload().save_pretrained(str(tmp_path / "merged"))
    tok.save_pretrained(str(tmp_path / "merged"))
    save_model_dir(tmp_path / "other", seed=7, hidden=64, heads=2)
    cases = ((root / "teacher", root / "teacher", url, "served"), (tmp_path / "adapter", tmp_path / "merged",
                                                                   lora_server, "adapter"),
             (tmp_path / "other", tmp_path / "other", url, "weights"), (root / "teacher", root / "teacher", url, "served"))
    answers = []
    for i, (candidate, local_model, server, how) in enumerate(cases):
        local = _eval(local_model, tasks, tmp_path / f"local{i}")
        remote = _eval(candidate, tasks, tmp_path / f"served{i}", "--server", server)
        assert [(g["task_id"], g["raw"], g["completion"]) for g in remote[0]] == \
            [(g["task_id"], g["raw"], g["completion"]) for g in local[0]]
        assert [(r["task_id"], r["passed"], r["status"]) for r in remote[1]] == \
            [(r["task_id"], r["passed"], r["status"]) for r in local[1]]
        assert remote[2]["served"]["how"] == how and "served" not in local[2]
        said = {"served": f"its own model {root / 'teacher'}", "adapter": f"adapter {candidate} loaded as kdkit-eval-",
                "weights": f"{candidate}'s weights loaded in place of {root / 'teacher'}"}[how]
        assert "".join(f"answers written by {server} ({said}".split()) in remote[3]  # the output, spaces aside
        answers.append([g["raw"] for g in local[0]])
    assert answers[0] != answers[1] != answers[2] and answers[3] == answers[0]  # three models; the server restored
    served = [m["id"] for m in Server(lora_server)._object("/v1/models")["data"]]
    assert str(root / "teacher") in served and not any(m.startswith("kdkit-eval-") for m in served)  # unloaded
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "adapter"), "--tasks", str(tasks), "--server", lora_server,
                                   "--sample"])
    assert res.exit_code == 2 and "vLLM's sampler draws other samples" in res.output


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")
def test_a_gate_through_the_server_judges_the_adapter_and_promotes_its_merged_pack(served, lora_server, tmp_path):
    """A LoRA run is gated as its adapter, unmerged; only when it is kept is it merged, and the merged pack —
    evaluated again, here on this machine (the LoRA server cannot load whole weights in place) — is promoted
    because its answers are the adapter's on every task."""
    from kdkit.decide.registry import Registry
    from kdkit.demo.world import make_world

    root, _ = served
    tasks = write_jsonl(tmp_path / "anchors.jsonl", make_world(0).anchors[:10])
    cfg = _lora_config(root, tmp_path, max_steps=3, server=lora_server)  # the run's config names the server
    train(load_train_config(cfg), tmp_path / "run", **QUIET)
    ws = tmp_path / "ws"
    reg = Registry(ws)
    reg.promote(reg.register(root / "teacher").id)
    common = ["gate", str(tmp_path / "run"), "--tasks", str(tasks), "--workspace", str(ws), "--max-new-tokens", "24",
              "--no-progress"]
    res = CliRunner().invoke(app, common, terminal_width=200)
    assert res.exit_code == 3 and "UNDECIDED" in res.output, res.output  # 0 of 10 anchors: no drop can be shown
    assert f"answers from {lora_server} ({tmp_path / 'run'}/config.yaml: eval.server)" in res.output
    assert [p.adapter for p in reg.packs()] == [False, True]  # the adapter registered as it is; nothing merged
    res = CliRunner().invoke(app, [*common, "--promote-undecided"], terminal_width=200)
    assert res.exit_code == 0 and "promoted as asked" in res.output, res.output
    assert "evaluating it on this machine" in res.output
    packs = reg.packs()
    prod = reg.production()
    assert [p.adapter for p in packs] == [False, True, False] and prod.id == packs[2].id  # the merged pack
    adapter_eval, merged_eval = (reg.evaluations(p.id)[-1] for p in packs[1:])
    assert adapter_eval["metrics"]["served"]["how"] == "adapter" and "served" not in merged_eval["metrics"]
    assert merged_eval["outcomes"] == adapter_eval["outcomes"]
    assert merged_eval["metrics"]["completions"] == adapter_eval["metrics"]["completions"]
    served = [m["id"] for m in Server(lora_server)._object("/v1/models")["data"]]
    assert str(root / "teacher") in served and not any(m.startswith("kdkit-eval-") for m in served)  # unloaded


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")
def test_a_ladder_through_the_server_gates_lora_rungs_unmerged(served, lora_server, tmp_path):
    """`kdkit ladder` with the config's eval.server (as --server): each LoRA rung is judged as its adapter (no
    pack is written unless kept), with its drift from the baseline measured on the adapter as applied."""
    from kdkit.decide.ladder import run_ladder
    from kdkit.decide.registry import Registry
    from kdkit.demo.world import make_world
    from kdkit.evaluate.passrate import GenerationSettings
    from kdkit.evaluate.sandbox import Limits
    from kdkit.evaluate.served import ServerSpec

    root, _ = served
    tasks = write_jsonl(tmp_path / "anchors.jsonl", make_world(0).anchors[:6])
    cfg = _lora_config(root, tmp_path, max_steps=2, server=lora_server)  # eval.server: no --server needed
    reg = Registry(tmp_path / "ws")
    reg.promote(reg.register(root / "teacher").id)
    logs: list[str] = []
    res = run_ladder(cfg, ["optim.lr=0.05,0.1"], tasks, tmp_path / "lad", registry=reg,
                     settings=GenerationSettings(max_new_tokens=16), limits=Limits(timeout_s=5), log=logs.append)
    assert f"answers from {lora_server} ({cfg}: eval.server)" in logs
    assert [r["status"] for r in res] == ["done", "done"], res[0].get("traceback")
    for r in res:
        assert r["decision"] == "UNDECIDED" and not (tmp_path / "lad" / f"rung-{r['rung']:02d}" / "pack").exists()
        evaluation = reg.evaluations(reg.pack(r["pack"]).id)[-1]
        assert reg.pack(r["pack"]).adapter and evaluation["metrics"]["served"]["how"] == "adapter"
        assert r["drift"]["train"]["kl_base_cand_mean"] > 0
    assert "drift train (KL b‖c / c‖b)" in (tmp_path / "lad" / "ladder.md").read_text()
    root_url = served[1]  # --served-lora merged: the rung merged first, its weights loaded in place
    merged = run_ladder(cfg, ["optim.lr=0.05"], tasks, tmp_path / "lad-merged", registry=reg,
                        settings=GenerationSettings(max_new_tokens=16), limits=Limits(timeout_s=5), log=logs.append,
                        server=ServerSpec(root_url), served_lora="merged")[0]
    assert merged["status"] == "done", merged.get("traceback")
    assert (tmp_path / "lad-merged" / "rung-00" / "pack").is_dir() and not reg.pack(merged["pack"]).adapter
    assert reg.evaluations(reg.pack(merged["pack"]).id)[-1]["metrics"]["served"]["how"] == "weights"
    assert f"--server {root_url} is used; {cfg}'s eval.server ({lora_server}) is not" in logs
    save_model_dir(tmp_path / "other", seed=7, hidden=64, heads=2)  # a LoRA run on another base: refused at once
    other = yaml.safe_load(cfg.read_text())
    other["student"]["path"] = str(tmp_path / "other")
    cfg.write_text(yaml.safe_dump(other))
    with pytest.raises(KdkitError, match=r"lora.yaml:\d+: eval.server: .* serves .*teacher, but a LoRA run's adapter"):
        train(load_train_config(cfg), tmp_path / "refused", **QUIET)
    assert not (tmp_path / "refused" / "final").exists()


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")
def test_an_exported_directory_is_loaded_by_vllm_as_it_is(served, tmp_path):
    """`kdkit export`'s safetensors (kdkit's provenance in their __metadata__) are loaded by a real vLLM server, whose
    greedy answers, extracted code and verdicts are the local path's on the exported directory, task by task."""
    from kdkit.decide.export import export_pack
    from kdkit.decide.registry import Registry
    from kdkit.demo.world import make_world

    root, url = served
    tasks = write_jsonl(tmp_path / "anchors.jsonl", make_world(0).anchors[:8])
    reg = Registry(tmp_path / "ws")
    pack = reg.register(save_model_dir(tmp_path / "other", seed=7, hidden=64, heads=2), name="other")
    out = export_pack(reg, pack.name, tmp_path / "export", ungated=True)
    local = _eval(out, tasks, tmp_path / "local")
    remote = _eval(out, tasks, tmp_path / "served", "--server", url)
    assert remote[2]["served"]["how"] == "weights"
    assert [(g["task_id"], g["raw"], g["completion"]) for g in remote[0]] == \
        [(g["task_id"], g["raw"], g["completion"]) for g in local[0]]
    assert [(r["task_id"], r["passed"]) for r in remote[1]] == [(r["task_id"], r["passed"]) for r in local[1]]


COMPLETIONS = b"POST /v1/completions"
"""The start of a log-prob request: a relay that dies at its n-th one dies mid-run at a point that does not
depend on timing."""


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


def test_a_fleet_writes_one_servers_cache_bytes_with_a_server_lost_mid_capture(served, twin, tmp_path):
    """Two servers of one teacher (two processes): the cache's bytes are the lone server's, with both
    answering and with one lost before the capture's end (its request retried on the other)."""
    root, url = served
    one = precompute(root / "teacher", root / "train.jsonl", tmp_path / "one",
                     PrecomputeSettings(top_k=16, shard_rows=8, batch_size=2, max_length=128, teacher_url=url), **QUIET)
    relay, said = Relay(twin).start(), []
    s = PrecomputeSettings(top_k=16, shard_rows=8, batch_size=2, max_length=128, teacher_url=(url, relay.url))
    both = precompute(root / "teacher", root / "train.jsonl", tmp_path / "both", s, progress=False, log=said.append)
    assert both["key"] == one["key"] and _shards(tmp_path / "both") == _shards(tmp_path / "one")
    assert "2 teacher servers agree bit for bit on 4 rows" in said
    answered = next(m for m in said if m.startswith("requests answered"))
    assert f"{relay.url} " in answered and not answered.endswith(f"{relay.url} 0")  # both servers answered
    relay.stop()
    # its fourth log-prob request, the second of the capture (after the --max-logprobs probe and the check that
    # the servers agree): reset, as a killed server's connections are
    lost = Relay(twin, dies_at=4, counting=COMPLETIONS).start()
    said.clear()
    s = PrecomputeSettings(top_k=16, shard_rows=8, batch_size=2, max_length=128, teacher_url=(url, lost.url))
    try:
        again = precompute(root / "teacher", root / "train.jsonl", tmp_path / "lost", s, progress=False, log=said.append)
    finally:
        lost.stop()
    assert again["key"] == one["key"] and _shards(tmp_path / "lost") == _shards(tmp_path / "one")
    assert any(m.startswith(f"teacher server {lost.url} stopped answering") and m.endswith("go to the 1 left")
               for m in said)


def test_a_fleet_is_refused_at_the_start_naming_the_server(served, twin, tmp_path):
    """A URL named twice, a server that does not answer: refused before anything is captured or trained.
    `kdkit teacher check` checks each server named."""
    root, url = served
    both = CliRunner().invoke(app, ["teacher", "check", "--teacher-url", url, "--teacher-url", twin, "--teacher",
                                    str(root / "teacher"), "--data", str(root / "chat.jsonl"), "--json",
                                    str(tmp_path / "r.json")])
    assert both.exit_code == 0, both.output
    assert [r["url"] for r in json.loads((tmp_path / "r.json").read_text())] == [url, twin]
    assert both.output.count("teacher parity (") == 2 and "DIFFER" not in both.output
    with pytest.raises(ServedError, match=r"teacher server http://127\.0\.0\.1:\d+ is named twice"):
        precompute(root / "teacher", root / "train.jsonl", tmp_path / "twice",
                   PrecomputeSettings(top_k=16, max_length=128, teacher_url=(url, url + "/v1")), **QUIET)
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = _cfg(root, tmp_path, {"url": [url, dead], "top_k": 16, "retries": 0, "timeout_s": 30})
    with pytest.raises(KdkitError, match=f"teacher.url: teacher server {dead} did not answer"):
        train(load_train_config(cfg), tmp_path / "run", **QUIET)
    assert not (tmp_path / "run" / "inputs.json").exists() and not (tmp_path / "twice").exists()


def test_training_on_a_fleet_equals_training_on_one_server_with_a_server_lost_mid_run(served, twin, tmp_path, capsys):
    """The losses and the final weights of a run whose teacher is two servers — both answering, or one lost
    mid-run — are those of the run on one server; the loss is reported on stderr."""
    root, url = served
    train(load_train_config(_cfg(root, tmp_path, {"url": url, "top_k": 16})), tmp_path / "one", **QUIET)
    relay = Relay(twin).start()
    train(load_train_config(_cfg(root, tmp_path, {"url": [url, relay.url], "top_k": 16, "retries": 0})),
          tmp_path / "both", **QUIET)
    relay.stop()
    # its fifth log-prob request, the second of training (after the --max-logprobs probes of the resume identity
    # and of the run's own fleet, and the check that the servers agree)
    lost = Relay(twin, dies_at=5, counting=COMPLETIONS).start()
    try:
        train(load_train_config(_cfg(root, tmp_path, {"url": [url, lost.url], "top_k": 16, "retries": 0})),
              tmp_path / "lost", **QUIET)
    finally:
        lost.stop()
    assert f"teacher server {lost.url} stopped answering" in capsys.readouterr().err
    _assert_same_runs(tmp_path / "one", tmp_path / "both", tmp_path / "lost")


def _assert_same_runs(reference: Path, *runs: Path) -> None:
    """Each run's losses and final weights are the reference run's, bit for bit."""
    weights = load_file(str(reference / "final" / "model.safetensors"))
    for run in runs:
        assert [m["total_loss"] for m in _metrics(run)] == [m["total_loss"] for m in _metrics(reference)]
        theirs = load_file(str(run / "final" / "model.safetensors"))
        assert all(torch.equal(weights[k], theirs[k]) for k in weights)


def test_a_server_that_returns_rejoins_the_fleet_only_when_it_answers_as_before(served, twin):
    """A server left out is asked again (here on every request, `rejoin_s` 0): once back, it takes requests
    again and its answers are the lone server's; one whose answers to the parity rows differ stays out."""
    root, url = served
    relay, said = Relay(twin).start(), []
    fleet = Fleet([Server(url, retries=0), Server(relay.url, retries=0)], said.append, rejoin_s=0)
    rows = [[1, 40 + i, 41, 42 + 2 * i, 43, 77, 12] for i in range(6)]
    try:
        fleet.info()
        agreement(fleet, rows[:2], 8, 1e-3)
        lone = Server(url).prompt_topk(rows, 8)
        relay.stop()
        fleet.token_logprobs(rows[:1]), fleet.token_logprobs(rows[:1])  # one of them finds the relay down
        assert relay.url in fleet.left_out and said[-1].startswith(f"teacher server {relay.url} stopped answering")
        relay.start()
        answers = [fleet.prompt_topk([r], 8)[0] for r in rows]
        assert f"teacher server {relay.url} answers again, as before; it takes requests again" in said
        assert not fleet.left_out and fleet.answered[relay.url] >= 1
        assert all(torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
                   for a, b in zip(answers, lone, strict=True))
        # a server back with other weights: its answers to the parity rows are not the first server's
        prompts, k, tolerance, ref = fleet.parity
        shifted = [TopK(t.ids, t.logprobs - 0.5, t.tail) for t in ref]
        fleet.parity = (prompts, k, tolerance, shifted)
        relay.stop()
        fleet.token_logprobs(rows[:1]), fleet.token_logprobs(rows[:1])
        relay.start()
        fleet.token_logprobs(rows[:1])
    finally:
        relay.stop()
    assert relay.url in fleet.left_out
    assert said[-1] == (f"teacher server {relay.url} answers again but stays out: teacher server {relay.url} "
                        f"answers otherwise than {url} on parity row 1: max |Δ log-prob| 0.5 (tolerance 0.001)")


def test_a_fleet_with_no_server_left_stops_with_a_checkpoint_and_resumes_bitwise(served, twin, tmp_path):
    root, url = served
    first, second = Relay(url).start(), Relay(twin).start()
    cfg = _cfg(root, tmp_path, {"url": [first.url, second.url], "top_k": 16, "retries": 0, "timeout_s": 30},
               checkpoint={"every": 1})
    train(load_train_config(_cfg(root, tmp_path, {"url": url, "top_k": 16})), tmp_path / "full", **QUIET)

    def both_die_at_step_2(model, step):
        if step == 1:
            first.stop()
            second.stop()

    with pytest.raises(TrainingError, match=r"no teacher server answers .*Stopped before step \d"):
        train(load_train_config(cfg), tmp_path / "run", grad_hooks=[both_die_at_step_2], **QUIET)
    first.start(), second.start()
    try:
        train(load_train_config(cfg), tmp_path / "run", resume=True, **QUIET)
    finally:
        first.stop(), second.stop()
    assert [m["total_loss"] for m in _metrics(tmp_path / "full")] == [m["total_loss"] for m in _metrics(tmp_path / "run")]


@pytest.mark.slow
def test_two_ranks_each_with_its_own_server_capture_one_processs_bytes(served, twin, tmp_path):
    """`torchrun --nproc_per_node 2 kdkit precompute --teacher-url A --teacher-url B`: rank 0 asks A, rank 1
    asks B, and the cache is the one a single process writes from A alone, byte for byte."""
    root, url = served
    args = ["-m", "kdkit", "precompute", "--teacher", str(root / "teacher"), "--data", str(root / "train.jsonl"),
            "--top-k", "16", "--shard-rows", "4", "--batch-size", "2", "--max-length", "128", "--no-progress"]
    one = subprocess.run([sys.executable, *args, "--teacher-url", url, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", *args, "--teacher-url", url, "--teacher-url", twin,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 teacher servers agree bit for bit" in two.stdout
    assert _shards(tmp_path / "two") == _shards(tmp_path / "one") and len(_shards(tmp_path / "one")) == 8
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two")]
    assert manifests[0]["key"] == manifests[1]["key"]
    # a worker dies (rank 1, after writing its first shard): the same command again resumes, the same bytes
    again = [str(torchrun), "--nproc_per_node", "2", *args, "--teacher-url", url, "--teacher-url", twin, "--out",
             str(tmp_path / "again")]
    died = subprocess.run(again, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KDKIT_FAULT_PRECOMPUTE": "after_shard:1"})
    assert died.returncode != 0 and not (tmp_path / "again" / "manifest.json").exists()
    resumed = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _shards(tmp_path / "again") == _shards(tmp_path / "one")


@pytest.mark.slow
def test_three_servers_one_lost_mid_capture_and_mid_run_write_one_servers_bytes_and_losses(served, twin, tmp_path,
                                                                                            capsys):
    """Three real vLLM processes of the teacher against one: the capture's shards and a run's losses and final
    weights are the lone server's; the third server is lost mid-capture and mid-run (its connections reset,
    as a killed process's, when its last request comes)."""
    root, url = served
    third = VllmServer(root / "teacher", tmp_path / "third.log").start()
    try:
        s1 = PrecomputeSettings(top_k=16, shard_rows=8, batch_size=2, max_length=128, teacher_url=url)
        precompute(root / "teacher", root / "train.jsonl", tmp_path / "one", s1, **QUIET)
        train(load_train_config(_cfg(root, tmp_path, {"url": url, "top_k": 16})), tmp_path / "run-one", **QUIET)
        for what in ("capture", "run"):
            probe = Relay(third.url).start()
            urls = [url, twin, probe.url]
            if what == "capture":
                s3 = PrecomputeSettings(top_k=16, shard_rows=8, batch_size=2, max_length=128, teacher_url=tuple(urls))
                precompute(root / "teacher", root / "train.jsonl", tmp_path / "probe", s3, **QUIET)
            else:
                train(load_train_config(_cfg(root, tmp_path, {"url": urls, "top_k": 16, "retries": 0})),
                      tmp_path / "run-probe", **QUIET)
            probe.stop()
            lost = Relay(third.url, dies_at=3 if what == "capture" else 4, counting=COMPLETIONS).start()
            urls[2] = lost.url
            try:
                if what == "capture":
                    s3 = PrecomputeSettings(top_k=16, shard_rows=8, batch_size=2, max_length=128,
                                            teacher_url=tuple(urls))
                    precompute(root / "teacher", root / "train.jsonl", tmp_path / "three", s3, progress=False,
                               log=lambda m: print(m, file=sys.stderr))
                else:
                    train(load_train_config(_cfg(root, tmp_path, {"url": urls, "top_k": 16, "retries": 0})),
                          tmp_path / "run-three", **QUIET)
            finally:
                lost.stop()
            assert f"teacher server {lost.url} stopped answering" in capsys.readouterr().err, what
    finally:
        third.stop()
    for d in ("probe", "three"):
        assert _shards(tmp_path / d) == _shards(tmp_path / "one")
    _assert_same_runs(tmp_path / "run-one", tmp_path / "run-probe", tmp_path / "run-three")
