"""Stage-1 training data on the device, and each batch as a pure function of (seed, phase, epoch, index).

`Stage1Tables` holds what training indexes: the per-clip vectors and instruction ids, the train clips
with their training captions, the held-out (clip, caption) pairs, the instruction-states source (`tts_core.stage1.states`) and the held-out instructions'
states. `Stage1Batches.get(phase, epoch, b)` is batch ``b`` of that epoch, and nothing else is state: a
resume that knows (phase, epoch, b) replays the very same batches.

Captions
--------
Each train clip is one item per epoch, whatever its number of captions; its caption in epoch ``e`` is
``(start + e) mod k`` among its ``k`` training captions, ``start`` a seeded draw per clip and phase. So
every caption is seen once in any ``k`` consecutive epochs, the wordings of one epoch are mixed, and the
choice is a pure function of (seed, phase, epoch) like the order (a resume replays it).

Order of an epoch
-----------------
* States in memory (the ragged table fits ``states_in_memory_mb``): a uniform permutation of the train
  rows seeded by (seed, phase, epoch); a batch is index ops on the device.
* States streamed from the store: `cache.chunked.block_window_order` over the storage block of each
  row's instruction (blocks of 4 store chunks, ~700 instructions at ~24 tokens each), ``window`` blocks
  at a time (half the chunk cache), rows shuffled within the window; one batch of read-ahead runs in a
  background thread. Each chunk is then decompressed about once per epoch, where a uniform order would
  decompress several chunks per *row*. The trade-off: a batch holds rows of ``window`` random regions of
  the store rather than of the whole store. Store order is metadata line order; with the default 1 GB
  cache and flan-t5-large a window spans ~11k instructions in 16 places, and gradient noise is then that
  of a uniform shuffle unless the metadata is sorted by something the mapper learns (e.g. by speaker) —
  shuffle such metadata once before build-cache, or raise ``states_cache_mb``.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cache.captions import CaptionTable
from cache.chunked import block_window_order
from tts_core.seeds import mix_seed
from tts_core.stage1.data import Stage1Data
from tts_core.stage1.states import InstructionStates


def epoch_perm(seed: int, phase: str, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(mix_seed(seed, phase, epoch))
    return torch.randperm(n, generator=g).to(device)


def caption_choice(seed: int, phase: str, epoch: int, captions: CaptionTable) -> np.ndarray:
    """[n] instruction id of each clip's caption this epoch (module doc); every clip has ≥ 1 caption."""
    off, counts = captions.offsets, captions.counts
    if not len(counts) or counts.max() == 1:
        return captions.ids[off[:-1]]
    start = np.random.default_rng(mix_seed(seed, phase, "captions")).integers(0, counts)
    return captions.ids[off[:-1] + (start + epoch) % counts]


@dataclass
class Stage1Tables:
    spk: torch.Tensor  # [N, 256] (device)
    xvec: torch.Tensor  # [N, 192] (device)
    states: InstructionStates  # on the device when in memory
    train_rows: torch.Tensor  # [n_train] train clips (device)
    val_rows: torch.Tensor  # [n_val] clip of each held-out (clip, caption) pair (device)
    val_states: InstructionStates  # the held-out instructions as ids 0..k-1
    val_inv: torch.Tensor  # [n_val] held-out pair → its instruction in val_states (device)
    train_rows_host: np.ndarray
    train_captions: CaptionTable  # [n_train] clips: each train clip's training captions

    @classmethod
    def build(cls, data: Stage1Data, train_caps: np.ndarray, val_caps: np.ndarray, device: torch.device,
              eval_in_memory_mb: float = 2048) -> "Stage1Tables":
        """Move the tables to ``device``; held-out states are read into memory when they fit ``eval_in_memory_mb``.
        ``train_caps`` / ``val_caps``: caption indices (`Stage1Data.split`)."""
        states = data.states.to(device)
        train_rows, train_captions = data.train_captions(train_caps)
        val_caps = np.asarray(val_caps, np.int64)
        val_uniq, val_inv = torch.unique(torch.from_numpy(data.captions.ids[val_caps]), return_inverse=True)
        return cls(
            spk=data.spk.to(device), xvec=data.xvec.to(device), states=states,
            train_rows=torch.from_numpy(train_rows).to(device),
            val_rows=torch.from_numpy(data.captions.clip_of[val_caps]).to(device),
            val_states=states.subset(val_uniq.numpy(), int(eval_in_memory_mb * 2 ** 20)), val_inv=val_inv.to(device),
            train_rows_host=train_rows, train_captions=train_captions)


@dataclass
class Stage1Batch:
    rows: torch.Tensor  # [B] data rows (device)
    spk: torch.Tensor
    xvec: torch.Tensor
    states: torch.Tensor  # [B, W, H] zero-padded instruction states
    lengths: torch.Tensor  # [B]
    instruction_id: torch.Tensor | None = None  # [B] the caption drawn for each row this epoch

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])


class Stage1Batches:
    """The training batches of one run (module doc). ``get`` is pure; read-ahead only saves time."""

    def __init__(self, tables: Stage1Tables, batch_size: int, seed: int):
        self.t, self.batch_size, self.seed = tables, int(batch_size), int(seed)
        self.n_train = len(tables.train_rows_host)
        self.n_batches = math.ceil(self.n_train / self.batch_size)
        self.streamed = tables.states.streamed
        self._orders: dict[tuple[str, int], tuple] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[tuple[str, int, int], Future] | None = None
        if self.streamed:
            self.window = tables.states.window_blocks

    def order(self, phase: str, epoch: int) -> tuple:
        """(positions into the train rows in this epoch's order — a device tensor, or numpy when streamed —,
        the instruction id of each train row this epoch: host numpy and device tensor)."""
        key = (phase, epoch)
        order = self._orders.get(key)
        if order is None:
            t = self.t
            iid = caption_choice(self.seed, phase, epoch, t.train_captions)
            if self.streamed:
                rng = np.random.default_rng(mix_seed(self.seed, phase, epoch, "blocks"))
                perm = block_window_order(t.states.block_of[iid], self.window, rng)
            else:
                perm = epoch_perm(self.seed, phase, epoch, self.n_train, t.train_rows.device)
            order = (perm, iid, torch.from_numpy(iid).to(t.train_rows.device))
            keep = {k: v for k, v in self._orders.items() if k[0] == phase and k[1] >= epoch - 1}
            self._orders = {**keep, key: order}  # one assignment: the read-ahead thread may look too
        return order

    def _make(self, phase: str, epoch: int, b: int) -> Stage1Batch:
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        t = self.t
        perm, iid_host, iid = self.order(phase, epoch)
        if self.streamed:  # row ids on the host: the store is read there
            pos = perm[sl]
            idx = torch.from_numpy(t.train_rows_host[pos]).to(t.spk.device)
            states, lengths = t.states.gather(iid_host[pos])
        else:
            pos = perm[sl]
            idx = t.train_rows[pos]
            states, lengths = t.states.gather(iid[pos])
        return Stage1Batch(idx, t.spk[idx], t.xvec[idx], states, lengths, iid[torch.as_tensor(pos, device=iid.device)])

    def get(self, phase: str, epoch: int, b: int) -> Stage1Batch:
        """Batch ``b`` of (phase, epoch); streamed sources start reading the next one in the background."""
        if not self.streamed:
            return self._make(phase, epoch, b)
        key = (phase, epoch, b)
        batch = self._ahead[1].result() if self._ahead is not None and self._ahead[0] == key else None
        if batch is None:
            batch = self._make(phase, epoch, b)
        nxt = (phase, epoch, b + 1) if b + 1 < self.n_batches else (phase, epoch + 1, 0)
        self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="stage1-read-ahead")
        self._ahead = (nxt, self._pool.submit(self._make, *nxt))
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None
