"""Stage-1 training data on the device, and each batch as a pure function of (seed, phase, epoch, index).

`Stage1Tables` holds what training indexes: the per-clip vectors and instruction ids, the train and
held-out rows, the instruction-states source (`tts_core.stage1.states`) and the held-out instructions'
states. `Stage1Batches.get(phase, epoch, b)` is batch ``b`` of that epoch, and nothing else is state: a
resume that knows (phase, epoch, b) replays the very same batches.

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

import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cache.chunked import block_window_order
from tts_core.stage1.data import Stage1Data
from tts_core.stage1.states import InstructionStates


def mix_seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "big") >> 1


def epoch_perm(seed: int, phase: str, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(mix_seed(seed, phase, epoch))
    return torch.randperm(n, generator=g).to(device)


@dataclass
class Stage1Tables:
    spk: torch.Tensor  # [N, 256] (device)
    xvec: torch.Tensor  # [N, 192] (device)
    iid: torch.Tensor  # [N] (device)
    states: InstructionStates  # on the device when in memory
    train_rows: torch.Tensor  # (device)
    val_rows: torch.Tensor  # (device)
    val_states: InstructionStates  # the held-out instructions as ids 0..k-1
    val_inv: torch.Tensor  # [n_val] held-out row → its instruction in val_states (device)
    iid_host: np.ndarray  # [N] int64
    train_rows_host: np.ndarray

    @classmethod
    def build(cls, data: Stage1Data, train_rows: np.ndarray, val_rows: np.ndarray, device: torch.device,
              eval_in_memory_mb: float = 2048) -> "Stage1Tables":
        """Move the tables to ``device``; held-out states are read into memory when they fit ``eval_in_memory_mb``."""
        states = data.states.to(device)
        val_uniq, val_inv = torch.unique(data.instruction_id[torch.from_numpy(val_rows)], return_inverse=True)
        return cls(
            spk=data.spk.to(device), xvec=data.xvec.to(device), iid=data.instruction_id.to(device), states=states,
            train_rows=torch.from_numpy(train_rows).to(device), val_rows=torch.from_numpy(val_rows).to(device),
            val_states=states.subset(val_uniq.numpy(), int(eval_in_memory_mb * 2 ** 20)), val_inv=val_inv.to(device),
            iid_host=data.instruction_id.numpy(), train_rows_host=np.asarray(train_rows, np.int64))


@dataclass
class Stage1Batch:
    rows: torch.Tensor  # [B] data rows (device)
    spk: torch.Tensor
    xvec: torch.Tensor
    states: torch.Tensor  # [B, W, H] zero-padded instruction states
    lengths: torch.Tensor  # [B]

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
        self._orders: dict[tuple[str, int], object] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[tuple[str, int, int], Future] | None = None
        if self.streamed:
            self.blocks = tables.states.block_of[tables.iid_host[tables.train_rows_host]]
            self.window = tables.states.window_blocks

    def order(self, phase: str, epoch: int):
        """Positions into the train rows, in this epoch's order (device tensor, or numpy when streamed)."""
        key = (phase, epoch)
        order = self._orders.get(key)
        if order is None:
            if self.streamed:
                rng = np.random.default_rng(mix_seed(self.seed, phase, epoch, "blocks"))
                order = block_window_order(self.blocks, self.window, rng)
            else:
                order = epoch_perm(self.seed, phase, epoch, self.n_train, self.t.train_rows.device)
            keep = {k: v for k, v in self._orders.items() if k[0] == phase and k[1] >= epoch - 1}
            self._orders = {**keep, key: order}  # one assignment: the read-ahead thread may look too
        return order

    def _make(self, phase: str, epoch: int, b: int) -> Stage1Batch:
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        t = self.t
        if self.streamed:  # row ids on the host: the store is read there
            rows = t.train_rows_host[self.order(phase, epoch)[sl]]
            idx = torch.from_numpy(rows).to(t.spk.device)
            states, lengths = t.states.gather(t.iid_host[rows])
        else:
            idx = t.train_rows[self.order(phase, epoch)[sl]]
            states, lengths = t.states.gather(t.iid[idx])
        return Stage1Batch(idx, t.spk[idx], t.xvec[idx], states, lengths)

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
