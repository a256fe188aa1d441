"""Stage-2 data: every table training needs, prepared once from the cache; batches by index ops.

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

Rows dropped (counted in ``dropped``): no speech tokens, empty text, text/speech longer than T3's
``max_text_tokens`` / ``max_speech_tokens``, a degenerate (zero / non-finite) speaker embedding.

Per-sample mixing (`Stage2Data.build_batch`)
--------------------------------------------
Each row independently (numpy generator seeded per global batch, so the draw does not depend on
the device, the rank or the world size) is, with probability ``instruction_prob``:

* **instruction-only**: speaker emb = mapper(instruction) (sample ``k`` of K), *no* prompt tokens
  (``prompt_lens`` 0 — the perceiver attends an empty set), ``instruction_emb`` = style_emb,
  ``instruction_mask`` 1;
* otherwise **audio-only**: ground-truth speaker emb, prompt = the first ``prompt_len`` (≤ 150)
  prompt tokens of a *different* clip of the same speaker (drawn uniformly among that speaker's
  other clips) — the tokens of that clip's first 6 s, exactly what inference builds from a reference
  clip — ``instruction_emb`` = 0 with ``instruction_mask`` 0 (adapters return plain norm(x)).

  Prompt fallback: when the manifest's ``speaker`` is empty/missing for the clip, or the speaker
  has no other clip, the prompt is the clip's *own* prompt tokens. That is what
  Chatterbox's reference-clip conditioning looks like, but it lets the model copy the start of its
  own target; the fraction of such rows is reported (``own_prompt_frac``) so a corpus without
  speaker labels is visible in the logs.

Rows without an instruction (``instruction_id`` −1) are always audio-only.

Two more draws refine the mix (`RowMix.shares` gives the resulting shares; both 0 = the two kinds above only —
`RowMix.core`):

* with probability ``prompt_instruction_prob`` a row with an instruction is **prompt + instruction** ("clone this
  voice, but slower"): the audio-only row's prompt clip (another clip of the same speaker, else the clip itself —
  as the lab's "reference clip + instruction" evaluation picks it) gives the prompt tokens *and* the speaker
  embedding (inference computes both from the one reference clip), and the instruction is on. The other rows
  keep the ``instruction_prob`` split, so the instruction-only / audio-only core stays 50/50 by default.
* with probability ``instruction_dropout`` a row whose instruction is on gets the **null instruction**
  (`T3Cond.with_null_instruction`: mask 0, adapters return norm(x); speaker embedding and prompt unchanged) —
  the unconditional branch of instruction guidance at inference (`T3.generate(instruction_guidance=W)`).

Both are drawn after the older draws, so with both at 0 a batch is exactly what it was before them.

Captions: a clip with several instructions (``captions``, a `cache.captions.CaptionTable`, from
`cache.reader.CacheReader.captions`) is still one row; a row whose instruction is on takes one of its
captions, drawn uniformly from the batch's generator after the draws above (a store with one caption
per clip draws nothing more, so its batches are unchanged). Over epochs every caption is trained.

Batching (`BucketBatchSampler`)
-------------------------------
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

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cache.captions import CaptionTable
from tts_core.seeds import mix_seed
from tts_core.stage2.row_mix import AUDIO_ONLY, INSTRUCTION_ONLY, PROMPT_INSTRUCTION, RowMix, row_name
from tts_core.t3 import T3Batch, T3Cond

log = logging.getLogger(__name__)

SPK_DIM = 256
PREPARED_FORMAT = "instruct-tts/stage2-prepared/1"
DEFAULT_EMOTION_ADV = 0.5  # Chatterbox's default exaggeration; the corpus has no emotion labels


def batch_rng(seed: int, epoch: int, global_batch: int) -> np.random.Generator:
    """The generator of one global batch's per-row choices (mode, prompt clip, mapper sample)."""
    return np.random.default_rng(mix_seed(seed, "batch", epoch, global_batch))


# ---- the batch ------------------------------------------------------------------------------------------
@dataclass
class Stage2Batch:
    batch: T3Batch  # raw tokens + conditioning, on the data's device
    instruction_only: torch.Tensor  # [B] bool (device): instruction-only rows (null instruction or not)
    rows: np.ndarray  # [B] data rows
    prompt_src: np.ndarray  # [B] row whose speech gave the prompt (== rows where own prompt; -1 instruction-only rows)
    mapper_k: np.ndarray  # [B] mapper sample used (instruction-only rows), -1 otherwise
    n_real_tokens: int  # Σ sequence lengths (conditioning included)
    n_padded_tokens: int  # B × longest sequence
    kind: np.ndarray  # [B] int8: each row's kind (`tts_core.stage2.row_mix`: AUDIO_ONLY, INSTRUCTION_ONLY, ...)
    null_instruction: np.ndarray  # [B] bool: the instruction was dropped (adapters off)

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def row_names(self) -> list[str]:
        """Each row as logs and reports name it (`row_mix.row_name`): "prompt + instruction (null instruction)"."""
        return [row_name(k, n) for k, n in zip(self.kind.tolist(), self.null_instruction.tolist())]


# ---- the data -------------------------------------------------------------------------------------------
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
    def draw_modes(self, rows: np.ndarray, instruction_prob: float, rng: np.random.Generator) -> np.ndarray:
        """[B] bool: True = instruction-only row (rows without an instruction are never chosen)."""
        u = rng.random(len(rows))
        return (u < instruction_prob) & (self.instruction_id[rows] >= 0)

    def build_batch(self, rows: np.ndarray, *, mix: RowMix, rng: np.random.Generator, prompt_len: int = 150,
                    cond_len: int = 34, emotion_adv: float = DEFAULT_EMOTION_ADV) -> Stage2Batch:
        """One training batch (module doc, "Per-sample mixing"; ``mix``: `RowMix`, e.g. the run's, or
        `SCORED_AS_INSTRUCTION_ONLY` to score held-out losses). The draws happen in a fixed order (modes, prompt
        clips, mapper samples, prompt + instruction, dropout, captions), all ``len(rows)`` of each, so the result
        is a pure function of (rows, rng state)."""
        rows = np.asarray(rows, np.int64)
        B = len(rows)
        dev = self.device
        inst = self.draw_modes(rows, mix.instruction_prob, rng)
        src = self.prompt_source(rows, rng)
        k = rng.integers(0, self.mapper_samples, size=B)
        both = (rng.random(B) < mix.prompt_instruction_prob) & (self.instruction_id[rows] >= 0)
        inst = inst & ~both
        on = inst | both  # the instruction conditions the row
        null = (rng.random(B) < mix.instruction_dropout) & on
        captions = self.draw_captions(rows, rng)

        tl, sl = self.text_len[rows], self.speech_len[rows]
        text = _gather_padded(self.text_flat, self.text_start[rows], tl, dev)
        speech = _gather_padded(self.speech_flat, self.speech_start[rows], sl, dev)
        plen = np.where(inst, 0, np.minimum(self.prompt_len[src], prompt_len))
        # width ≥ 1 even when every row is instruction-only, so the perceiver's key/value path runs
        # (masked) in every step and every cond_enc parameter gets a gradient (DDP-safe).
        prompt = _gather_padded(self.prompt_flat, self.prompt_start[src], plen, dev, min_width=1)

        inst_t = torch.from_numpy(inst).to(dev)
        on_t = torch.from_numpy(on).to(dev)
        iid = np.where(on, captions, 0)
        iid_t = torch.from_numpy(iid).to(dev)
        k_t = torch.from_numpy(np.where(inst, k, 0)).to(dev)
        # the speaker embedding of the clip that gave the prompt: prompt + instruction rows take both from it
        spk_rows = torch.from_numpy(np.where(both, src, rows)).to(dev)
        spk = torch.where(inst_t[:, None], self.mapper_spk[iid_t, k_t], self.spk[spk_rows])
        style = self.style_emb[iid_t]
        inst_emb = torch.where(on_t[:, None], style, torch.zeros_like(style))

        cond = T3Cond(speaker_emb=spk, prompt_tokens=prompt, prompt_lens=torch.from_numpy(plen).to(dev),
                      emotion_adv=emotion_adv, instruction_emb=inst_emb, instruction_mask=on_t)
        if null.any():  # the null instruction, exactly as inference's unconditional branch builds it
            nulled = cond.with_null_instruction().instruction_mask
            cond.instruction_mask = torch.where(torch.from_numpy(null).to(dev), nulled, on_t)
        batch = T3Batch(text_tokens=text, text_lens=torch.from_numpy(tl).to(dev), speech_tokens=speech,
                        speech_lens=torch.from_numpy(sl).to(dev), cond=cond)
        seq = cond_len + tl + 2 + sl + 2
        kind = np.where(inst, INSTRUCTION_ONLY, np.where(both, PROMPT_INSTRUCTION, AUDIO_ONLY)).astype(np.int8)
        return Stage2Batch(batch=batch, instruction_only=inst_t, rows=rows, prompt_src=np.where(inst, -1, src),
                           mapper_k=np.where(inst, k, -1), n_real_tokens=int(seq.sum()),
                           n_padded_tokens=int(B * seq.max(initial=0)), kind=kind, null_instruction=null)

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


def _gather_padded(flat: torch.Tensor, starts: np.ndarray, lens: np.ndarray, device, min_width: int = 1
                   ) -> torch.Tensor:
    """Rows of a flat token array → long [B, max(lens, min_width)], zero padded. Index ops on ``device``."""
    width = max(int(lens.max(initial=0)), min_width)
    B = len(starts)
    if flat.numel() == 0 or B == 0:
        return torch.zeros(B, width, dtype=torch.long, device=device)
    ar = torch.arange(width, device=device)
    st = torch.from_numpy(np.asarray(starts, np.int64)).to(device)
    ln = torch.from_numpy(np.asarray(lens, np.int64)).to(device)
    mask = ar[None, :] < ln[:, None]
    idx = torch.where(mask, st[:, None] + ar[None, :], torch.zeros_like(mask, dtype=torch.long))
    vals = flat[idx].long()
    return torch.where(mask, vals, torch.zeros_like(vals))


# ---- preparation from the cache ------------------------------------------------------------------------
def _instruction_state_chunks(reader, ids: np.ndarray, chunk: int):
    """Yield (ids of the chunk, float16 [n, Lmax, H], lengths [n]) over ``ids``, in order."""
    for a in range(0, len(ids), chunk):
        sel = ids[a:a + chunk]
        states, lens = reader.instruction_states_batch(sel)
        yield sel, states, lens


@torch.no_grad()
def compute_instruction_tables(reader, encoder, mapper, *, mapper_seed: int = 0, mapper_samples: int = 1,
                               n_steps: int | None = None, chunk: int = 512, ids: np.ndarray | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(style_emb float32 [U, H], mapper_spk float32 [U, K, 256]) for every instruction of the store, or only for
    ``ids`` (the other rows stay 0: an evaluation that needs a few instructions of a large store).

    Frozen encoder (fp32, autocast off — it enforces that itself) and mapper on their own device.
    Noise of sample k is one CPU-seeded [U, dim] draw (seed mix(mapper_seed, k)), so the vectors do
    not depend on ``chunk`` or ``ids`` and sample 0 is the same whatever K.
    """
    U = int(reader.n_instructions)
    H = int(reader.text_hidden_size)
    ids = np.arange(U) if ids is None else np.unique(np.asarray(ids, np.int64))
    style = torch.zeros(U, H)
    for sel, states, lens in _instruction_state_chunks(reader, ids, chunk):
        style[sel] = encoder(torch.from_numpy(states), torch.from_numpy(lens)).float().cpu()
    n_steps = int(n_steps or mapper.config.n_steps)
    out = torch.zeros(U, mapper_samples, SPK_DIM)
    for k in range(mapper_samples if len(ids) else 0):
        g = torch.Generator().manual_seed(mix_seed(mapper_seed, "mapper-sample", k))
        noise = torch.randn((mapper.config.draws, U, mapper.config.dim), generator=g)
        for a in range(0, len(ids), chunk):
            sel = torch.from_numpy(ids[a:a + chunk])
            spk, _ = mapper.inference(style[sel], n_steps=n_steps, noise=noise[:, sel])
            out[sel, k] = spk.float().cpu()
    return style, out


def prepared_fingerprint(reader, tokenizer, mapper_meta: dict, *, mapper_seed: int, mapper_samples: int,
                         n_steps: int, language: str | None = None) -> str:
    info = reader.info
    d = {
        "format": PREPARED_FORMAT,
        "store": {"lines_digest": info.lines_digest, "n_rows": info.n_rows, "n_instructions": info.n_instructions,
                  "n_ok": len(reader), "models": {k: v.to_dict() for k, v in reader.identities.items()}},
        "tokenizer": tokenizer.identity.to_dict(),
        "mapper_weights": mapper_meta.get("weights_sha256"),
        "mapper_seed": mapper_seed, "mapper_samples": mapper_samples, "n_steps": n_steps,
        "mapper_sampling": {k: mapper_meta.get("mapper_config", {}).get(k) for k in ("temperature", "draws")},
    }
    if tokenizer.requires_language:
        d["language"] = language
    d["store"]["models"] = {k: {"name": v["name"], "sha256": v["sha256"]} for k, v in d["store"]["models"].items()}
    d["tokenizer"] = {"name": d["tokenizer"]["name"], "sha256": d["tokenizer"]["sha256"]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def row_languages(manifest, tokenizer, default: str | None) -> list[str | None]:
    """Each OK row's language for the tokenizer (the metadata's column, else ``default``); every row must
    have a supported one when the tokenizer needs it — else one error naming the rows and the fix."""
    from tts_core.languages import MTL_LANGUAGES
    from tts_core.stage2.text_tokenizer import TextTokenizerError, check_language

    col = manifest["language"].fillna("").astype(str).tolist() if "language" in manifest.columns else \
        [""] * len(manifest)
    langs = [c or default for c in col]
    if not tokenizer.requires_language:
        return langs
    bad = [i for i, lang in enumerate(langs) if (lang or "").strip().lower() not in MTL_LANGUAGES]
    if bad:
        try:
            check_language(langs[bad[0]])
        except TextTokenizerError as e:
            raise TextTokenizerError(f"{len(bad)} row(s) without a usable language, e.g. clip "
                                     f"{manifest['clip_id'].iloc[bad[0]]}: {e}") from None
    return [check_language(lang) for lang in langs]


def _tokenize_all(tokenizer, texts: list[str], languages: list[str | None], chunk: int = 4096
                  ) -> tuple[np.ndarray, np.ndarray]:
    ids: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        ids.extend(tokenizer.encode_batch(texts[i:i + chunk], languages[i:i + chunk]))
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    off = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(off[-1]))
    return flat, off


def compute_prepared(reader, tokenizer, encoder, mapper, *, mapper_seed: int, mapper_samples: int,
                     n_steps: int, language: str | None = None, instruction_ids: np.ndarray | None = None
                     ) -> dict[str, torch.Tensor]:
    """The expensive, shareable part: text ids of every OK row + the instruction tables (of every instruction,
    or of ``instruction_ids`` only: `compute_instruction_tables`; such tensors are never saved as prepared)."""
    man = reader.ok_manifest
    texts = man["transcript"].fillna("").astype(str).tolist()
    flat, off = _tokenize_all(tokenizer, texts, row_languages(man, tokenizer, language))
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** 15):
        raise ValueError("text ids outside int16")
    style, mspk = compute_instruction_tables(reader, encoder, mapper, mapper_seed=mapper_seed,
                                             mapper_samples=mapper_samples, n_steps=n_steps, ids=instruction_ids)
    return {"text_flat": torch.from_numpy(flat.astype(np.int16)), "text_off": torch.from_numpy(off),
            "style_emb": style.contiguous(), "mapper_spk": mspk.contiguous()}


def save_prepared(path: str | Path, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
    from tts_core.checkpoint import save_state_dict_safetensors

    save_state_dict_safetensors(tensors, path, metadata={"format": PREPARED_FORMAT, "fingerprint": fingerprint})


def load_prepared(path: str | Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The prepared tensors at ``path`` when they were made from the same inputs, else None."""
    from tts_core.checkpoint import read_state_dict_safetensors

    path = Path(path)
    if not path.is_file():
        return None
    try:
        tensors, meta = read_state_dict_safetensors(path)
    except Exception as e:  # a foreign or damaged file is recomputed, not trusted
        log.warning("ignoring unreadable prepared file %s: %s", path, e)
        return None
    if meta.get("fingerprint") != fingerprint:
        log.info("prepared file %s was made from other inputs; recomputing", path)
        return None
    return tensors


def prepare_stage2_data(reader, tokenizer, encoder=None, mapper=None, *, mapper_meta: dict | None = None,
                        mapper_seed: int = 0, mapper_samples: int = 1, n_steps: int | None = None,
                        max_text_tokens: int = 2048, max_speech_tokens: int = 4096,
                        prepared: dict[str, torch.Tensor] | None = None,
                        prepared_path: str | Path | None = None, write_prepared: bool = True,
                        language: str | None = None, prompt_seconds: float = 6.0) -> Stage2Data:
    """Build `Stage2Data` from a finished cache store (module doc).

    ``prompt_seconds``: which stored prompt audio rows get — the T3 family's reference cut
    (`tts_core.t3.families.FamilySpec.prompt_seconds`: 6 s, Turbo 15 s; `cache.schema.PROMPTS`).

    ``prepared``: tensors from `compute_prepared` / `load_prepared` (DDP ranks pass what rank 0 wrote).
    Otherwise ``prepared_path`` is reused when its fingerprint matches, else computed with
    ``encoder`` + ``mapper`` and (``write_prepared``) saved there.
    """
    if n_steps is None:
        if mapper is None:
            raise ValueError("n_steps is required without a mapper")
        n_steps = int(mapper.config.n_steps)
    fp = prepared_fingerprint(reader, tokenizer, mapper_meta or {}, mapper_seed=mapper_seed,
                              mapper_samples=mapper_samples, n_steps=n_steps, language=language)
    if prepared is None and prepared_path is not None:
        prepared = load_prepared(prepared_path, fp)
    if prepared is None:
        if encoder is None or mapper is None:
            raise ValueError("no prepared tensors and no encoder/mapper to compute them")
        prepared = compute_prepared(reader, tokenizer, encoder, mapper, mapper_seed=mapper_seed,
                                    mapper_samples=mapper_samples, n_steps=n_steps, language=language)
        if prepared_path is not None and write_prepared:
            save_prepared(prepared_path, prepared, fp)

    man = reader.ok_manifest
    n_ok = len(reader)
    text_off = prepared["text_off"].numpy().astype(np.int64)
    if len(text_off) != n_ok + 1:
        raise ValueError(f"prepared text ids cover {len(text_off) - 1} rows, the store has {n_ok}")
    # speech tokens: the store's flat array, addressed through its offsets (no per-clip copies)
    from cache import schema

    ok = np.asarray(reader.ok_index, np.int64)

    def ragged(offsets: str, flat: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        off = np.asarray(reader.group[offsets][:], dtype=np.int64)
        values = torch.from_numpy(np.asarray(reader.group[flat][:]).astype(np.int16))
        return values, off[ok], off[ok + 1] - off[ok]

    speech_flat, s_start, s_len = ragged(schema.TOKEN_OFFSETS, schema.TOKENS)
    stored_prompt = schema.prompt_arrays(prompt_seconds)
    prompt_flat, p_start, p_len = ragged(stored_prompt.offsets, stored_prompt.flat)
    t_start, t_len = text_off[:-1], np.diff(text_off)
    spk_raw = np.asarray(reader.spk_emb(raw=True), dtype=np.float32)
    iid = np.asarray(reader.instruction_id(), np.int64)
    # an instruction with no text states (empty text) pools to a zero vector: treat its rows as having none
    inst_off = np.asarray(reader.group[schema.INSTRUCTION_OFFSETS][:], dtype=np.int64)
    empty_inst = np.diff(inst_off) == 0
    no_text = (iid >= 0) & empty_inst[np.clip(iid, 0, None)] if len(empty_inst) else np.zeros(n_ok, bool)
    iid = np.where(no_text, -1, iid)
    # captions (a clip's instructions; one per clip in a store without more), less those without text states
    captions = CaptionTable(*reader.captions)  # shim until reader returns CaptionTable
    captions = captions.keep(~empty_inst[captions.ids] if len(empty_inst) else np.ones(captions.n_captions, bool))
    iid = captions.first

    norms = np.linalg.norm(spk_raw, axis=1)
    checks = {
        "no_speech_tokens": s_len == 0,
        "empty_text": t_len == 0,
        "text_too_long": t_len > max_text_tokens,
        "speech_too_long": s_len > max_speech_tokens,
        "degenerate_spk_emb": ~np.isfinite(spk_raw).all(1) | (norms <= 1e-12),
    }
    keep = np.ones(n_ok, bool)
    dropped = {}
    for reason, bad in checks.items():
        dropped[reason] = int((bad & keep).sum())
        keep &= ~bad
    rows = np.flatnonzero(keep)

    speakers = (man["speaker"].fillna("").astype(str).to_numpy() if "speaker" in man.columns
                else np.array([""] * n_ok, dtype=object))
    sp = speakers[rows]
    code = np.full(len(rows), -1, np.int64)
    known = sp != ""
    if known.any():
        _, inv = np.unique(sp[known], return_inverse=True)
        code[known] = inv
    spk = F.normalize(torch.from_numpy(spk_raw[rows]), dim=-1)
    data = Stage2Data(
        clip_ids=man["clip_id"].astype(str).to_numpy()[rows].tolist(),
        text_flat=prepared["text_flat"], text_start=t_start[rows], text_len=t_len[rows],
        speech_flat=speech_flat, speech_start=s_start[rows], speech_len=s_len[rows],
        prompt_flat=prompt_flat, prompt_start=p_start[rows], prompt_len=p_len[rows],
        spk=spk, instruction_id=iid[rows], captions=captions.subset(rows),
        style_emb=prepared["style_emb"].float(), mapper_spk=prepared["mapper_spk"].float(),
        speaker_code=code, dropped=dropped,
        meta={"fingerprint": fp, "store_rows": rows, "n_ok": n_ok, "empty_instruction_rows": int(no_text[rows].sum()),
              "mapper_seed": mapper_seed,
              "mapper_samples": mapper_samples, "n_steps": n_steps, "prompt_seconds": stored_prompt.seconds},
    )
    if data.text_flat.numel() and int(data.text_flat.max()) >= tokenizer.vocab_size:
        raise ValueError("prepared text ids exceed the tokenizer's vocabulary (stale prepared file?)")
    n_drop = sum(dropped.values())
    if n_drop:
        log.info("stage2 data: kept %d of %d rows; dropped %s", len(rows), n_ok,
                 {k: v for k, v in dropped.items() if v})
    return data


# ---- bucketing + sharding --------------------------------------------------------------------------------
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
