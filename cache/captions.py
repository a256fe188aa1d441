"""Each clip's captions: the one contract between the store and the stages for "which instructions describe
this clip".

A clip may be described by several metadata lines (docs/cache.md, "One clip, many captions"); the store
encodes the audio once and keeps every line's instruction. Stage 1, stage 2 and the lab all need the same
table — clip i's instruction ids are ``ids[offsets[i]:offsets[i + 1]]``, its own line's first — and the
same few operations on it (keep some clips, drop some instructions, draw one caption per clip). They live
here, numpy only, validated once at construction, so no stage rebuilds offsets by hand.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(starts[i], starts[i] + counts[i])``."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    return np.repeat(np.asarray(starts, np.int64) - _offsets(counts)[:-1], counts) + np.arange(total)


@dataclass(frozen=True, eq=False)
class CaptionTable:
    """Clip i's captions are ``ids[offsets[i]:offsets[i + 1]]`` (instruction ids, its own line's first).

    A clip with no caption (audio only, or every instruction removed) has an empty range."""

    offsets: np.ndarray  # int64 [N + 1], offsets[0] == 0, non-decreasing, offsets[-1] == len(ids)
    ids: np.ndarray  # int64 [C], each >= 0

    def __post_init__(self):
        off, ids = np.asarray(self.offsets, np.int64), np.asarray(self.ids, np.int64)
        if off.ndim != 1 or ids.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != len(ids) \
                or (np.diff(off) < 0).any():
            raise ValueError(f"a caption table needs offsets [N + 1] rising from 0 to len(ids) = {len(ids)}; "
                             f"got offsets of shape {off.shape} ending at {off[-1] if off.size else None}")
        if (ids < 0).any():
            raise ValueError("caption ids must be instruction ids >= 0 (a clip without one has no caption)")
        object.__setattr__(self, "offsets", off)
        object.__setattr__(self, "ids", ids)

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_counts(cls, counts: np.ndarray, ids: np.ndarray) -> "CaptionTable":
        return cls(_offsets(np.asarray(counts, np.int64)), ids)

    @classmethod
    def one_per_clip(cls, instruction_id: np.ndarray) -> "CaptionTable":
        """Each clip's own instruction as its only caption (−1: none)."""
        iid = np.asarray(instruction_id, np.int64)
        return cls.from_counts((iid >= 0).astype(np.int64), iid[iid >= 0])

    @classmethod
    def from_store_rows(cls, status: np.ndarray, clip_row: np.ndarray, instruction_id: np.ndarray,
                        ok_status: int, caption_status: int) -> "CaptionTable":
        """From the store's row tables (schema: clips/status, clips/clip_row): one entry per OK row, in
        OK-row order; a caption row belongs to the OK row ``clip_row`` points at, in line order after the
        clip's own row. Rows without an instruction (−1) give no caption."""
        status, clip_row = np.asarray(status), np.asarray(clip_row, np.int64)
        iid = np.asarray(instruction_id, np.int64)
        ok = np.flatnonzero(status == ok_status)
        pos = np.full(len(status), -1, np.int64)
        pos[ok] = np.arange(len(ok))
        rows = np.flatnonzero(((status == ok_status) | (status == caption_status)) & (iid >= 0))
        owner = np.where(status[rows] == ok_status, rows, clip_row[rows])
        owner_pos = pos[np.clip(owner, 0, None)]
        rows, owner_pos = rows[owner_pos >= 0], owner_pos[owner_pos >= 0]
        order = np.lexsort((rows, owner_pos))  # by clip, then line order (a clip's own row comes first)
        return cls.from_counts(np.bincount(owner_pos, minlength=len(ok)), iid[rows[order]])

    # -- what it holds ---------------------------------------------------------------------------------
    @property
    def n_clips(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_captions(self) -> int:
        return len(self.ids)

    @property
    def counts(self) -> np.ndarray:
        """int64 [N]: captions per clip."""
        return np.diff(self.offsets)

    @property
    def clip_of(self) -> np.ndarray:
        """int64 [C]: the clip of each caption."""
        return np.repeat(np.arange(self.n_clips, dtype=np.int64), self.counts)

    @property
    def first(self) -> np.ndarray:
        """int64 [N]: each clip's first caption (its own line's when it kept it), −1 for a clip without."""
        out = np.full(self.n_clips, -1, np.int64)
        has = self.counts > 0
        out[has] = self.ids[self.offsets[:-1][has]]
        return out

    def check_first(self, instruction_id: np.ndarray) -> None:
        """Refuse a table whose clips' first captions are not ``instruction_id`` (−1: no caption)."""
        iid = np.asarray(instruction_id, np.int64)
        if iid.shape != (self.n_clips,) or not np.array_equal(self.first, np.where(iid >= 0, iid, -1)):
            raise ValueError("each clip's first caption must be its instruction_id, and a clip without one "
                             "(−1) must have no caption")

    # -- operations the stages need --------------------------------------------------------------------
    def subset(self, rows: np.ndarray) -> "CaptionTable":
        """The given clips only, in the given order."""
        rows = np.asarray(rows, np.int64)
        counts = self.counts[rows]
        return CaptionTable.from_counts(counts, self.ids[_ranges(self.offsets[rows], counts)])

    def keep(self, captions: np.ndarray) -> "CaptionTable":
        """The same clips with only the captions selected by ``captions`` (a [C] mask, or sorted caption
        indices); a clip left with none has an empty range."""
        mask = np.zeros(self.n_captions, bool)
        mask[np.asarray(captions)] = True
        return CaptionTable.from_counts(np.bincount(self.clip_of[mask], minlength=self.n_clips), self.ids[mask])

    def without(self, instruction_ids: np.ndarray) -> "CaptionTable":
        """The same clips without the captions whose instruction is in ``instruction_ids`` (held-out texts)."""
        return self.keep(~np.isin(self.ids, np.asarray(instruction_ids, np.int64)))

    def draw(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[B] one caption of each of ``rows``, uniformly; −1 for a clip without. Consumes ``rng`` only
        when some row has a choice (a one-caption store draws exactly as before captions existed)."""
        rows = np.asarray(rows, np.int64)
        counts = self.counts[rows]
        if not len(rows) or counts.max(initial=0) <= 1:
            return self.first[rows]
        pick = rng.integers(0, np.maximum(counts, 1))
        return np.where(counts > 0, self.ids[np.minimum(self.offsets[rows] + pick, max(self.n_captions - 1, 0))], -1)

    def digest_bytes(self) -> bytes:
        """Stable bytes of the table (for fingerprints)."""
        return self.offsets.astype("<i8").tobytes() + self.ids.astype("<i8").tobytes()
