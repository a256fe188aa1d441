"""Read a finished cache store: arrays for whole-table training, and a torch Dataset per clip.

Only OK rows are visible; positions 0..n_ok-1 index them ("rows" below). L2 normalisation is
applied here, as the store is configured (or as the caller overrides), so the raw values on disk
are never changed. Zarr handles are opened lazily per process, so DataLoader workers are safe.
"""
from __future__ import annotations

import multiprocessing
import os
from functools import cached_property
from typing import Sequence

import fsspec
import numpy as np
import pandas as pd
import torch

from cache import schema
from cache.store import StoreError, StoreInfo, open_group


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


class CacheReader:
    def __init__(self, url: str, normalisation: schema.Normalisation | None = None, require_complete: bool = True):
        self.url = url.rstrip("/")
        self._pid = None
        self._g = None
        self.info = StoreInfo.from_attrs(self.url, self.group.attrs.asdict())
        if require_complete and not self.info.complete:
            raise StoreError(f"{self.url} is not complete (build interrupted?); rerun the same build-cache command to finish it")
        self.normalisation = normalisation or self.info.normalisation
        status = self.group["clips/status"][:]
        self.ok_index = np.flatnonzero(status == schema.STATUS_OK)  # store row of each OK position

    @property
    def group(self):
        if self._g is None or self._pid != os.getpid():
            self._g, self._pid = open_group(self.url, "r"), os.getpid()
        return self._g

    def __getstate__(self):  # zarr handles are not shared across processes
        d = self.__dict__.copy()
        d["_g"] = None
        d.pop("_tokens_arr", None)
        d.pop("_tokens_pid", None)
        return d

    def __len__(self) -> int:
        return len(self.ok_index)

    @property
    def identities(self):
        return self.info.models

    @property
    def text_hidden_size(self) -> int:
        return self.info.text_hidden_size

    # ---- per-clip tables (loaded whole: 300k rows x 448 floats is ~0.5 GB) --------------------------
    def _rows(self, path: str, rows: Sequence[int] | None) -> np.ndarray:
        idx = self.ok_index if rows is None else self.ok_index[np.asarray(rows)]
        return self.group[path].get_orthogonal_selection((idx,)) if len(idx) else \
            np.zeros((0,) + self.group[path].shape[1:], self.group[path].dtype)

    def spk_emb(self, rows=None, raw: bool = False) -> np.ndarray:
        x = self._rows("clips/spk_emb", rows)
        return x if raw or not self.normalisation.spk_emb else l2_normalise(x)

    def xvec(self, rows=None, raw: bool = False) -> np.ndarray:
        x = self._rows("clips/xvec", rows)
        return x if raw or not self.normalisation.xvec else l2_normalise(x)

    def raw_norms(self, rows=None) -> tuple[np.ndarray, np.ndarray]:
        return self._rows("clips/spk_norm", rows), self._rows("clips/xvec_norm", rows)

    def instruction_id(self, rows=None) -> np.ndarray:
        return self._rows("clips/instruction_id", rows).astype(np.int64)

    def duration(self, rows=None) -> np.ndarray:
        return self._rows("clips/duration", rows)

    @cached_property
    def manifest(self) -> pd.DataFrame:
        """Every data line of the metadata, OK or quarantined, in row order."""
        with fsspec.open(f"{self.url}/{schema.MANIFEST_FILE}", "rb") as f:
            return pd.read_parquet(f)

    @cached_property
    def ok_manifest(self) -> pd.DataFrame:
        m = self.manifest
        return m[m.status == "ok"].reset_index(drop=True)

    # ---- ragged data ---------------------------------------------------------------------------
    @cached_property
    def _token_offsets(self) -> np.ndarray:
        return self.group[schema.TOKEN_OFFSETS][:]

    @property
    def _tokens(self) -> np.ndarray:
        # Loaded whole once per process: 300k clips x ~250 tokens x 2 bytes is ~150 MB.
        if self.__dict__.get("_tokens_pid") != os.getpid():
            self.__dict__["_tokens_arr"] = self.group[schema.TOKENS][:]
            self.__dict__["_tokens_pid"] = os.getpid()
        return self.__dict__["_tokens_arr"]

    def speech_tokens(self, row: int) -> np.ndarray:
        r = int(self.ok_index[row])
        off = self._token_offsets
        return self._tokens[off[r]:off[r + 1]].astype(np.int64)

    @cached_property
    def _state_offsets(self) -> np.ndarray:
        return self.group[schema.INSTRUCTION_OFFSETS][:]

    @property
    def n_instructions(self) -> int:
        return self.info.n_instructions

    def instruction_states(self, ids: Sequence[int]) -> list[np.ndarray]:
        """float32 [L_i, H] per instruction id."""
        off, arr = self._state_offsets, self.group[schema.INSTRUCTION_STATES]
        return [arr[off[i]:off[i + 1]].astype(np.float32) for i in ids]

    def instruction_states_padded(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(float16 [U, Lmax, H], int64 lengths [U]) — the whole table, for on-device training."""
        ids = np.arange(self.n_instructions) if ids is None else np.asarray(ids)
        off = self._state_offsets
        flat = self.group[schema.INSTRUCTION_STATES][:]
        lens = (off[ids + 1] - off[ids]).astype(np.int64)
        out = np.zeros((len(ids), int(lens.max(initial=0)), self.text_hidden_size), dtype=schema.STATE_DTYPE)
        for k, i in enumerate(ids):
            out[k, : lens[k]] = flat[off[i]:off[i + 1]]
        return out, lens

    @cached_property
    def instruction_texts(self) -> list[str]:
        """Text of each instruction id (from the manifest: ids are first-appearance order)."""
        m = self.manifest[self.manifest.instruction_id >= 0]
        first = m.drop_duplicates("instruction_id").sort_values("instruction_id")
        texts = [""] * self.n_instructions
        for i, t in zip(first.instruction_id, first.instruction):
            texts[int(i)] = t
        return texts


# How DataLoader workers start. Not "fork": a forked worker inherits the parent's threads' state and
# at-exit hooks, and once a Prefect flow has run in the parent (Prefect 3.7: its services' at-exit drain
# asserts in a fork child) every forked worker dies at exit with code 1 ("DataLoader worker exited
# unexpectedly"). Forkserver workers fork from a clean single-threaded server process that has imported
# this module (torch, zarr) once, so a worker starts in milliseconds; the reader reopens the store there.
WORKER_START_METHOD = "forkserver"


class CacheDataset(torch.utils.data.Dataset):
    """One item per OK clip: vectors (normalised as configured), tokens, instruction states.

    Iterate it with `loader` (worker processes started safely), not a bare DataLoader."""

    def __init__(self, reader: CacheReader):
        self.r = reader
        self.spk = torch.from_numpy(reader.spk_emb())
        self.xvec = torch.from_numpy(reader.xvec())
        self.inst = reader.instruction_id()
        self.clip_ids = reader.ok_manifest.clip_id.tolist()

    def __len__(self) -> int:
        return len(self.r)

    def __getitem__(self, i: int) -> dict:
        (states,) = self.r.instruction_states([int(self.inst[i])])
        return {
            "clip_id": self.clip_ids[i],
            "spk_emb": self.spk[i],
            "xvec": self.xvec[i],
            "instruction_id": int(self.inst[i]),
            "instruction_states": torch.from_numpy(states),
            "speech_tokens": torch.from_numpy(self.r.speech_tokens(i)),
        }

    def loader(self, **kw) -> torch.utils.data.DataLoader:
        """``DataLoader(self, **kw)`` whose worker processes (``num_workers > 0``) start by WORKER_START_METHOD."""
        if kw.get("num_workers", 0) > 0 and "multiprocessing_context" not in kw:
            ctx = multiprocessing.get_context(WORKER_START_METHOD)
            if WORKER_START_METHOD == "forkserver":
                ctx.set_forkserver_preload([__name__])  # takes effect when the server starts (once per process)
            kw["multiprocessing_context"] = ctx
        return torch.utils.data.DataLoader(self, **kw)
