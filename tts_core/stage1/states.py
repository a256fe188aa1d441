"""Instruction states for stage 1, one batch at a time — never the padded ``[U, Lmax, H]`` table.

At the user's scale (300k mostly unique instructions, flan-t5-large H=1024, ~24 tokens each) the padded
table is ~17 GB and even the ragged states are 12–15 GB: more than a 24 GB box or GPU can spare beside
everything else. A *states source* hands out padded batches instead::

    states, lengths = source.gather(ids)      # [B, W, H] zero-padded + [B], on source.device

* `RaggedStates` — flat ``[S, H]`` + offsets ``[U+1]`` tensors, as the store keeps them; moved to the
  device with the other tables, a gather is index ops there (no host sync). ``W`` = the table's Lmax:
  static shapes, and exactly the rows the padded table gave.
* `StoreStates` — reads the store's ``instructions/states`` through the reader's chunk cache
  (`cache.chunked.ChunkCache`); memory is the cache (``cache_mb``) plus one batch. ``W`` = the batch's
  longest instruction. ``block_of`` names the storage block each instruction is read from, so training
  can order batches by blocks (`tts_core.stage1.batches`).
* `SubsetStates` — k instructions of a source seen as ids 0..k-1 (the held-out set), nothing copied.

`load_states` picks: the ragged table in memory when it fits ``in_memory_mb``, else streamed.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


class InstructionStates:
    """What every source has: ``lengths`` (CPU int64 [U]), ``hidden_size``, ``dtype``, ``device`` and
    ``gather``; the rest is derived."""

    lengths: torch.Tensor
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    streamed: bool = False

    @property
    def n_instructions(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.n_instructions else 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape the padded table *would* have (recorded in data fingerprints; never allocated)."""
        return (self.n_instructions, self.max_length, self.hidden_size)

    @property
    def resident_bytes(self) -> int:
        """Upper bound of state bytes this source keeps in memory (host + device)."""
        raise NotImplementedError

    def gather(self, ids: Any, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "InstructionStates":
        raise NotImplementedError

    def subset(self, ids: np.ndarray, max_bytes: int = 0) -> "InstructionStates":
        """Instructions ``ids`` as a source of ids 0..k-1 (a view; `StoreStates` reads them into memory
        when they fit ``max_bytes``)."""
        return SubsetStates(self, ids)

    @torch.no_grad()
    def mean_pool(self, ids: np.ndarray, chunk: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
        """Mean over real tokens of each instruction's states → float32 [len(ids), H] (the NN baseline).

        Give ``ids`` sorted: a streamed source then reads the store front to back."""
        ids = np.asarray(ids, np.int64)
        out = torch.zeros(len(ids), self.hidden_size, device=device)
        for i in range(0, len(ids), chunk):
            s, ln = self.gather(ids[i:i + chunk])
            s, ln = s.to(device).float(), ln.to(device)
            mask = (torch.arange(s.shape[1], device=device)[None] < ln[:, None]).float()
            out[i:i + chunk] = (s * mask[..., None]).sum(1) / ln.clamp(min=1)[:, None].float()
        return out


class RaggedStates(InstructionStates):
    """States of instruction ``i`` are ``flat[offsets[i]:offsets[i+1]]`` (module doc).

    Stored with one zero row after the last state row, which every padding position of a gather reads,
    so a gather is a single index op with no masking pass."""

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor):
        flat = torch.as_tensor(flat)
        if flat.ndim != 2 or not flat.is_floating_point():
            raise ValueError(f"flat states must be a float [S, H] tensor, got {flat.dtype} {tuple(flat.shape)}")
        self._set(torch.cat([flat, flat.new_zeros(1, flat.shape[1])]), offsets)

    def _set(self, rows: torch.Tensor, offsets: torch.Tensor) -> None:
        offsets = torch.as_tensor(offsets, dtype=torch.long).to(rows.device)
        lengths = (offsets[1:] - offsets[:-1]).cpu()
        if offsets.ndim != 1 or len(offsets) < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != rows.shape[0] - 1 \
                or (lengths < 0).any():
            raise ValueError(f"offsets must rise from 0 to {rows.shape[0] - 1} (the flat rows)")
        self.rows, self.offsets, self.lengths = rows, offsets, lengths
        self.hidden_size, self.dtype, self.device = int(rows.shape[1]), rows.dtype, rows.device

    @classmethod
    def _from_rows(cls, rows: torch.Tensor, offsets: torch.Tensor) -> "RaggedStates":
        """``rows`` already ends with the zero padding row."""
        out = cls.__new__(cls)
        out._set(rows, offsets)
        return out

    @property
    def flat(self) -> torch.Tensor:
        """[S, H]: the state rows of every instruction, concatenated."""
        return self.rows[:-1]

    @classmethod
    def from_padded(cls, states: Any, lengths: Any) -> "RaggedStates":
        """The padded table ``[U, Lmax, H]`` + lengths → ragged (tests, synthetic data)."""
        states = torch.as_tensor(states)
        lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
        if states.ndim != 3:
            raise ValueError(f"states must be [U, Lmax, H], got {tuple(states.shape)}")
        if lengths.shape != states.shape[:1]:
            raise ValueError(f"{states.shape[0]} state rows, {tuple(lengths.shape)} lengths")
        if len(lengths) and (int(lengths.min()) < 0 or int(lengths.max()) > states.shape[1]):
            raise ValueError(f"lengths out of range [0, Lmax={states.shape[1]}]")
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        return cls(states[mask.to(states.device)], _offsets(lengths))

    @classmethod
    def from_array(cls, array, offsets: np.ndarray, ids: np.ndarray | None = None, read=None) -> "RaggedStates":
        """Instructions ``ids`` (default all) of a store's flat array, read piece by piece into one buffer
        (no second copy of the table). ``read(a, b)`` returns rows [a, b) (default: ``array[a:b]``)."""
        read = read or (lambda a, b: array[a:b])
        offsets = np.asarray(offsets, np.int64)
        H = int(array.shape[1])
        if ids is None:  # the whole flat array, chunk by chunk
            S = int(offsets[-1])
            rows = np.zeros((S + 1, H), array.dtype)
            step = max(int(array.chunks[0]), 1)
            for a in range(0, S, step):
                rows[a:min(a + step, S)] = read(a, min(a + step, S))
            return cls._from_rows(torch.from_numpy(rows), torch.from_numpy(offsets))
        ids = np.asarray(ids, np.int64)
        new = _offsets(torch.from_numpy(offsets[ids + 1] - offsets[ids])).numpy()
        rows = np.zeros((int(new[-1]) + 1, H), array.dtype)
        for k in np.argsort(offsets[ids], kind="stable"):  # store order
            rows[new[k]:new[k + 1]] = read(int(offsets[ids[k]]), int(offsets[ids[k] + 1]))
        return cls._from_rows(torch.from_numpy(rows), torch.from_numpy(new))

    @classmethod
    def empty(cls, n_instructions: int, hidden_size: int, dtype: torch.dtype = torch.float16) -> "RaggedStates":
        """No states at all (every length 0): enough for splits and vectors."""
        return cls(torch.zeros(0, hidden_size, dtype=dtype), torch.zeros(n_instructions + 1, dtype=torch.long))

    @property
    def resident_bytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def to(self, device: torch.device | str) -> "RaggedStates":
        return self._from_rows(self.rows.to(device), self.offsets.to(device))

    def gather(self, ids: Any, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(ids, dtype=torch.long).to(self.device)
        start = self.offsets[ids]
        ln = self.offsets[ids + 1] - start
        ar = torch.arange(self.max_length if width is None else int(width), device=self.device)
        idx = torch.where(ar[None, :] < ln[:, None], start[:, None] + ar[None, :], self.rows.shape[0] - 1)
        return self.rows[idx], ln


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


class StoreStates(InstructionStates):
    """States streamed from a `cache.reader.CacheReader` through its chunk cache (module doc)."""

    streamed = True

    def __init__(self, reader, cache_mb: float = 1024, block_chunks: int = 4, device: torch.device | str = "cpu"):
        from cache import schema

        reader.states_cache_mb = cache_mb
        self.reader, self.cache_mb, self.block_chunks = reader, cache_mb, int(block_chunks)
        self.lengths = torch.from_numpy(reader.instruction_lengths)
        self.hidden_size = int(reader.text_hidden_size)
        self.np_dtype = schema.STATE_DTYPE
        self.dtype = torch.from_numpy(np.zeros(0, self.np_dtype)).dtype
        self.device = torch.device(device)

    @property
    def resident_bytes(self) -> int:
        cache = self.reader.states_cache
        return max(cache.capacity_bytes, cache.chunk_bytes)

    @property
    def block_of(self) -> np.ndarray:
        """int64 [U]: the storage block (``block_chunks`` chunks) each instruction is read from."""
        return self.reader.instruction_blocks(self.block_chunks)

    @property
    def window_blocks(self) -> int:
        """Blocks per window of the chunk-aware order: half the cache, the other half for the window edges."""
        return max(1, self.reader.states_cache.capacity_chunks // (2 * self.block_chunks))

    def to(self, device: torch.device | str) -> "StoreStates":
        return StoreStates(self.reader, self.cache_mb, self.block_chunks, device)

    def gather(self, ids: Any, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, np.int64)
        padded, lens = self.reader.instruction_states_batch(ids, width)
        return torch.from_numpy(padded).to(self.device), torch.from_numpy(lens).to(self.device)

    def subset(self, ids: np.ndarray, max_bytes: int = 0) -> InstructionStates:
        ids = np.asarray(ids, np.int64)
        lens = self.lengths.numpy()[ids]
        if int(lens.sum()) * self.hidden_size * self.np_dtype.itemsize > max_bytes:
            return SubsetStates(self, ids)
        r = self.reader
        cache = r.states_cache  # a view of a cached chunk is copied into the buffer at once
        return RaggedStates.from_array(cache.array, r.instruction_offsets, ids, read=cache.rows).to(self.device)


class SubsetStates(InstructionStates):
    """Instructions ``ids`` of ``base`` as ids 0..k-1; gathers go to the base (module doc)."""

    def __init__(self, base: InstructionStates, ids: np.ndarray):
        ids = torch.as_tensor(np.asarray(ids, np.int64))
        self.base, self.ids = base, ids
        self.lengths = base.lengths[ids]
        self.hidden_size, self.dtype, self.device = base.hidden_size, base.dtype, base.device
        self.streamed = base.streamed
        self._ids_dev = ids if base.streamed else ids.to(base.device)

    @property
    def resident_bytes(self) -> int:
        return 0  # shares the base's memory

    def to(self, device: torch.device | str) -> "SubsetStates":
        return SubsetStates(self.base.to(device), self.ids.numpy())

    def gather(self, ids: Any, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(ids, dtype=torch.long).to(self._ids_dev.device)
        return self.base.gather(self._ids_dev[ids], width)


def load_states(reader, in_memory_mb: float = 2048, cache_mb: float = 1024) -> InstructionStates:
    """The store's instruction states: the ragged table in memory when it fits ``in_memory_mb``, else
    streamed through a ``cache_mb`` chunk cache. Either way the padded table is never built."""
    from cache import schema

    off = reader.instruction_offsets
    nbytes = int(off[-1]) * int(reader.text_hidden_size) * schema.STATE_DTYPE.itemsize
    if nbytes > in_memory_mb * 2 ** 20:
        return StoreStates(reader, cache_mb)
    return RaggedStates.from_array(reader.group[schema.INSTRUCTION_STATES], off)
