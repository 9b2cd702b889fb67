"""The workspace registry (SQLite): packs, evaluations, gate decisions, and the production pointer.

Every change is one transaction, so a crash at any point leaves either the old or
the new state — production is never "neither". Production is a history: the
current production is its newest row; ``rollback`` appends the previous one again.

A *pack* is a full Hugging Face model directory. Registering one copies its files
into the workspace as read-only files, so production survives the user deleting a
run and no write to the source directory can reach it; the weights hash is checked
again before an evaluation of a pack is reused and before a pack is promoted.
A gate's decision is applied only if production is still the pack the candidate was
compared with (compare-and-swap inside the decision's transaction).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.models.load import model_fingerprint
from kdkit.util.errors import KdkitError
from kdkit.util.faults import kill_if
from kdkit.util.identity import path_identity
from kdkit.util.io import remove_dead_writers

DEFAULT_WORKSPACE = ".kdkit"
FAULT_ENV = "KDKIT_FAULT_REGISTRY"

SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  path TEXT NOT NULL,
  weights_sha256 TEXT NOT NULL,
  parent_id INTEGER REFERENCES packs(id),
  source_run TEXT,
  config TEXT,
  status TEXT NOT NULL DEFAULT 'active',
  created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
  id INTEGER PRIMARY KEY,
  pack_id INTEGER NOT NULL REFERENCES packs(id),
  tasks_sha256 TEXT NOT NULL,
  tasks_path TEXT NOT NULL,
  settings TEXT NOT NULL,
  outcomes TEXT NOT NULL,
  n_passed INTEGER NOT NULL,
  n_tasks INTEGER NOT NULL,
  ci_low REAL NOT NULL,
  ci_high REAL NOT NULL,
  metrics TEXT,
  created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS gates (
  id INTEGER PRIMARY KEY,
  candidate_id INTEGER NOT NULL REFERENCES packs(id),
  baseline_id INTEGER NOT NULL REFERENCES packs(id),
  rule TEXT NOT NULL,
  decision TEXT NOT NULL,
  regressed TEXT NOT NULL,
  fixed TEXT NOT NULL,
  p_value REAL NOT NULL,
  reason TEXT NOT NULL,
  created INTEGER NOT NULL,
  metrics TEXT
);
CREATE TABLE IF NOT EXISTS production (
  id INTEGER PRIMARY KEY,
  pack_id INTEGER NOT NULL REFERENCES packs(id),
  reason TEXT NOT NULL,
  created INTEGER NOT NULL
);
"""


class RegistryError(KdkitError, RuntimeError):
    pass


class ProductionChanged(RegistryError):
    """Production moved while a gate ran: its decision was about another baseline."""


@dataclass
class Pack:
    id: int
    name: str
    path: str
    weights_sha256: str
    parent_id: int | None
    source_run: str | None
    status: str
    created: int

    @property
    def adapter(self) -> bool:
        """A LoRA adapter (evaluated through a server; never production: a KEEP promotes its merged pack)."""
        return (Path(self.path) / "adapter_config.json").is_file()


def _whole(p: Pack) -> None:
    if p.adapter:
        raise RegistryError(f"pack {p.name!r} is a LoRA adapter: production is a whole model (merge it: `kdkit merge "
                            f"RUN`; a gate with --server merges a KEEP's run itself)")


def _fault(point: str) -> None:
    kill_if(FAULT_ENV, point)


def _now() -> int:
    import time

    return int(time.time())


def _copy_read_only(src: Path, dst: Path) -> None:
    """Copy a model directory (never hard links: a later write to the source must not reach the pack)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for f in dst.rglob("*"):
        if f.is_file():
            f.chmod(0o444)


class Registry:
    def __init__(self, workspace: str | Path = DEFAULT_WORKSPACE, *, create: bool = True) -> None:
        """Open the workspace; with ``create=False`` a missing one is an error instead of a new empty one."""
        self.workspace = Path(workspace)
        self.db_path = self.workspace / "registry.sqlite"
        if not create and not self.db_path.is_file():
            raise RegistryError(f"{self.workspace}: no kdkit workspace here (no registry.sqlite); it is created by "
                                f"`kdkit registry promote` (check --workspace / KDKIT_WORKSPACE)")
        self.workspace.mkdir(parents=True, exist_ok=True)
        remove_dead_writers(self.workspace / "packs")  # a copy a killed `registry promote` left half-written
        self._verified: set[int] = set()  # packs whose weights were re-hashed by this process
        self.conn = sqlite3.connect(str(self.db_path), isolation_level=None, timeout=30)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.executescript(SCHEMA)
        if "metrics" not in {r["name"] for r in self.conn.execute("PRAGMA table_info(gates)")}:
            self.conn.execute("ALTER TABLE gates ADD COLUMN metrics TEXT")  # a workspace of an earlier kdkit

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; rolled back on any exception (and by SQLite itself after a crash)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ packs

    def _row_pack(self, r: sqlite3.Row | None) -> Pack | None:
        if r is None:
            return None
        return Pack(r["id"], r["name"], r["path"], r["weights_sha256"], r["parent_id"], r["source_run"], r["status"],
                    r["created"])

    def pack(self, ref: str | int) -> Pack:
        """A pack by id, name, or path of a registered directory."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            r = self.conn.execute("SELECT * FROM packs WHERE id = ?", (int(ref),)).fetchone()
        else:
            r = self.conn.execute("SELECT * FROM packs WHERE name = ?", (ref,)).fetchone()
        p = self._row_pack(r)
        if p is None:
            raise RegistryError(f"no pack {ref!r} in {self.db_path} (see `kdkit registry list`)")
        return p

    def find_by_sha(self, sha: str) -> Pack | None:
        return self._row_pack(self.conn.execute("SELECT * FROM packs WHERE weights_sha256 = ? ORDER BY id DESC",
                                                (sha,)).fetchone())

    def register(self, path: str | Path, *, name: str | None = None, parent_id: int | None = None,
                 source_run: str | None = None, config: str | None = None) -> Pack:
        """Add a model dir as a pack (a read-only copy in the workspace). The same files → the existing pack."""
        src = Path(path)
        if not (src / "config.json").is_file() and not (src / "adapter_config.json").is_file():
            raise RegistryError(f"{src}: not a Hugging Face model directory (no config.json) nor a LoRA adapter")
        sha = path_identity(src)["sha256"]  # everything that changes what it generates, not the weights alone
        existing = self.find_by_sha(sha)
        if existing is not None:
            return existing
        name = name or src.resolve().name
        base, i = name, 1
        while self.conn.execute("SELECT 1 FROM packs WHERE name = ?", (name,)).fetchone():
            i += 1
            name = f"{base}-{i}"
        dst = self.workspace / "packs" / sha[:16]
        if not dst.exists():
            tmp = dst.with_name(f".tmp-{dst.name}-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            _copy_read_only(src, tmp)
            if path_identity(tmp)["sha256"] != sha:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RegistryError(f"{src}: its files changed while they were being copied; register it again")
            tmp.rename(dst)
        with self.tx() as c:
            cur = c.execute("INSERT INTO packs (name, path, weights_sha256, parent_id, source_run, config, created) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, str(dst.resolve()), sha, parent_id, source_run,
                                                             config, _now()))
            pid = cur.lastrowid
        return self.pack(pid)

    def check_weights(self, pack: Pack) -> Pack:
        """Re-hash a pack's stored files (once per process); refuse a pack changed behind the registry's back."""
        if pack.id in self._verified:
            return pack
        try:
            sha = path_identity(pack.path)["sha256"]
        except Exception as e:  # a deleted or unreadable pack directory
            raise RegistryError(f"pack {pack.name!r} ({pack.path}) cannot be read: {e}") from None
        if sha != pack.weights_sha256 and model_fingerprint(pack.path)["sha256"] == pack.weights_sha256:
            # registered by a kdkit that identified packs by their weights alone: from now on, by every file
            with self.tx() as c:
                c.execute("UPDATE packs SET weights_sha256 = ? WHERE id = ?", (sha, pack.id))
            pack = self.pack(pack.id)
        if sha != pack.weights_sha256:
            raise RegistryError(
                f"pack {pack.name!r} ({pack.path}) no longer matches its registered files (weights, tokenizer, chat "
                f"template, generation config) "
                f"(sha256 {sha[:12]}… on disk, {pack.weights_sha256[:12]}… registered): it was modified outside "
                f"kdkit; its evaluations are not reused and it cannot be promoted — register the model again")
        self._verified.add(pack.id)
        return pack

    def packs(self) -> list[Pack]:
        return [self._row_pack(r) for r in self.conn.execute("SELECT * FROM packs ORDER BY id")]

    # ------------------------------------------------------------------ production

    def production(self) -> Pack | None:
        r = self.conn.execute("SELECT pack_id FROM production ORDER BY id DESC LIMIT 1").fetchone()
        return None if r is None else self.pack(int(r["pack_id"]))

    def production_history(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM production ORDER BY id")]

    def promote(self, ref: str | int, reason: str = "promote") -> Pack:
        p = self.check_weights(self.pack(ref))
        _whole(p)
        with self.tx() as c:
            c.execute("UPDATE packs SET status = 'active' WHERE id = ?", (p.id,))
            _fault("promote:between")
            c.execute("INSERT INTO production (pack_id, reason, created) VALUES (?, ?, ?)", (p.id, reason, _now()))
            _fault("promote:before_commit")
        return p

    def rollback(self) -> Pack:
        hist = self.production_history()
        if len(hist) < 2:
            raise RegistryError("no earlier production to roll back to")
        current = hist[-1]["pack_id"]
        previous = next((h["pack_id"] for h in reversed(hist[:-1]) if h["pack_id"] != current), None)
        if previous is None:
            raise RegistryError("every earlier production is the current pack; nothing to roll back to")
        return self.promote(int(previous), reason=f"rollback from pack {current}")

    def archive(self, ref: str | int) -> Pack:
        p = self.pack(ref)
        prod = self.production()
        if prod is not None and prod.id == p.id:
            raise RegistryError(f"pack {p.name!r} is production; promote or roll back another pack first")
        with self.tx() as c:
            c.execute("UPDATE packs SET status = 'archived' WHERE id = ?", (p.id,))
        return self.pack(p.id)

    # ------------------------------------------------------------------ evaluations and gates

    def find_evaluation(self, pack_id: int, tasks_sha: str, settings: str) -> dict[str, Any] | None:
        r = self.conn.execute("SELECT * FROM evaluations WHERE pack_id = ? AND tasks_sha256 = ? AND settings = ? "
                              "ORDER BY id DESC LIMIT 1", (pack_id, tasks_sha, settings)).fetchone()
        return None if r is None else _eval_dict(r)

    def add_evaluation(self, pack_id: int, tasks_sha: str, tasks_path: str, settings: str, outcomes: dict[str, bool],
                       interval: tuple[float, float], metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO evaluations (pack_id, tasks_sha256, tasks_path, settings, outcomes, n_passed, n_tasks, "
                "ci_low, ci_high, metrics, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pack_id, tasks_sha, tasks_path, settings, json.dumps(outcomes, sort_keys=True),
                 sum(outcomes.values()), len(outcomes), interval[0], interval[1], json.dumps(metrics or {}), _now()))
            eid = cur.lastrowid
        return _eval_dict(self.conn.execute("SELECT * FROM evaluations WHERE id = ?", (eid,)).fetchone())

    def _production_id(self, c: sqlite3.Connection) -> int | None:
        r = c.execute("SELECT pack_id FROM production ORDER BY id DESC LIMIT 1").fetchone()
        return None if r is None else int(r["pack_id"])

    def record_gate(self, candidate_id: int, baseline_id: int, rule: dict[str, Any], decision: str,
                    regressed: list[str], fixed: list[str], p_value: float, reason: str, *,
                    expected_production: int | None, metrics: dict[str, Any] | None = None) -> int:
        """Record the decision and apply it (KEEP → promote, REVERT → archive, UNDECIDED → neither) in ONE
        transaction.

        ``expected_production`` is the production pack id seen when the gate started: if another
        process changed production since, nothing is recorded and :class:`ProductionChanged` is raised.
        ``metrics``: what the gate measured beside its decision (each suite's figures, the drift)."""
        if decision not in ("KEEP", "REVERT", "UNDECIDED"):
            raise ValueError(decision)
        if decision == "KEEP":
            _whole(self.check_weights(self.pack(candidate_id)))
        with self.tx() as c:
            now = self._production_id(c)
            if now != expected_production:
                names = {i: self.pack(i).name if i is not None else "none" for i in (now, expected_production)}
                raise ProductionChanged(
                    f"production changed from {names[expected_production]!r} to {names[now]!r} while this gate ran "
                    f"(another gate or promote on {self.workspace}); nothing was recorded — gate again against the "
                    f"new production")
            cur = c.execute(
                "INSERT INTO gates (candidate_id, baseline_id, rule, decision, regressed, fixed, p_value, reason, "
                "created, metrics) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (candidate_id, baseline_id, json.dumps(rule, sort_keys=True), decision, json.dumps(regressed),
                 json.dumps(fixed), p_value, reason, _now(), json.dumps(metrics or {}, sort_keys=True)))
            _fault("gate:after_insert")
            if decision == "KEEP":
                c.execute("UPDATE packs SET status = 'active' WHERE id = ?", (candidate_id,))
                how = "UNDECIDED, promoted as asked" if rule.get("promote_undecided") else "KEEP"
                c.execute("INSERT INTO production (pack_id, reason, created) VALUES (?, ?, ?)",
                          (candidate_id, f"gate {cur.lastrowid}: {how}", _now()))
            elif decision == "REVERT":
                c.execute("UPDATE packs SET status = 'archived' WHERE id = ?", (candidate_id,))
            _fault("gate:before_commit")
            return int(cur.lastrowid)

    def gates(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM gates ORDER BY id")]

    def pack_config(self, pack_id: int) -> str | None:
        """The training config a pack was registered with (its run's resolved config.yaml), if any."""
        r = self.conn.execute("SELECT config FROM packs WHERE id = ?", (pack_id,)).fetchone()
        return None if r is None else r["config"]

    def evaluations(self, pack_id: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM evaluations" + (" WHERE pack_id = ?" if pack_id is not None else "") + " ORDER BY id"
        return [_eval_dict(r) for r in self.conn.execute(q, (pack_id,) if pack_id is not None else ())]


def _eval_dict(r: sqlite3.Row) -> dict[str, Any]:
    d = dict(r)
    d["outcomes"] = json.loads(d["outcomes"])
    d["metrics"] = json.loads(d["metrics"] or "{}")
    return d
