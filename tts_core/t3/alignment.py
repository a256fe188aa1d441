"""Chatterbox's multilingual `AlignmentStreamAnalyzer`, per row of a batched generation.

The multilingual T3 implicitly aligns speech to text in a few self-attention heads. While sampling,
Chatterbox (``chatterbox/models/t3/inference/alignment_stream_analyzer.py``, 0.1.7) reads the mean
attention of three heads (layer, head) = (12, 15), (13, 11), (9, 2) from the current speech frame
onto the text columns ``[SOT text EOT]`` and, after CFG and before the repetition penalty:

* **suppresses EOS** while the attended text position is more than 3 tokens from the end (texts of
  more than 5 tokens): the EOS logit becomes −2¹⁵;
* **forces EOS** (every logit −2¹⁵, EOS +2¹⁵) on a *long tail* (after the end of the text was reached,
  the last 3 text tokens kept ≥ 5 frames of attention), an *alignment repetition* (after the end,
  earlier text tokens got > 5 of summed max attention) or a *token repetition* (the last two sampled
  tokens are equal, from the third sampled token on — BOS counts as the first).

`AlignmentStream` is that state machine for one row, with the same tensor arithmetic (so its
decisions equal Chatterbox's for equal attention maps; tested against the official class).
`AlignmentGuard` runs one stream per row of our batched layout: it reads the rows' attention maps
through forward hooks on the aligned layers and, like Chatterbox, switches the backbone to eager
attention for the whole generation (fused kernels return no attention weights; using eager for
every layer also keeps the logits bit-identical to the official inference). What the official
analyzer computes but never uses (false-start detection) is left out.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

LLAMA_ALIGNED_HEADS: tuple[tuple[int, int], ...] = ((12, 15), (13, 11), (9, 2))
FORCE = 2 ** 15  # Chatterbox's ±2**15 logits (safe for every dtype ≥ 16 bit)


class AlignmentStream:
    """One row's analyzer state (Chatterbox's field names); `step` returns the row's logits [1, V]."""

    def __init__(self, text_len: int, eos: int):
        self.eos = int(eos)
        self.alignment = torch.zeros(0, int(text_len))
        self.curr_frame_pos = 0
        self.text_position = 0
        self.complete = False
        self.completed_at = None
        self.generated_tokens: list[int] = []
        self.forced_eos_at: int | None = None  # frame at which EOS was forced (diagnostics, tests)

    def step(self, logits: Tensor, chunk: Tensor, next_token: int | None) -> Tensor:
        """``chunk`` [n, S]: attention of this step's query rows onto the S text columns (the prefix's
        BOS row first, then one row per decoded token). ``next_token``: the last token fed."""
        A_chunk = chunk.clone().cpu()
        A_chunk[:, self.curr_frame_pos + 1:] = 0  # monotonic mask (Chatterbox's TODO comment included)
        self.alignment = torch.cat((self.alignment, A_chunk), dim=0)
        A = self.alignment
        T, S = A.shape

        cur_text_posn = A_chunk[-1].argmax()
        discontinuity = not (-4 < cur_text_posn - self.text_position < 7)
        if not discontinuity:
            self.text_position = cur_text_posn

        self.complete = self.complete or self.text_position >= S - 3
        if self.complete and self.completed_at is None:
            self.completed_at = T

        long_tail = self.complete and (A[self.completed_at:, -3:].sum(dim=0).max() >= 5)
        # (S ≤ 5: no earlier tokens to re-read; Chatterbox's max over an empty dimension raises there)
        alignment_repetition = self.complete and S > 5 and (A[self.completed_at:, :-5].max(dim=1).values.sum() > 5)

        if next_token is not None:
            self.generated_tokens.append(int(next_token))
            self.generated_tokens = self.generated_tokens[-8:]
        token_repetition = len(self.generated_tokens) >= 3 and len(set(self.generated_tokens[-2:])) == 1

        if cur_text_posn < S - 3 and S > 5:
            logits[..., self.eos] = -FORCE
        if long_tail or alignment_repetition or token_repetition:
            logits = -FORCE * torch.ones_like(logits)
            logits[..., self.eos] = FORCE
            if self.forced_eos_at is None:
                self.forced_eos_at = self.curr_frame_pos
        self.curr_frame_pos += 1
        return logits


class AlignmentGuard:
    """`AlignmentStream`s for rows [0, B) of a batched generation (the conditional rows under CFG).

    ``text_start``: first text column (= conditioning length); ``text_lens`` [B]: SOT…EOT lengths;
    ``bos_cols`` [B]: the prefix column of each row's BOS. Use as a context around prefill + decoding."""

    def __init__(self, tfmr: nn.Module, heads, text_start: int, text_lens: Tensor, bos_cols: Tensor, eos: int):
        self.tfmr = tfmr
        self.heads = tuple(tuple(h) for h in heads)
        self.spans = [(int(text_start), int(text_start) + int(n)) for n in text_lens.tolist()]
        self.bos_cols = [int(c) for c in bos_cols.tolist()]
        self.rows = len(self.spans)
        self.streams = [AlignmentStream(j - i, eos) for i, j in self.spans]
        self._maps: dict[int, Tensor] = {}
        self._hooks: list = []
        self._saved_impl = None
        self._prefill = True

    # -- hooks / eager attention --------------------------------------------------------------------------
    def __enter__(self) -> "AlignmentGuard":
        layers = sorted({layer for layer, _ in self.heads})
        for layer in layers:
            attn = self.tfmr.layers[layer].self_attn
            self._hooks.append(attn.register_forward_hook(self._spy(layer)))
        cfg = self.tfmr.config
        self._saved_impl = cfg._attn_implementation
        cfg._attn_implementation = "eager"  # Chatterbox does the same: weights need the eager path
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.tfmr.config._attn_implementation = self._saved_impl
        self._maps.clear()

    def _spy(self, layer: int):
        def hook(module, inputs, output):
            if not (isinstance(output, tuple) and len(output) > 1 and output[1] is not None):
                raise RuntimeError(f"layer {layer} returned no attention weights: the alignment guard needs eager "
                                   "attention")
            self._maps[layer] = output[1][: self.rows].detach()  # [B, heads, q, K]
        return hook

    # -- one decoding step ----------------------------------------------------------------------------------
    def step(self, logits: Tensor, last_tokens: Tensor, active: Tensor) -> Tensor:
        """logits [B, V] after CFG → logits with EOS suppressed / forced per row (rows not ``active``
        are left alone: they already ended)."""
        maps = [self._maps[layer][:, head] for layer, head in self.heads]  # each [B, q, K]
        out = logits.clone()
        for b, stream in enumerate(self.streams):
            if not bool(active[b]):
                continue
            i, j = self.spans[b]
            rows = slice(self.bos_cols[b], self.bos_cols[b] + 1) if self._prefill else slice(None)
            aligned = torch.stack([m[b, rows, i:j].cpu() for m in maps]).mean(dim=0)
            out[b: b + 1] = stream.step(out[b: b + 1], aligned, int(last_tokens[b]))
        self._prefill = False
        return out
