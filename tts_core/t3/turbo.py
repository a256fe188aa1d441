"""Chatterbox Turbo's T3: a GPT-2 over [speaker | prompt speech tokens | text | speech], with the
same instruction adapters as the Llama T3 (AdaLayerNorm around `ln_1`, `ln_2`, `ln_f`).

Official reference (chatterbox-tts 0.1.7): `ChatterboxTurboTTS.from_local` (`tts_turbo.py`) builds
`T3(hp)` with `llama_config_name="GPT2_medium"`, text vocab 50276, speech vocab 6563, no perceiver,
no emotion, no learned position tables, 375 prompt tokens, and `T3.inference_turbo` samples from it.
Module and parameter names follow it, so `t3_turbo_v1.safetensors` loads strictly:

    tfmr.*                       transformers GPT2Model: wte [50276, H] (never read: inputs_embeds),
                                 wpe [8196, H], h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
                                 mlp.c_proj}.{weight,bias}, ln_f.{weight,bias}
    cond_enc.spkr_enc.{weight,bias}   Linear(256 → H)
    text_emb.weight [50276, H], speech_emb.weight [6563, H]
    text_head.weight             Linear(H → 50276, bias=False)
    speech_head.{weight,bias}    Linear(H → 6563)  — GPT-2 T3s have the bias

`TurboT3` is a `T3`: the layout (`tts_core.t3.layout`, switches `perceiver`, `text_markers`,
`learned_positions` off), the adapter scope, teacher forcing, the KV-cached prefill/decode steps and
the stage-2 training forward are T3's own; only the modules, the two embedding functions and
generation (Turbo's sampler) differ here. CFG: Turbo has none — the official `generate` warns that
`cfg_weight` (and `min_p`) are ignored and `inference_turbo` runs one unguided row; so does
`TurboT3.generate`.

Entry point for a checkpoint directory: `load_turbo(DIR)` → (model, text tokenizer, vocoder spec).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import GPT2Config, GPT2Model
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .adapters import attach_adaptive_layernorms
from .config import T3Config
from .layout import SEG_SPEECH, SEG_TEXT, build_generation_layout
from .loading import CheckpointMismatchError, LoadReport, load_t3_checkpoint
from .model import T3, T3Cond, speech_rows

log = logging.getLogger(__name__)

T3_TURBO_FILE = "t3_turbo_v1.safetensors"
S3GEN_MEANFLOW_FILE = "s3gen_meanflow.safetensors"
GPT2_HEAD_DIM = 64  # GPT2_medium: 1024 / 16 heads; a checkpoint's shapes do not say the head count

from tts_core.sampling_defaults import TURBO_SAMPLING  # noqa: E402  ChatterboxTurboTTS.generate's defaults


def turbo_config(**overrides) -> T3Config:
    """Turbo's T3Config (`tts_turbo.py` hp + `llama_configs.GPT2_MEDIUM_CONFIG`); overrides shrink it."""
    base = T3Config(
        family="turbo", backbone="gpt2", perceiver=False, learned_positions=False, text_markers=False, emotion_adv=False,
        text_vocab_size=50276, gpt2_vocab_size=50276, speech_vocab_size=6563, speech_cond_prompt_len=375,
        hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, head_dim=64, intermediate_size=4096,
        max_position_embeddings=8196, layer_norm_eps=1e-5, dropout=0.1, adapt_final_norm=True,
    )
    return base.replace(**overrides)


def gpt2_config(cfg: T3Config) -> GPT2Config:
    """The `transformers.GPT2Config` of `tfmr` (GPT2_medium's computation at `cfg`'s shape)."""
    return GPT2Config(
        vocab_size=cfg.gpt2_vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
        activation_function="gelu_new", layer_norm_epsilon=cfg.layer_norm_eps, initializer_range=0.02,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, use_cache=True,
        attn_implementation=cfg.attn_implementation,
    )


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
class TurboCondEnc(nn.Module):
    """[speaker (1) | prompt speech embeddings (P)]: Chatterbox's `T3CondEnc` with no perceiver and
    no emotion. Each row's real prompt length is the layout's business (`cond_lens`)."""

    def __init__(self, cfg: T3Config):
        super().__init__()
        self.speaker_embed_size = cfg.speaker_embed_size
        self.spkr_enc = nn.Linear(cfg.speaker_embed_size, cfg.hidden_size)

    def forward(self, speaker_emb: Tensor, prompt_emb: Tensor) -> Tensor:
        spk = self.spkr_enc(speaker_emb.reshape(-1, self.speaker_embed_size))[:, None]
        return torch.cat([spk, prompt_emb.to(spk.dtype)], dim=1)


class TurboT3(T3):
    """Turbo's GPT-2 T3 (module doc). Same attribute names as `T3` (tfmr, cond_enc, text_emb,
    speech_emb, text_head, speech_head), so every T3 method that reads them serves both."""

    def __init__(self, cfg: T3Config):
        # T3.__init__ builds the Llama modules; Turbo has its own set, hence nn.Module's init.
        nn.Module.__init__(self)
        if (cfg.backbone, cfg.perceiver, cfg.learned_positions, cfg.text_markers, cfg.emotion_adv) \
                != ("gpt2", False, False, False, False):
            raise ValueError("TurboT3 needs a Turbo config (backbone gpt2, no perceiver, position tables, "
                             "text markers or emotion): use tts_core.t3.turbo.turbo_config")
        self.cfg = cfg
        self.gpt2_config = gpt2_config(cfg)
        H = cfg.hidden_size
        self.tfmr = GPT2Model(self.gpt2_config)
        self.cond_enc = TurboCondEnc(cfg)
        self.text_emb = nn.Embedding(cfg.text_vocab_size, H)
        self.speech_emb = nn.Embedding(cfg.speech_vocab_size, H)
        self.text_head = nn.Linear(H, cfg.text_vocab_size, bias=False)
        self.speech_head = nn.Linear(H, cfg.speech_vocab_size, bias=True)
        if cfg.adapters:
            attach_adaptive_layernorms(self.tfmr, cfg.instruction_dim, cfg.adapter_hidden,
                                       include_final_norm=cfg.adapt_final_norm)

    # -- conditioning and embeddings (no learned positions: GPT-2 adds wpe) ------------------
    def encode_cond(self, cond: T3Cond) -> Tensor:
        """[B, 1 + P, H]: speaker, then `speech_emb` of every prompt token (no position table)."""
        B = cond.batch_size
        tokens = cond.prompt_tokens
        if tokens is None:
            tokens = torch.zeros(B, 0, dtype=torch.long, device=self.device)
        if tokens.shape[1] and bool(((tokens < 0) | (tokens >= self.cfg.speech_vocab_size)).any()):
            raise ValueError("prompt_tokens out of the speech vocabulary")
        return self.cond_enc(cond.speaker_emb, self.speech_emb(tokens))

    def embed_tokens(self, segment: Tensor, token_ids: Tensor, seg_pos: Tensor, uncond: Tensor) -> Tensor:
        """Token embeddings of text and speech columns, zero elsewhere (`seg_pos` unused)."""
        if bool(uncond.any()):
            raise ValueError("Chatterbox Turbo has no classifier-free guidance (no unconditional rows)")
        is_text, is_speech = segment == SEG_TEXT, segment == SEG_SPEECH
        zero = torch.zeros_like(token_ids)
        te = self.text_emb(torch.where(is_text, token_ids, zero))
        se = self.speech_emb(torch.where(is_speech, token_ids, zero))
        out = torch.where(is_text[..., None], te, torch.zeros_like(te))
        return torch.where(is_speech[..., None], se, out)

    def _new_cache(self):
        return DynamicCache(config=self.gpt2_config)

    # -- generation (T3.inference_turbo) --------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        text_tokens: Tensor,
        text_lens: Tensor,
        cond: T3Cond,
        *,
        max_new_tokens: int = 1001,
        temperature: float = TURBO_SAMPLING["temperature"],
        top_k: int = TURBO_SAMPLING["top_k"],
        top_p: float = TURBO_SAMPLING["top_p"],
        repetition_penalty: float = TURBO_SAMPLING["repetition_penalty"],
        min_p: float = 0.0,
        cfg_weight: float = 0.0,
        do_sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """Sample speech tokens as `T3.inference_turbo` does, for a batch of raw texts (tokenizer ids).
        `max_new_tokens` counts every sampled token (EOS included): the official `max_gen_len=1000`
        samples up to 1001. Returns one 1-D tensor of S3 tokens per row (EOS and ids ≥ BOS removed).
        As officially, an EOS drawn as the *first* token does not stop the row (the official loop
        tests EOS from the second token on; `ChatterboxTurboTTS.generate` then drops ids ≥ 6561).
        `cfg_weight` and `min_p` are ignored with a warning, like `ChatterboxTurboTTS.generate`.
        `do_sample=False` takes the argmax of the processed logits (= sampling with `top_k=1`)."""
        if cfg_weight > 0.0 or min_p > 0.0:
            log.warning("Chatterbox Turbo supports neither CFG nor min_p: cfg_weight=%s, min_p=%s ignored",
                        cfg_weight, min_p)
        was_training = self.training
        self.eval()
        try:
            device = self.device
            text_tokens = torch.as_tensor(text_tokens).to(device=device, dtype=torch.long)
            text_lens = torch.as_tensor(text_lens).to(device=device, dtype=torch.long)
            cond = cond.to(device, self.dtype)
            B = text_tokens.shape[0]
            layout = build_generation_layout(self.cfg, text_tokens, text_lens, cond.prompt_lengths())
            process = turbo_logits_processors(temperature, top_k, top_p, repetition_penalty)
            eos = self.cfg.stop_speech_token
            # the official penalty sees BOS at the first step, then only the generated tokens
            history = torch.full((B, 1), self.cfg.start_speech_token, dtype=torch.long, device=device)
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            out = torch.zeros(B, 0, dtype=torch.long, device=device)
            with self.instruction_scope(cond):
                logits, cache = self._prefill(layout, cond)
                for step in range(max_new_tokens):
                    scores = process(history, logits)
                    nxt = scores.argmax(dim=-1) if not do_sample else torch.multinomial(
                        torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(-1)
                    nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
                    out = history = torch.cat([out, nxt[:, None]], dim=1)
                    if step > 0:  # the official loop checks EOS from the second token on
                        finished = finished | (nxt == eos)
                    if bool(finished.all()) or step == max_new_tokens - 1:
                        break
                    logits, cache = self._decode(layout, step, nxt, cache)
            return speech_rows(out, eos, self.cfg.start_speech_token, eos_from=1)
        finally:
            self.train(was_training)


def turbo_logits_processors(temperature: float, top_k: int, top_p: float,
                            repetition_penalty: float) -> LogitsProcessorList:
    """`T3.inference_turbo`'s processors, in its order: temperature → top-k → top-p → repetition penalty."""
    procs = LogitsProcessorList()
    if temperature > 0 and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    return procs


# --------------------------------------------------------------------------------------
# a Turbo checkpoint directory
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TurboFiles:
    """The official files of a Chatterbox Turbo directory that stage 2 and synthesis read."""

    directory: Path
    t3: Path  # t3_turbo_v1.safetensors
    s3gen: Path  # s3gen_meanflow.safetensors (the vocoder; needed only to synthesize)

    @classmethod
    def in_dir(cls, directory: str | os.PathLike) -> "TurboFiles":
        d = Path(directory)
        t3 = d / T3_TURBO_FILE
        if not t3.is_file():
            raise FileNotFoundError(f"{d}: no {T3_TURBO_FILE} (a Chatterbox Turbo directory holds it, "
                                    f"with {S3GEN_MEANFLOW_FILE}, vocab.json and merges.txt)")
        return cls(directory=d, t3=t3, s3gen=d / S3GEN_MEANFLOW_FILE)

    @staticmethod
    def looks_like(directory: str | os.PathLike) -> bool:
        return (Path(directory) / T3_TURBO_FILE).is_file()


def turbo_config_from_checkpoint(path: str | os.PathLike, **overrides) -> T3Config:
    """Turbo's config at the shape of `path`'s tensors (header only, nothing loaded). The head
    count is not in the shapes: hidden / 64 as GPT2_medium (override `num_heads` otherwise)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        needed = ("tfmr.wpe.weight", "tfmr.wte.weight", "text_emb.weight", "speech_emb.weight",
                  "tfmr.h.0.mlp.c_fc.weight", "cond_enc.spkr_enc.weight")
        absent = [k for k in needed if k not in keys]
        if absent:
            raise CheckpointMismatchError(f"{path}: not a Chatterbox Turbo (GPT-2) T3: no {absent}")
        shape = {k: tuple(f.get_slice(k).get_shape()) for k in needed}
    n_positions, hidden = shape["tfmr.wpe.weight"]
    layers = sum(1 for k in keys if k.startswith("tfmr.h.") and k.endswith(".ln_1.weight"))
    found = dict(
        hidden_size=hidden, max_position_embeddings=n_positions, num_layers=layers,
        num_heads=max(1, hidden // GPT2_HEAD_DIM), num_kv_heads=max(1, hidden // GPT2_HEAD_DIM),
        head_dim=GPT2_HEAD_DIM, intermediate_size=shape["tfmr.h.0.mlp.c_fc.weight"][1],
        gpt2_vocab_size=shape["tfmr.wte.weight"][0], text_vocab_size=shape["text_emb.weight"][0],
        speech_vocab_size=shape["speech_emb.weight"][0], speaker_embed_size=shape["cond_enc.spkr_enc.weight"][1],
    )
    return turbo_config(**{**found, **overrides})


class LoadedTurbo(NamedTuple):
    t3: TurboT3
    text_tokenizer: object  # tts_core.stage2.turbo_tokenizer.TurboTextTokenizer
    vocoder: object  # tts_core.vocoders.S3GenSpec: the meanflow S3Gen, loaded when synthesis needs it
    report: LoadReport


def load_turbo(directory: str | os.PathLike, *, instruction_dim: int | None = None, adapters: bool = True,
               **config_overrides) -> LoadedTurbo:
    """A Chatterbox Turbo directory → (TurboT3 loaded strictly from `t3_turbo_v1.safetensors`, in eval mode; its GPT-2
    BPE tokenizer from the directory's files, the meanflow S3Gen spec, the load report). The only keys
    the file may lack are the adapters' (zero-initialised: the model is exactly the official one
    until trained); anything else missing, unknown or misshapen is a `CheckpointMismatchError`."""
    from tts_core.stage2.turbo_tokenizer import TurboTextTokenizer
    from tts_core.vocoders import S3GenSpec

    files = TurboFiles.in_dir(directory)
    if instruction_dim is not None:
        config_overrides["instruction_dim"] = instruction_dim
    cfg = turbo_config_from_checkpoint(files.t3, adapters=adapters, **config_overrides)
    model = TurboT3(cfg)
    report = load_t3_checkpoint(model, files.t3)
    tokenizer = TurboTextTokenizer(files.directory)
    tokenizer.check_fits(cfg.text_vocab_size, cfg.start_text_token, cfg.stop_text_token)
    log.info("Chatterbox Turbo from %s: GPT-2 T3 (%d layers, hidden %d), %s", files.directory,
             cfg.num_layers, cfg.hidden_size, report.summary)
    return LoadedTurbo(model.eval(), tokenizer, S3GenSpec.meanflow_in(files.directory), report)
