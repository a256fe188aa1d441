"""Fast random access to a chunked, compressed Zarr array: an LRU of decompressed chunks, and an item
order whose neighbours share chunks.

Reading any row of a compressed array decompresses its whole chunk (``instructions/states``: 4096 rows
× H × 2 bytes, 8 MB at H=1024, ~8 ms), so a per-item read that goes to Zarr every time manages a few
dozen rows/s. `ChunkCache` keeps the last decompressed chunks of one array, bounded in MB, per process
(DataLoader workers each get their own). It helps only when consecutive reads share chunks:
`block_window_order` gives a shuffled order with that property (blocks of consecutive chunks are
shuffled, a window of blocks is read at a time, items are shuffled within the window).

Reads go through the Zarr array API (``arr[a:b]`` of whole chunks), so whatever codecs the store
uses apply unchanged; the store is read-only while read (`CacheReader` opens finished stores only),
so a cached chunk cannot go stale.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np


class ChunkCache:
    """Rows of one Zarr array (axis 0) through an LRU of its decompressed chunks, at most ``capacity_mb``.

    One chunk is always kept, whatever the capacity. Returned arrays are read-only views of cached
    chunks when a range lies in one chunk, else a fresh concatenation: copy what you keep (a view pins
    its whole chunk). Safe to share between threads (a training loop's prefetch thread and its evaluation)."""

    def __init__(self, array, capacity_mb: float):
        self.array = array
        self.chunk_rows = int(array.chunks[0])
        self.n_rows = int(array.shape[0])
        self.row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * np.dtype(array.dtype).itemsize
        self.capacity_bytes = int(capacity_mb * 2 ** 20)
        self.pid = os.getpid()
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.nbytes = 0  # decompressed bytes held now
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.row_bytes

    @property
    def capacity_chunks(self) -> int:
        return max(1, self.capacity_bytes // max(self.chunk_bytes, 1))

    def chunk(self, c: int) -> np.ndarray:
        with self._lock:
            got = self._chunks.get(c)
            if got is not None:
                self._chunks.move_to_end(c)
                self.hits += 1
                return got
            self.misses += 1
            a = c * self.chunk_rows
            data = np.asarray(self.array[a:min(a + self.chunk_rows, self.n_rows)])
            data.flags.writeable = False
            self._chunks[c] = data
            self.nbytes += data.nbytes
            while self.nbytes > self.capacity_bytes and len(self._chunks) > 1:
                _, old = self._chunks.popitem(last=False)
                self.nbytes -= old.nbytes
            return data

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of the array."""
        if not 0 <= a <= b <= self.n_rows:
            raise IndexError(f"rows [{a}, {b}) outside [0, {self.n_rows})")
        if b == a:
            return np.zeros((0,) + tuple(self.array.shape[1:]), self.array.dtype)
        cr = self.chunk_rows
        first, last = a // cr, (b - 1) // cr
        if first == last:
            return self.chunk(first)[a - first * cr:b - first * cr]
        return np.concatenate([self.chunk(c)[max(a - c * cr, 0):min(b - c * cr, cr)] for c in range(first, last + 1)])


def block_window_order(blocks: np.ndarray, window: int, rng: np.random.Generator, streams: int = 1,
                       run: int = 1) -> np.ndarray:
    """A permutation of items 0..n-1 (``blocks[i]`` = the storage block item i is read from) in which the
    blocks are shuffled, cut into windows of ``window`` blocks, and items are shuffled within a window.

    Reading in this order touches one window of blocks at a time, so an LRU that holds a window serves
    every other read from memory. Trade-off against a full shuffle: a batch mixes items from ``window``
    random places of the store instead of from anywhere (documented in docs/scaling.md).

    ``streams`` > 1 (DataLoader workers, which take batches of ``run`` items in turn): windows are dealt
    round-robin to streams and the order takes ``run`` items from each stream in turn, so each worker
    reads only its own windows and every chunk is decompressed once in total, in parallel."""
    blocks = np.asarray(blocks)
    uniq, inv = np.unique(blocks, return_inverse=True)
    rank = np.empty(len(uniq), np.int64)
    rank[rng.permutation(len(uniq))] = np.arange(len(uniq))
    win = rank[inv.reshape(-1)] // max(int(window), 1)
    order = np.lexsort((rng.random(len(blocks)), win))
    if streams <= 1:
        return order
    stream = win[order] % streams
    pos = np.empty(len(order), np.int64)  # position of each item within its stream
    for s in range(streams):
        pos[stream == s] = np.arange(int((stream == s).sum()))
    return order[np.lexsort((pos, stream, pos // max(int(run), 1)))]
