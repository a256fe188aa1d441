"""Read a finished cache store: per-clip tables whole, instruction states per batch, a torch Dataset per clip.

Only OK rows are visible; positions 0..n_ok-1 index them ("rows" below). L2 normalisation is
applied here, as the store is configured (or as the caller overrides), so the raw values on disk
are never changed. Zarr handles are opened lazily per process, so DataLoader workers are safe.

Instruction states (ragged: flat ``[S, H]`` + offsets) are never loaded whole by default: at 300k
unique instructions × flan-t5-large they are 12–15 GB even unpadded. They are read through a
per-process LRU of decompressed chunks (`cache.chunked.ChunkCache`, ``states_cache_mb``), which
makes random access fast when consecutive reads share chunks — `ChunkAwareSampler` orders a
`CacheDataset` that way.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
from functools import cached_property
from typing import Sequence

import fsspec
import numpy as np
import pandas as pd
import torch

from cache import schema
from cache.captions import CaptionTable
from cache.chunked import ChunkCache, block_window_order
from cache.store import CORRUPTED, MISSING, StoreError, StoreInfo, check_complete, damaged, io_error, open_group

DEFAULT_STATES_CACHE_MB = 256


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


class CacheReader:
    def __init__(self, url: str, normalisation: schema.Normalisation | None = None, require_complete: bool = True,
                 states_cache_mb: float = DEFAULT_STATES_CACHE_MB):
        self.url = url.rstrip("/")
        self.states_cache_mb = states_cache_mb
        self._pid = None
        self._g = None
        self._strict = False
        self.info = StoreInfo.from_attrs(self.url, self.group.attrs.asdict())
        if require_complete and not self.info.complete:
            raise StoreError(f"{self.url} is not complete (build interrupted?); rerun the same build-cache command to finish it")
        if self.info.complete:  # every chunk exists: from here on a missing one is damage, not fill values
            self._strict, self._g = True, None
            check_complete(self.url, self.group, self.info)
        self.normalisation = normalisation or self.info.normalisation
        status = self.group["clips/status"][:]
        self.ok_index = np.flatnonzero(status == schema.STATUS_OK)  # store row of each OK position

    @property
    def group(self):
        if self._g is None or self._pid != os.getpid():
            self._g, self._pid = open_group(self.url, "r", strict=self._strict), os.getpid()
        return self._g

    def __getstate__(self):  # zarr handles are not shared across processes
        d = self.__dict__.copy()
        d["_g"] = None
        for k in ("_tokens_arr", "_tokens_pid", "_states_cache"):
            d.pop(k, None)
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
    def captions(self) -> CaptionTable:
        """Each OK clip's instructions, its own line's first, then its other captions' (schema: clips/clip_row)."""
        g = self.group
        return CaptionTable.from_store_rows(g["clips/status"][:], g["clips/clip_row"][:],
                                            g["clips/instruction_id"][:], schema.STATUS_OK, schema.STATUS_CAPTION)

    @cached_property
    def manifest(self) -> pd.DataFrame:
        """Every data line of the metadata, OK or quarantined, in row order (checked against the hash
        recorded when the store was finalised)."""
        path = f"{self.url}/{schema.MANIFEST_FILE}"
        try:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise damaged(self.url, path, MISSING) from None
        except OSError as exc:
            raise io_error(path, exc) from None
        if self.info.manifest_sha256 is not None and hashlib.sha256(data).hexdigest() != self.info.manifest_sha256:
            raise damaged(self.url, path, CORRUPTED)
        return pd.read_parquet(io.BytesIO(data))

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
    def instruction_offsets(self) -> np.ndarray:
        """int64 [U + 1]: states of instruction i are rows [off[i], off[i+1]) of ``instructions/states``."""
        return np.asarray(self.group[schema.INSTRUCTION_OFFSETS][:], np.int64)

    @property
    def n_instructions(self) -> int:
        return self.info.n_instructions

    @cached_property
    def instruction_lengths(self) -> np.ndarray:
        """int64 [U]: number of state rows (text tokens) of each instruction."""
        return np.diff(self.instruction_offsets).astype(np.int64)

    @property
    def states_cache(self) -> ChunkCache:
        """This process's LRU of decompressed ``instructions/states`` chunks (``states_cache_mb``)."""
        c = self.__dict__.get("_states_cache")
        if c is None or c.pid != os.getpid() or c.capacity_bytes != int(self.states_cache_mb * 2 ** 20):
            c = self.__dict__["_states_cache"] = ChunkCache(self.group[schema.INSTRUCTION_STATES], self.states_cache_mb)
        return c

    def instruction_blocks(self, block_chunks: int = 1) -> np.ndarray:
        """int64 [U]: the block of ``block_chunks`` state chunks where each instruction's states start
        (what `cache.chunked.block_window_order` groups by)."""
        return self.instruction_offsets[:-1] // (self.states_cache.chunk_rows * max(int(block_chunks), 1))

    def _state_rows(self, i: int) -> np.ndarray:
        off = self.instruction_offsets
        if i < 0:  # a clip without an instruction
            return np.zeros((0, self.text_hidden_size), schema.STATE_DTYPE)
        return self.states_cache.rows(int(off[i]), int(off[i + 1]))

    def instruction_states(self, ids: Sequence[int]) -> list[np.ndarray]:
        """float32 [L_i, H] per instruction id (id −1: empty)."""
        return [self._state_rows(int(i)).astype(np.float32) for i in ids]

    def instruction_states_batch(self, ids: Sequence[int], width: int | None = None
                                 ) -> tuple[np.ndarray, np.ndarray]:
        """(float16 [B, W, H] zero-padded, int64 lengths [B]) for a batch of instruction ids (−1: empty).

        ``W`` = the batch's longest instruction unless ``width`` is given. Reads go in store order, so
        each chunk is decompressed at most once per batch (and not at all when the cache holds it)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        lens = np.where(ids >= 0, self.instruction_lengths[ids], 0) if len(ids) else np.zeros(0, np.int64)
        W = int(lens.max(initial=0)) if width is None else int(width)
        if len(ids) and int(lens.max()) > W:
            raise ValueError(f"width {W} is shorter than the longest instruction of the batch ({int(lens.max())})")
        out = np.zeros((len(ids), W, self.text_hidden_size), dtype=schema.STATE_DTYPE)
        for k in np.argsort(self.instruction_offsets[ids], kind="stable"):
            if lens[k]:
                out[k, :lens[k]] = self._state_rows(int(ids[k]))
        return out, lens

    def instruction_states_padded(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(float16 [U, Lmax, H], int64 lengths [U]) — the padded table of ``ids`` (default: all).

        Small stores and tests only: at 300k unique flan-t5-large instructions this is ~17 GB. Training
        gathers per batch instead (`instruction_states_batch`, `tts_core.stage1.states`)."""
        return self.instruction_states_batch(np.arange(self.n_instructions) if ids is None else ids)

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
    """One item per OK clip: vectors (normalised as configured), tokens, instruction states (float16, the
    store's dtype: cast where you pool). The instruction is the clip's own line's; its other captions are
    in ``reader.captions`` (the training recipes draw among them, tts_core.stage1 / stage2).

    States come through the reader's chunk cache: fast when consecutive items share chunks
    (`ChunkAwareSampler`), a chunk decompression (~10 ms) per item in a uniform random order. Iterate it
    with `loader` (worker processes started safely), not a bare DataLoader; batch in the workers
    (``collate_fn=CacheDataset.collate``): one transfer per batch."""

    def __init__(self, reader: CacheReader):
        self.r = reader
        self.spk = torch.from_numpy(reader.spk_emb())
        self.xvec = torch.from_numpy(reader.xvec())
        self.inst = reader.instruction_id()
        self.clip_ids = reader.ok_manifest.clip_id.tolist()

    def __len__(self) -> int:
        return len(self.r)

    def __getitem__(self, i: int) -> dict:
        k = int(self.inst[i])
        return {
            "clip_id": self.clip_ids[i],
            "spk_emb": self.spk[i],
            "xvec": self.xvec[i],
            "instruction_id": k,
            "instruction_states": torch.from_numpy(np.array(self.r._state_rows(k))),  # a copy: views pin chunks
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

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """Items → one batch: vectors stacked; states and speech tokens zero-padded, with their lengths."""
        states, tokens = [it["instruction_states"] for it in items], [it["speech_tokens"] for it in items]
        return {
            "clip_id": [it["clip_id"] for it in items],
            "spk_emb": torch.stack([it["spk_emb"] for it in items]),
            "xvec": torch.stack([it["xvec"] for it in items]),
            "instruction_id": torch.tensor([it["instruction_id"] for it in items]),
            "instruction_states": _pad(states),
            "instruction_lengths": torch.tensor([len(s) for s in states]),
            "speech_tokens": _pad(tokens),
            "speech_lengths": torch.tensor([len(t) for t in tokens]),
        }


def _pad(seqs: list[torch.Tensor]) -> torch.Tensor:
    """[L_i, ...] tensors → [B, max L_i, ...] zero-padded (numpy copies, zeroing only the padding: several
    times faster than pad_sequence in float16)."""
    if not seqs:
        return torch.zeros(0, 0)
    W = max(len(s) for s in seqs)
    out = np.empty((len(seqs), W, *seqs[0].shape[1:]), dtype=seqs[0].numpy().dtype)
    for k, s in enumerate(seqs):
        out[k, :len(s)] = s.numpy()
        out[k, len(s):] = 0
    return torch.from_numpy(out)


class ChunkAwareSampler(torch.utils.data.Sampler[int]):
    """A shuffled order of a `CacheDataset` in which neighbouring items read the same state chunks.

    Blocks of ``block_chunks`` consecutive state chunks are shuffled and read ``window`` blocks at a
    time, items shuffled within the window (`cache.chunked.block_window_order`). ``window`` defaults to
    what half the reader's chunk cache holds, so each chunk is decompressed about once per epoch. Give
    the DataLoader's ``num_workers`` and ``batch_size``: each worker then gets batches of its own windows
    (every chunk decompressed once in total, the workers in parallel). The order is a function of
    (seed, epoch) alone; call `set_epoch` like a DistributedSampler."""

    def __init__(self, dataset: CacheDataset, *, window: int | None = None, block_chunks: int = 4, seed: int = 0,
                 num_workers: int = 0, batch_size: int = 1):
        self.n = len(dataset)
        iid = np.asarray(dataset.inst, np.int64)
        blocks = dataset.r.instruction_blocks(block_chunks)
        self.blocks = np.where(iid >= 0, blocks[np.clip(iid, 0, None)] if len(blocks) else 0, -1)
        self.window = window or max(1, dataset.r.states_cache.capacity_chunks // (2 * block_chunks))
        self.streams, self.run = max(int(num_workers), 1), max(int(batch_size), 1)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter(block_window_order(self.blocks, self.window, rng, self.streams, self.run).tolist())
