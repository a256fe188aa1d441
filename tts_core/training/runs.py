"""Run directories: the resume protocol, checkpoint directories published atomically, metrics rows.

A kill -9 at any moment leaves the previous checkpoint intact: a checkpoint directory is written under a
temporary name and renamed, then the run's pointer file (``latest.json``) is atomically moved to it; the
newest ``keep`` are kept. Metrics rows are JSON lines; a resume first drops the rows logged after the
checkpoint it continues from, so a resumed run re-logs them instead of doubling them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from tts_core.atomic_files import atomic_write_json, atomic_write_text
from tts_core.checkpoint import ResumeMismatchError


# ---- resume protocol ---------------------------------------------------------------------------------------
def config_changes(then: dict, now: dict, keys, default: dict | None = None) -> list[str]:
    """One line per run-defining key whose value differs (a key the saved config lacks counts as its
    ``default`` value: fields added later do not orphan older runs)."""
    default = default or {}
    return [f"{k}: {then.get(k, default.get(k))!r} then, {now.get(k)!r} now" for k in keys
            if then.get(k, default.get(k)) != now.get(k)]


def refuse_other_run(path: Path, problems: list[str]) -> None:
    """Raise `ResumeMismatchError` when ``problems`` is not empty: the directory holds another run."""
    if problems:
        raise ResumeMismatchError(f"cannot resume {path}: it is another run — " + "; ".join(problems)
                                  + ". Use a new out_dir, or resume=False to start over in this one.")


# ---- checkpoint directories ----------------------------------------------------------------------------------
class CheckpointDir:
    """``root/checkpoints/step_XXXXXXXX/`` directories and the ``root/latest.json`` pointer (module doc)."""

    def __init__(self, root: Path, latest: str = "latest.json", complete: tuple[str, ...] = ()):
        self.root, self.latest_file, self.complete = Path(root), latest, complete
        self.dir = self.root / "checkpoints"

    def latest(self) -> Path | None:
        """The checkpoint the pointer names, if every file of ``complete`` is in it."""
        f = self.root / self.latest_file
        if not f.is_file():
            return None
        d = self.root / json.loads(f.read_text())["checkpoint"]
        return d if all((d / name).is_file() for name in self.complete) else None

    def write(self, step: int, fill: Callable[[Path], None], keep: int) -> Path:
        """``fill(tmp_dir)`` writes the files; the directory is then renamed into place, the pointer moved,
        and all but the newest ``keep`` (and temporary dirs of killed writers) removed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:08d}"
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fill(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_json(self.root / self.latest_file, {"checkpoint": f"checkpoints/{name}", "step": step})
        done = sorted(p for p in self.dir.iterdir() if p.name.startswith("step_"))
        for p in done[:-max(keep, 1)]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.iterdir():
            if p.name.startswith(".tmp-") and p != tmp:
                shutil.rmtree(p, ignore_errors=True)
        return final

    def clear(self, run_files: tuple[str, ...]) -> None:
        """A fresh start in an existing directory: no stale checkpoints, pointer or ``run_files``."""
        shutil.rmtree(self.dir, ignore_errors=True)
        for name in (self.latest_file, *run_files):
            (self.root / name).unlink(missing_ok=True)


# ---- metrics rows --------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                pass
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (the checkpoint a resume continues from)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_metrics_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
