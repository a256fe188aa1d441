"""Stage-2 data: every table training needs, prepared once from the cache (`tts_core.stage2.prepare`); batches by
index ops (`tts_core.stage2.mixing`: the per-sample mixing of row kinds), length-bucketed and sharded over ranks
(`tts_core.stage2.sampler`).

    data = prepare_stage2_data(CacheReader(url), tokenizer, encoder, mapper, prepared_path=out/"prepared.safetensors")
    data = data.to(device)
    sampler = BucketBatchSampler(data.seq_lens(t3_cfg.cond_len), batch_size=32, max_tokens=0, seed=0)
    rows, weight = sampler.rank_batch(epoch, position, rank, world_size)[1:]
    batch = data.build_batch(rows, mix=RowMix(), rng=batch_rng(seed, epoch, gidx), prompt_len=150)

What is precomputed (nothing per sample happens in Python after this)
--------------------------------------------------------------------
* per clip: text token ids (the run's `TextTokenizer` over the manifest transcript, with the row's
  language — metadata's 5th column, else ``language`` — for the multilingual tokenizer; flat + offsets),
  S3 speech tokens (the store's flat int16 array, addressed by offsets — never copied per clip), the
  prompt tokens (S3 tokens of the clip's first 6 s, ≤ 150 — Turbo: 15 s, ≤ 375 — what Chatterbox's reference path feeds T3 —
  `tts_core.reference`; the store's flat array as well),
  the ground-truth VoiceEncoder embedding (L2-normalised: the VoiceEncoder's own output is unit
  norm, and so is the mapper's), the instruction id, a speaker-group index;
* per *unique* instruction: ``style_emb`` [U, H] from the frozen stage-1 `InstructionEncoder` over
  the cached text states, and the frozen mapper's predicted speaker embedding
  ``mapper_spk`` [U, K, 256] (K = ``mapper_samples`` seeded flow samples, ``n_steps`` Euler steps
  from the mapper config). Both models are frozen, so computing them once is exact — the result
  equals running them inside the training step. The text ids and the two tables are saved to
  ``prepared_path`` (safetensors, with a fingerprint of store + tokenizer + mapper weights + seeds)
  so DDP ranks and resumed runs load the very same vectors instead of recomputing them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cache.captions import CaptionTable
from tts_core.stage2.mixing import DEFAULT_EMOTION_ADV, Stage2Batch, build_batch
from tts_core.stage2.row_mix import RowMix

SPK_DIM = 256


@dataclass
class Stage2Data:
    clip_ids: list[str]
    text_flat: torch.Tensor  # int16 [T]
    text_start: np.ndarray  # int64 [N]
    text_len: np.ndarray  # int64 [N]
    speech_flat: torch.Tensor  # int16 [S] (the store's flat array)
    speech_start: np.ndarray  # int64 [N]
    speech_len: np.ndarray  # int64 [N]
    prompt_flat: torch.Tensor  # int16 [P]: S3 tokens of each clip's first 6 s (the store's flat array)
    prompt_start: np.ndarray  # int64 [N]
    prompt_len: np.ndarray  # int64 [N]
    spk: torch.Tensor  # float32 [N, 256], unit norm
    instruction_id: np.ndarray  # int64 [N], -1 = none
    style_emb: torch.Tensor  # float32 [U, H]
    mapper_spk: torch.Tensor  # float32 [U, K, 256]
    speaker_code: np.ndarray  # int64 [N], -1 = unknown
    dropped: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # row i's captions (its instruction_id first); None: one caption per row, its instruction_id (none for -1)
    captions: CaptionTable | None = None

    def __post_init__(self):
        N = len(self.clip_ids)
        for name in ("text_start", "text_len", "speech_start", "speech_len", "prompt_start", "prompt_len",
                     "instruction_id", "speaker_code"):
            arr = np.asarray(getattr(self, name), dtype=np.int64)
            if arr.shape != (N,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({N},)")
            setattr(self, name, arr)
        if tuple(self.spk.shape) != (N, SPK_DIM):
            raise ValueError(f"spk is {tuple(self.spk.shape)}, expected [{N}, {SPK_DIM}]")
        if self.mapper_spk.ndim != 3 or self.mapper_spk.shape[0] != self.style_emb.shape[0]:
            raise ValueError("mapper_spk must be [U, K, 256] with U = style_emb rows")
        if N and int(self.instruction_id.max(initial=-1)) >= self.style_emb.shape[0]:
            raise ValueError("instruction_id out of range of style_emb")
        if self.captions is None:
            self.captions = CaptionTable.one_per_clip(self.instruction_id)
        self.captions.check_first(self.instruction_id)  # one entry per row, its instruction_id first
        self._build_speaker_groups()

    # -- sizes -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def n_instructions(self) -> int:
        return int(self.style_emb.shape[0])

    @property
    def instruction_dim(self) -> int:
        return int(self.style_emb.shape[1])

    @property
    def mapper_samples(self) -> int:
        return int(self.mapper_spk.shape[1])

    @property
    def device(self) -> torch.device:
        return self.spk.device

    def seq_lens(self, cond_len: int) -> np.ndarray:
        """[N] full sequence length of each row: cond + (SOT text EOT) + (BOS speech EOS)."""
        return cond_len + self.text_len + 2 + self.speech_len + 2

    def to(self, device: torch.device | str) -> "Stage2Data":
        """Move the tensor tables (tokens, vectors) to ``device``; index arrays stay on the host."""
        for name in ("text_flat", "speech_flat", "prompt_flat", "spk", "style_emb", "mapper_spk"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def subset(self, rows: np.ndarray) -> "Stage2Data":
        """The given rows only (sorted indices), sharing the flat token tables and instruction tables; the
        speaker groups are rebuilt, so an audio row's prompt clip is drawn from these rows alone."""
        rows = np.asarray(rows, np.int64)
        per_row = {name: getattr(self, name)[rows] for name in (
            "text_start", "text_len", "speech_start", "speech_len", "prompt_start", "prompt_len", "instruction_id",
            "speaker_code")}
        meta = {**self.meta, "store_rows": np.asarray(self.meta.get("store_rows", np.arange(len(self))))[rows]}
        return replace(self, clip_ids=[self.clip_ids[i] for i in rows],
                       spk=self.spk[torch.from_numpy(rows).to(self.spk.device)], meta=meta, **per_row,
                       captions=self.captions.subset(rows))

    def without_instructions(self, ids: np.ndarray) -> "Stage2Data":
        """The same rows with the captions of instruction ``ids`` removed (held-out texts,
        `tts_core.stage2.hold_out`); a row left with none becomes audio-only (instruction_id −1)."""
        captions = self.captions.without(ids)
        return replace(self, instruction_id=captions.first, captions=captions)

    def draw_captions(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[B] instruction id of each row: one of its captions, uniformly (nothing drawn when every row has
        at most one), −1 for rows without (`CaptionTable.draw`)."""
        return self.captions.draw(rows, rng)

    # -- speaker groups (for the prompt of another clip of the same speaker) ------------------------------
    def _build_speaker_groups(self) -> None:
        code = self.speaker_code
        N = len(code)
        known = np.flatnonzero(code >= 0)
        order = known[np.argsort(code[known], kind="stable")]  # rows grouped by speaker
        self._grp_order = order
        self._grp_start = np.zeros(N, np.int64)
        self._grp_size = np.zeros(N, np.int64)
        self._grp_pos = np.zeros(N, np.int64)
        if len(order):
            codes_sorted = code[order]
            starts = np.flatnonzero(np.r_[True, codes_sorted[1:] != codes_sorted[:-1]])
            sizes = np.diff(np.r_[starts, len(order)])
            grp_of_pos = np.repeat(np.arange(len(starts)), sizes)
            self._grp_start[order] = starts[grp_of_pos]
            self._grp_size[order] = sizes[grp_of_pos]
            self._grp_pos[order] = np.arange(len(order)) - starts[grp_of_pos]

    @property
    def own_prompt_rows(self) -> np.ndarray:
        """Rows whose audio-only prompt must come from the clip itself (no other clip of its speaker)."""
        return np.flatnonzero(self._grp_size < 2)

    def prompt_source(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each row, a different row of the same speaker (uniform), else the row itself."""
        rows = np.asarray(rows, np.int64)
        size = self._grp_size[rows]
        r = rng.integers(1, np.maximum(size, 2))  # in [1, size-1]: never the row itself (drawn for every row)
        if len(self._grp_order) == 0:
            return rows.copy()
        has_other = size >= 2
        pos = (self._grp_pos[rows] + r) % np.maximum(size, 1)
        other = self._grp_order[np.where(has_other, self._grp_start[rows] + pos, 0)]
        return np.where(has_other, other, rows)

    # -- batches -----------------------------------------------------------------------------------------
    def build_batch(self, rows: np.ndarray, *, mix: RowMix, rng: np.random.Generator, prompt_len: int = 150,
                    cond_len: int = 34, emotion_adv: float = DEFAULT_EMOTION_ADV) -> Stage2Batch:
        """One training batch of these rows (`tts_core.stage2.mixing.build_batch`; ``mix``: `RowMix`, e.g. the run's,
        or `SCORED_AS_INSTRUCTION_ONLY` to score held-out losses)."""
        return build_batch(self, rows, mix=mix, rng=rng, prompt_len=prompt_len, cond_len=cond_len,
                           emotion_adv=emotion_adv)

    def prompt_tokens_of(self, row: int, prompt_len: int = 150) -> np.ndarray:
        """The prompt tokens one row gives an audio row (tests and audits)."""
        s, n = int(self.prompt_start[row]), int(min(self.prompt_len[row], prompt_len))
        return self.prompt_flat[s:s + n].cpu().numpy().astype(np.int64)

    def speech_tokens_of(self, row: int) -> np.ndarray:
        s, n = int(self.speech_start[row]), int(self.speech_len[row])
        return self.speech_flat[s:s + n].cpu().numpy().astype(np.int64)

    def text_tokens_of(self, row: int) -> np.ndarray:
        s, n = int(self.text_start[row]), int(self.text_len[row])
        return self.text_flat[s:s + n].cpu().numpy().astype(np.int64)
