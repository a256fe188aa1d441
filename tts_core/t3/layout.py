"""The ONE builder of T3's input layout, for training batches and for generation alike.

Every row is laid out left-aligned and contiguous, padding only after it:

    [ cond (34) | SOT text… EOT | BOS speech… (EOS) | pad … ]

* `position_ids` (Llama RoPE) count 0, 1, 2, … over the real tokens of the row; padding
  columns continue the count (they are never attended by a real token, so their value only
  keeps `transformers` from mistaking the batch for packed sequences).
* learned positions (`seg_pos`) restart per segment as in Chatterbox: text 0.. from SOT,
  speech 0.. from BOS (BOS is speech position 0, speech token j is at position j + 1).
* exactly one BOS per row, raw inputs may not contain SOT/EOT/BOS/EOS (checked).
* labels are next-token targets, already shifted here — once, nowhere else: the label at a
  text column is the next text token (SOT→t₀ … t_last→EOT), at a speech column the next speech
  token (BOS→s₀ … s_last→EOS); every other column is IGNORE_INDEX.

Generation uses the same builder with no speech (prefix = `[cond | SOT text EOT | BOS]`), then
`T3Layout.decode_step(t, tokens)` gives the embedding ids / positions / mask of step t, which
are by construction those the training layout gives speech token t. This fixes the
Chatterbox mismatches listed in docs/architecture.md "Known failure modes" 5 (double BOS at inference,
text padding between text and speech, no attention mask, no next-token shift).

CFG (`with_cfg`): Chatterbox doubles the batch; the second copy ("uncond") has its text *token*
embeddings zeroed (text position embeddings and all conditioning kept). `uncond` marks those
rows; the model applies the zeroing.

Instruction guidance (`with_guidance`): the rows are tiled into blocks of B, in this order —
`[cond | text-uncond (with text CFG) | instruction-uncond (with instruction guidance)]`. The
instruction-uncond block is laid out exactly like the cond block (same tokens, `uncond` False);
what differs is only its conditioning: the *null instruction* (`T3Cond.with_null_instruction`:
instruction mask 0, so every adapter returns norm(x)) — the row stage 2 trains by instruction
dropout. `GUIDANCE_BLOCKS` names the blocks.

Turbo (`cfg.backbone == "gpt2"`, `tts_core.t3.turbo`) is laid out by the same builder, from its
config switches:

    [ speaker (1) | prompt s₀ … s_{P-1} (P per row) | t₀ … t_last | BOS speech… (EOS) | pad … ]

* no perceiver (`cfg.perceiver=False`): the conditioning is the speaker position plus one position
  per prompt token, so each row has its own `cond_lens` (1 + its prompt length; 1 with no prompt),
  no emotion position;
* no SOT/EOT (`cfg.text_markers=False`): the text segment is the tokenizer's ids only — Turbo's
  GPT-2 BPE uses 0 and 255 as ordinary tokens (Chatterbox's `inference_turbo` adds no markers);
* no learned position tables (`cfg.learned_positions=False`): `seg_pos` is unused; GPT-2 adds its own
  `wpe[position_ids]`, and `position_ids` count 0, 1, 2, … over the row exactly as the official
  single-row inference does (no gaps, since each row is contiguous).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch import Tensor

from .config import IGNORE_INDEX, T3Config

SEG_PAD, SEG_COND, SEG_TEXT, SEG_SPEECH = 0, 1, 2, 3
COND, TEXT_UNCOND, INSTRUCTION_UNCOND = "cond", "text-uncond", "instruction-uncond"


def guidance_blocks(text_cfg: bool, instruction_cfg: bool) -> tuple[str, ...]:
    """The row blocks of a guided generation batch, in order (module doc, "Instruction guidance")."""
    return (COND,) + ((TEXT_UNCOND,) if text_cfg else ()) + ((INSTRUCTION_UNCOND,) if instruction_cfg else ())


def pad_sequences(seqs: Sequence[Tensor | Sequence[int]], pad_value: int = 0) -> tuple[Tensor, Tensor]:
    """List of 1-D token sequences → (padded [B, max_len] long, lengths [B] long)."""
    ts = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    lens = torch.tensor([t.numel() for t in ts], dtype=torch.long)
    out = torch.full((len(ts), max(1, int(lens.max()) if len(ts) else 1)), pad_value, dtype=torch.long)
    for i, t in enumerate(ts):
        out[i, : t.numel()] = t
    return out, lens


@dataclass(frozen=True)
class T3Step:
    """Inputs of one KV-cached decoding step: one new speech token per row."""

    segment: Tensor  # [B, 1]  all SEG_SPEECH
    token_ids: Tensor  # [B, 1]
    seg_pos: Tensor  # [B, 1]  learned speech position
    position_ids: Tensor  # [B, 1]  RoPE position
    attention_mask: Tensor  # [B, prefix_len + step + 1]  over the whole cache
    uncond: Tensor  # [B] bool


@dataclass(frozen=True)
class T3Layout:
    segment: Tensor  # [B, L] long, SEG_*
    token_ids: Tensor  # [B, L] long: text id on text columns, speech id on speech columns, else 0
    seg_pos: Tensor  # [B, L] long: learned-position index within the segment (cond: slot index)
    position_ids: Tensor  # [B, L] long: RoPE positions
    attention_mask: Tensor  # [B, L] long: 1 real, 0 pad
    text_labels: Tensor  # [B, L] long: next text token or IGNORE_INDEX
    speech_labels: Tensor  # [B, L] long: next speech token or IGNORE_INDEX
    seq_lens: Tensor  # [B] real length of each row
    text_lens: Tensor  # [B] text segment length, SOT and EOT included (when the T3 has them)
    speech_lens: Tensor  # [B] speech segment length, BOS (and EOS) included
    uncond: Tensor  # [B] bool: CFG unconditional copy
    cond_len: int  # width of the conditioning block: the largest of `cond_lens`
    cond_lens: Tensor  # [B] conditioning positions of each row (all cond_len with a perceiver)

    @property
    def batch_size(self) -> int:
        return self.segment.shape[0]

    @property
    def length(self) -> int:
        return self.segment.shape[1]

    @property
    def speech_start(self) -> Tensor:
        """[B] column of each row's BOS."""
        return self.cond_lens + self.text_lens

    @property
    def last_index(self) -> Tensor:
        """[B] column of each row's last real token (BOS for a generation prefix)."""
        return self.seq_lens - 1

    def to(self, device) -> "T3Layout":
        return replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "cond_len"}
        )

    def with_cfg(self) -> "T3Layout":
        """Rows [0, B) conditional, rows [B, 2B) their unconditional copies (Chatterbox CFG)."""
        return self.with_guidance(text_cfg=True, instruction_cfg=False)

    def with_guidance(self, *, text_cfg: bool, instruction_cfg: bool) -> "T3Layout":
        """The rows tiled into the guidance blocks `guidance_blocks(text_cfg, instruction_cfg)` (module
        doc): block "text-uncond" marked `uncond` (text token embeddings zeroed), block
        "instruction-uncond" an exact copy of the cond block (its null instruction is conditioning)."""
        if bool(self.uncond.any()):
            raise ValueError("layout already has CFG rows")
        blocks = guidance_blocks(text_cfg, instruction_cfg)
        tiled = {
            f.name: torch.cat([getattr(self, f.name)] * len(blocks), dim=0)
            for f in fields(self)
            if f.name not in ("cond_len", "uncond")
        }
        uncond = torch.cat([torch.full_like(self.uncond, b == TEXT_UNCOND) for b in blocks])
        return T3Layout(**tiled, uncond=uncond, cond_len=self.cond_len)

    def decode_step(self, step: int, tokens: Tensor) -> T3Step:
        """Inputs for feeding generated speech token number `step` (0-based) of every row, after
        this layout (the prefix) has been run. Token `step` sits at learned speech position
        `speech_lens + step` (= step + 1 after a lone BOS) and RoPE position `seq_lens + step` —
        exactly where `build_layout` puts it in a teacher-forced sequence. The cache holds the
        prefix's padding columns; the mask keeps them unattended."""
        B = self.batch_size
        tokens = tokens.to(device=self.segment.device, dtype=torch.long).reshape(B, 1)
        return T3Step(
            segment=torch.full_like(tokens, SEG_SPEECH),
            token_ids=tokens,
            seg_pos=(self.speech_lens + step).reshape(B, 1),
            position_ids=(self.seq_lens + step).reshape(B, 1),
            attention_mask=torch.cat(
                [self.attention_mask, self.attention_mask.new_ones(B, step + 1)], dim=1
            ),
            uncond=self.uncond,
        )


def _check_raw(name: str, raw: Tensor, lens: Tensor, lo: int, hi: int, forbidden: Sequence[int]) -> None:
    if raw.dim() != 2 or lens.dim() != 1 or raw.shape[0] != lens.shape[0]:
        raise ValueError(f"{name}: expected [B, N] tokens and [B] lengths, got {tuple(raw.shape)}, {tuple(lens.shape)}")
    if bool((lens < 0).any()) or bool((lens > raw.shape[1]).any()):
        raise ValueError(f"{name}: lengths must lie in [0, {raw.shape[1]}], got {lens.tolist()}")
    valid = torch.arange(raw.shape[1], device=raw.device)[None] < lens[:, None]
    vals = raw[valid]
    if vals.numel() == 0:
        return
    if bool((vals < lo).any()) or bool((vals >= hi).any()):
        raise ValueError(f"{name}: token ids must lie in [{lo}, {hi}) (raw tokens, no special tokens)")
    for tok in forbidden:
        if bool((vals == tok).any()):
            raise ValueError(
                f"{name}: raw tokens contain special id {tok}; the layout adds SOT/EOT/BOS/EOS itself"
            )


def cond_lens(cfg: T3Config, prompt_lens: Tensor | None, batch: int, device=None) -> Tensor:
    """[B] conditioning positions per row: `cfg.cond_len` for every row of a perceiver T3 (34);
    without a perceiver (Turbo) speaker (1) + the row's prompt tokens (+ emotion)."""
    if cfg.perceiver or prompt_lens is None:
        fixed = cfg.cond_len if cfg.perceiver else cfg.cond_len - cfg.speech_cond_prompt_len
        return torch.full((batch,), fixed, dtype=torch.long, device=device)
    prompt_lens = torch.as_tensor(prompt_lens, device=device).to(torch.long).reshape(-1)
    if prompt_lens.shape[0] != batch or bool((prompt_lens < 0).any()) \
            or bool((prompt_lens > cfg.speech_cond_prompt_len).any()):
        raise ValueError(f"prompt_lens must be {batch} values in [0, {cfg.speech_cond_prompt_len}], "
                         f"got {prompt_lens.tolist()}")
    return cfg.cond_len - cfg.speech_cond_prompt_len + prompt_lens


def build_layout(
    cfg: T3Config,
    text_tokens: Tensor,
    text_lens: Tensor,
    speech_tokens: Tensor | None = None,
    speech_lens: Tensor | None = None,
    *,
    append_eos: bool = True,
    prompt_lens: Tensor | None = None,
) -> T3Layout:
    """Raw text tokens [B, Tm] (no SOT/EOT) and raw S3 speech tokens [B, Sm] (< BOS, no BOS/EOS)
    with their lengths → the full layout. `speech_tokens=None` and `append_eos=False` give a
    generation prefix ending in BOS (see `build_generation_layout`). `prompt_lens` [B] (the
    conditioning's prompt tokens per row) sets the rows' conditioning lengths when the T3 has no
    perceiver (Turbo); a perceiver T3 ignores it."""
    device = text_tokens.device
    text_tokens = text_tokens.to(torch.long)
    text_lens = torch.as_tensor(text_lens, device=device).to(torch.long).reshape(-1)
    B = text_tokens.shape[0]
    if speech_tokens is None:
        speech_tokens = torch.zeros(B, 0, dtype=torch.long, device=device)
        speech_lens = torch.zeros(B, dtype=torch.long, device=device)
    speech_tokens = speech_tokens.to(device=device, dtype=torch.long)
    if speech_lens is None:
        raise ValueError("speech_lens is required with speech_tokens")
    speech_lens = torch.as_tensor(speech_lens, device=device).to(torch.long).reshape(-1)

    markers = (cfg.start_text_token, cfg.stop_text_token) if cfg.text_markers else ()
    _check_raw("text_tokens", text_tokens, text_lens, 0, cfg.text_vocab_size, markers)
    _check_raw("speech_tokens", speech_tokens, speech_lens, 0, cfg.start_speech_token, ())
    if bool((text_lens > cfg.max_text_tokens).any()):
        raise ValueError(f"text longer than max_text_tokens={cfg.max_text_tokens}")
    if bool((speech_lens > cfg.max_speech_tokens).any()):
        raise ValueError(f"speech longer than max_speech_tokens={cfg.max_speech_tokens}")

    C = cond_lens(cfg, prompt_lens, B, device)
    T = text_lens + (2 if markers else 0)  # (SOT) … (EOT)
    S = speech_lens + 1 + int(append_eos)  # BOS … (EOS)
    n = C + T + S
    L = int(n.max())

    col = torch.arange(L, device=device)[None, :].expand(B, L)
    tp = col - C[:, None]  # position within text segment
    sp = tp - T[:, None]  # position within speech segment
    is_cond = col < C[:, None]
    is_text = (tp >= 0) & (tp < T[:, None])
    is_speech = (sp >= 0) & (sp < S[:, None])

    # raw token j sits at segment position j + 1 (after SOT / BOS); gather with clamped indices
    def gather_raw(raw: Tensor, pos: Tensor) -> Tensor:
        if raw.shape[1] == 0:
            return torch.zeros_like(pos)
        return raw.gather(1, (pos - 1).clamp(0, raw.shape[1] - 1))

    if markers:
        text_tok = gather_raw(text_tokens, tp)
        text_tok = torch.where(tp == 0, cfg.start_text_token, text_tok)
        text_tok = torch.where(tp == T[:, None] - 1, cfg.stop_text_token, text_tok)
    else:  # raw token j at text position j
        text_tok = gather_raw(text_tokens, tp + 1)
    speech_tok = gather_raw(speech_tokens, sp)
    speech_tok = torch.where(sp == 0, cfg.start_speech_token, speech_tok)
    if append_eos:
        speech_tok = torch.where(sp == S[:, None] - 1, cfg.stop_speech_token, speech_tok)

    zero = torch.zeros_like(col)
    token_ids = torch.where(is_text, text_tok, torch.where(is_speech, speech_tok, zero))
    segment = torch.where(
        is_cond, SEG_COND, torch.where(is_text, SEG_TEXT, torch.where(is_speech, SEG_SPEECH, SEG_PAD))
    )
    seg_pos = torch.where(is_cond, col, torch.where(is_text, tp, torch.where(is_speech, sp, zero)))
    attention_mask = (segment != SEG_PAD).long()
    position_ids = col.clone()  # rows are contiguous from column 0: RoPE position == column

    # next-token labels: the shift happens here and only here
    nxt_tok = torch.cat([token_ids[:, 1:], torch.zeros_like(token_ids[:, :1])], dim=1)
    nxt_seg = torch.cat([segment[:, 1:], torch.full_like(segment[:, :1], SEG_PAD)], dim=1)
    ignore = torch.full_like(token_ids, IGNORE_INDEX)
    text_labels = torch.where(is_text & (nxt_seg == SEG_TEXT), nxt_tok, ignore)
    speech_labels = torch.where(is_speech & (nxt_seg == SEG_SPEECH), nxt_tok, ignore)

    return T3Layout(
        segment=segment,
        token_ids=token_ids,
        seg_pos=seg_pos,
        position_ids=position_ids,
        attention_mask=attention_mask,
        text_labels=text_labels,
        speech_labels=speech_labels,
        seq_lens=n,
        text_lens=T,
        speech_lens=S,
        uncond=torch.zeros(B, dtype=torch.bool, device=device),
        cond_len=int(C.max()) if B else cfg.cond_len,
        cond_lens=C,
    )


def build_generation_layout(cfg: T3Config, text_tokens: Tensor, text_lens: Tensor,
                            prompt_lens: Tensor | None = None) -> T3Layout:
    """Generation prefix `[cond | SOT text EOT | BOS]` (Turbo: `[cond | text | BOS]`): the training
    builder with no speech."""
    return build_layout(cfg, text_tokens, text_lens, None, None, append_eos=False, prompt_lens=prompt_lens)
