"""Stage 2's batches: length-bucketed, shuffled, world-size-independent global batches, sharded over ranks.

Per epoch the rows are shuffled (seed, epoch), cut into pools of ``pool_batches`` batches, each pool
sorted by sequence length (34 conditioning + text + 2 + speech + 2), cut into batches — a fixed
``batch_size``, or greedily under a token budget ``max_tokens`` (rows × longest row ≤ budget, at most
``batch_size`` rows) — and the batch order shuffled. Padding therefore costs few tokens while the
order stays random. The list of global batches depends only on (seed, epoch), never on the world
size. Sharding: at training step ``s`` of an epoch, rank ``r`` of ``W`` takes global batch
``position + r`` where ``position`` counts the global batches already consumed in the epoch (it
advances by W per step). Every row is used exactly once per epoch; in the last round, ranks left
without a batch re-run batch ``g mod n`` with loss weight 0 (DDP needs every rank to step).
Because the position is counted in global batches, a resume with another world size continues the
same epoch where it stopped.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from tts_core.seeds import mix_seed

log = logging.getLogger(__name__)


class BucketBatchSampler:
    """Length-bucketed, shuffled, world-size-independent global batches (module doc)."""

    def __init__(self, lengths: np.ndarray, *, batch_size: int, max_tokens: int = 0, pool_batches: int = 64,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError("batch_size must be ≥ 1")
        self.lengths = np.asarray(lengths, np.int64)
        self.batch_size = int(batch_size)
        self.max_tokens = int(max_tokens or 0)
        self.pool_batches = max(int(pool_batches), 1)
        self.seed = int(seed)
        self._cache: tuple[int, list[np.ndarray]] | None = None
        if self.max_tokens and len(self.lengths) and int(self.lengths.max()) > self.max_tokens:
            log.warning("max_tokens %d is below the longest row (%d tokens): such rows get a batch of their own",
                        self.max_tokens, int(self.lengths.max()))

    def __len__(self) -> int:
        return len(self.batches(0))

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.lengths)
        rng = np.random.default_rng(mix_seed(self.seed, "order", epoch))
        perm = rng.permutation(n)
        pool = self.pool_batches * self.batch_size
        out: list[np.ndarray] = []
        for p in range(0, n, pool):
            idx = perm[p:p + pool]
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]
            if not self.max_tokens:
                out.extend(idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size))
                continue
            lens = self.lengths[idx]
            a = 0
            for i in range(1, len(idx) + 1):  # sorted ascending: the batch's longest row is the last one
                if i == len(idx) or (i + 1 - a) * lens[i] > self.max_tokens or i - a >= self.batch_size:
                    out.append(idx[a:i])
                    a = i
        order = rng.permutation(len(out))
        batches = [out[i] for i in order]
        self._cache = (epoch, batches)
        return batches

    def steps_in_epoch(self, epoch: int, world_size: int, position: int = 0) -> int:
        return max(0, math.ceil((len(self.batches(epoch)) - position) / world_size))

    def rank_batch(self, epoch: int, position: int, rank: int, world_size: int) -> tuple[int, np.ndarray, float]:
        """(global batch index, rows, loss weight) of ``rank`` for the step starting at ``position``."""
        batches = self.batches(epoch)
        g = position + rank
        if g < len(batches):
            return g, batches[g], 1.0
        return g, batches[g % len(batches)], 0.0

    def padding_stats(self, epoch: int = 0) -> dict:
        real = padded = 0
        for b in self.batches(epoch):
            L = self.lengths[b]
            real += int(L.sum())
            padded += int(len(b) * L.max(initial=0))
        return {"real_tokens": real, "padded_tokens": padded, "pad_frac": 1 - real / max(padded, 1)}
