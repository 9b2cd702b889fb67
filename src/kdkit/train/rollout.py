"""The student's on-policy rollouts written by a vLLM server of the student, kept in sync with training.

Every ``objective.on_policy.sync_every`` optimizer steps the student's current weights reach the server
before it writes: a LoRA student's adapter is saved and loaded under a new name (``/v1/load_lora_adapter``;
start vLLM with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), a fully fine-tuned
student's weights are saved and reloaded in place (``/collective_rpc`` ``reload_weights``, then
``/reset_prefix_cache`` so no KV block of the old weights is reused; start vLLM with
``VLLM_SERVER_DEV_MODE=1``). Between syncs the server writes with weights up to ``sync_every − 1`` steps
old; each on-policy step logs that lag (``rollout_lag``) and the step of the weights used
(``rollout_weights_step``), so a stale rollout shows in the logs. The weights last pushed stay in the run
directory (``rollout-weights/``): a resumed run pushes them again and rolls out as the uninterrupted run did.

Under several ranks (torchrun, DDP) rank 0 alone saves and pushes, after the step's all-reduce made every
rank's weights the same; every rank then waits at a barrier until the push is done and reads which model
name the server now serves them under (``rollout-weights/synced.json``), so no rank asks for rollouts from
the weights before.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdkit.teacher.served import ServedError, Server
from kdkit.util.io import atomic_write_json

WEIGHTS_DIR = "rollout-weights"
_STATE = "synced.json"


@dataclass
class RolloutServer:
    """The student's server and which training step's weights it holds."""

    server: Server
    base_model: str
    run_dir: Path
    sync_every: int
    lora: bool
    synced_step: int | None = None
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    rank: int = 0
    barrier: Callable[[], None] = field(default=lambda: None, repr=False)  # every rank's, when there are several

    def _dir(self) -> Path:
        return self.run_dir / WEIGHTS_DIR

    def _push(self, step: int) -> None:
        """Rank 0: the saved weights to the server, and the name it serves them under to ``synced.json``."""
        if self.lora:
            name, old = f"kdkit-{self.nonce}-step-{step}", self.server.model  # unique on a shared server
            self.server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(self._dir())})
            self.server.model = name
            if old != self.base_model:  # the adapter of the previous sync is no longer asked for
                self.server.post("/v1/unload_lora_adapter", {"lora_name": old})
        else:
            self.server.post("/collective_rpc", {"method": "reload_weights",
                                                 "kwargs": {"weights_path": str(self._dir())}})
            self.server.post("/reset_prefix_cache", {})
        atomic_write_json(self._dir() / _STATE, {"step": step, "model": self.server.model})
        self.synced_step = step

    def _follow(self) -> None:
        """Every rank, after the barrier: the step and the model name rank 0 pushed."""
        state = json.loads((self._dir() / _STATE).read_text())
        self.synced_step, self.server.model = int(state["step"]), state.get("model") or self.base_model

    def restore(self) -> None:
        """A resumed run: push the weights the server held when the run stopped (if it had synced)."""
        state = self._dir() / _STATE
        if state.is_file() and self.rank == 0:
            self._push(int(json.loads(state.read_text())["step"]))
        self.barrier()
        if state.is_file():
            self._follow()

    def sync(self, model: torch.nn.Module, step: int) -> None:
        """Before on-policy step ``step`` (0-based): push the current weights when a sync is due (rank 0), and
        every rank waits for them."""
        due = self.synced_step is None or step // self.sync_every != self.synced_step // self.sync_every
        if not due:
            return
        if self.rank == 0:
            out, tmp = self._dir(), self._dir().with_name(WEIGHTS_DIR + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)  # ours: a sync that was cut short
            model.save_pretrained(str(tmp), safe_serialization=True)  # a LoRA student: its adapter alone
            atomic_write_json(tmp / _STATE, {"step": step})
            shutil.rmtree(out, ignore_errors=True)  # ours: the weights of the previous sync
            tmp.rename(out)
            self._push(step)
        self.barrier()  # no rank asks for rollouts before the new weights are in
        self._follow()

    def lag(self, step: int) -> dict[str, float]:
        return {"rollout_lag": float(step - (self.synced_step or 0)),
                "rollout_weights_step": float(self.synced_step or 0)}

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, stop_ids: list[int]) -> list[list[int]]:
        """Each prompt's completion, cut after its first stop token (kept: the model chose it)."""
        out = self.server.generate(prompts, max_new_tokens, temperature, top_p, seed, stop_ids)
        return [c[:next((i + 1 for i, t in enumerate(c) if t in stop_ids), len(c))] for c in out]


def open_rollout_server(url: str, served_model: str | None, run_dir: Path, sync_every: int, lora: bool,
                        rank: int = 0, barrier: Callable[[], None] = lambda: None) -> RolloutServer:
    """The student's server, checked: it answers and serves one model (the student's base). ``rank`` and
    ``barrier``: this process's rank and the ranks' barrier, under several ranks."""
    server = Server(url, served_model)
    try:
        info = server.info()
    except ServedError as e:
        raise ServedError(f"objective.on_policy.rollout_url: {e}") from None
    return RolloutServer(server, info["model"], run_dir, sync_every, lora, rank=rank, barrier=barrier)
