"""Stage 2's per-sample mixing: one batch of `Stage2Data` rows, each drawn as one row kind (`tts_core.stage2.row_mix`)
by index ops on the prepared tables (`Stage2Data.build_batch`).

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tts_core.seeds import mix_seed
from tts_core.stage2.row_mix import AUDIO_ONLY, INSTRUCTION_ONLY, PROMPT_INSTRUCTION, RowMix, row_name
from tts_core.t3 import T3Batch, T3Cond

if TYPE_CHECKING:
    from tts_core.stage2.data import Stage2Data

DEFAULT_EMOTION_ADV = 0.5  # Chatterbox's default exaggeration; the corpus has no emotion labels


def batch_rng(seed: int, epoch: int, global_batch: int) -> np.random.Generator:
    """The generator of one global batch's per-row choices (mode, prompt clip, mapper sample)."""
    return np.random.default_rng(mix_seed(seed, "batch", epoch, global_batch))


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


def draw_modes(data: Stage2Data, rows: np.ndarray, instruction_prob: float, rng: np.random.Generator) -> np.ndarray:
    """[B] bool: True = instruction-only row (rows without an instruction are never chosen)."""
    u = rng.random(len(rows))
    return (u < instruction_prob) & (data.instruction_id[rows] >= 0)


def build_batch(data: Stage2Data, rows: np.ndarray, *, mix: RowMix, rng: np.random.Generator, prompt_len: int = 150,
                cond_len: int = 34, emotion_adv: float = DEFAULT_EMOTION_ADV) -> Stage2Batch:
    """One training batch of ``data`` (module doc; ``mix``: `RowMix`, e.g. the run's, or
    `SCORED_AS_INSTRUCTION_ONLY` to score held-out losses). The draws happen in a fixed order (modes, prompt
    clips, mapper samples, prompt + instruction, dropout, captions), all ``len(rows)`` of each, so the result
    is a pure function of (rows, rng state)."""
    rows = np.asarray(rows, np.int64)
    B = len(rows)
    dev = data.device
    inst = draw_modes(data, rows, mix.instruction_prob, rng)
    src = data.prompt_source(rows, rng)
    k = rng.integers(0, data.mapper_samples, size=B)
    both = (rng.random(B) < mix.prompt_instruction_prob) & (data.instruction_id[rows] >= 0)
    inst = inst & ~both
    on = inst | both  # the instruction conditions the row
    null = (rng.random(B) < mix.instruction_dropout) & on
    captions = data.draw_captions(rows, rng)

    tl, sl = data.text_len[rows], data.speech_len[rows]
    text = _gather_padded(data.text_flat, data.text_start[rows], tl, dev)
    speech = _gather_padded(data.speech_flat, data.speech_start[rows], sl, dev)
    plen = np.where(inst, 0, np.minimum(data.prompt_len[src], prompt_len))
    # width ≥ 1 even when every row is instruction-only, so the perceiver's key/value path runs
    # (masked) in every step and every cond_enc parameter gets a gradient (DDP-safe).
    prompt = _gather_padded(data.prompt_flat, data.prompt_start[src], plen, dev, min_width=1)

    inst_t = torch.from_numpy(inst).to(dev)
    on_t = torch.from_numpy(on).to(dev)
    iid = np.where(on, captions, 0)
    iid_t = torch.from_numpy(iid).to(dev)
    k_t = torch.from_numpy(np.where(inst, k, 0)).to(dev)
    # the speaker embedding of the clip that gave the prompt: prompt + instruction rows take both from it
    spk_rows = torch.from_numpy(np.where(both, src, rows)).to(dev)
    spk = torch.where(inst_t[:, None], data.mapper_spk[iid_t, k_t], data.spk[spk_rows])
    style = data.style_emb[iid_t]
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
