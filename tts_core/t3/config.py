"""T3 configuration: the ONE place for token ids, shapes and the Llama backbone settings.

Values of the "520m" preset are those of Chatterbox's English T3 (`t3_cfg.safetensors`):
`chatterbox/models/t3/modules/t3_config.py` and `llama_configs.py` ("Llama_520M").
Token ids are shared by every preset (the tiny model speaks the same token language), so a
layout or a test written against one preset is valid for the other. The one exception: stage 2 sizes a
fresh preset's speech table to the store's embedded speech tokenizer (`T3Config.sized_to_speech_codes`:
V + 2 rows, BOS V, EOS V + 1); layouts read the ids from the config, never the constants.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import transformers
from transformers import LlamaConfig

IGNORE_INDEX = -100  # label value that the next-token losses skip
# Chatterbox's speech table: (rows, BOS, EOS); the S3 codes are the ids below BOS (6561)
CHATTERBOX_SPEECH_IDS = (8194, 6561, 6562)

# Chatterbox's llama3 rope scaling (llama_configs.LLAMA_520M_CONFIG_DICT["rope_scaling"]).
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class T3Config:
    # --- token language (identical for every preset; speech ids: `sized_to_speech_codes`) ---
    text_vocab_size: int = 704
    start_text_token: int = 255  # SOT
    stop_text_token: int = 0  # EOT
    speech_vocab_size: int = 8194
    start_speech_token: int = 6561  # BOS; S3 speech tokens are < 6561
    stop_speech_token: int = 6562  # EOS
    max_text_tokens: int = 2048  # text_pos_emb has max_text_tokens + 2 rows (SOT, EOT)
    max_speech_tokens: int = 4096  # speech_pos_emb has max_speech_tokens + 4 rows

    # --- conditioning ---
    speaker_embed_size: int = 256  # VoiceEncoder embedding
    speech_cond_prompt_len: int = 150  # prompt speech tokens Chatterbox feeds (6 s at 25 Hz)
    perceiver_queries: int = 32
    perceiver_heads: int = 4
    perceiver_dropout: float = 0.2  # Chatterbox's AttentionBlock2 default, active in train mode
    emotion_adv: bool = True

    # --- Llama backbone ---
    hidden_size: int = 1024
    num_layers: int = 30
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict = field(default_factory=lambda: dict(LLAMA3_ROPE_SCALING))
    max_position_embeddings: int = 131072
    llama_vocab_size: int = 8  # unused `tfmr.embed_tokens` (8 rows), kept: it is an official key
    attn_implementation: str = "sdpa"

    # --- checkpoint family (tts_core.t3.families) ---
    family: str = "english"  # "english" | "multilingual" | "turbo": which official Chatterbox T3 this shape is
    # (layer, head) attention maps the multilingual AlignmentStreamAnalyzer reads while generating
    # (tts_core.t3.alignment); empty: no analyzer (English, presets).
    alignment_heads: tuple[tuple[int, int], ...] = ()

    # --- instruction adapters (AdaRMSNorm around the Llama RMSNorms) ---
    adapters: bool = True
    instruction_dim: int = 1024  # stage-1 mapper's style embedding size
    adapter_hidden: int = 256  # Linear(instruction_dim→adapter_hidden)→SiLU→Linear(→2·hidden)
    adapt_final_norm: bool = False  # 2 adapters per layer (the two RMSNorms of each block); tfmr.norm left plain

    # --- Chatterbox Turbo: GPT-2 backbone, raw prompt, no position tables (tts_core/t3/turbo.py) ---
    backbone: str = "llama"  # "llama" (English / multilingual T3) or "gpt2" (Turbo, transformers GPT2Model)
    perceiver: bool = True  # False: the prompt's speech embeddings enter raw, one position per token
    learned_positions: bool = True  # text_pos_emb / speech_pos_emb; False: none (GPT-2 adds its own `wpe`)
    text_markers: bool = True  # SOT … EOT around the text; False: the tokenizer's ids only (Turbo)
    gpt2_vocab_size: int = 50276  # rows of GPT-2's `tfmr.wte`: never read (inputs_embeds), an official key
    layer_norm_eps: float = 1e-5  # GPT-2 LayerNorm
    dropout: float = 0.1  # GPT-2 embd/attn/resid dropout (GPT2_medium's value; active in train mode)

    def __post_init__(self):
        # JSON round trips give lists: keep the declared tuple type so configs compare equal
        object.__setattr__(self, "alignment_heads", tuple(tuple(int(v) for v in p) for p in self.alignment_heads))
        for layer, head in self.alignment_heads:
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
                raise ValueError(f"alignment head ({layer}, {head}) outside a {self.num_layers}-layer, "
                                 f"{self.num_heads}-head backbone")

    # ---------------------------------------------------------------------------------
    @property
    def cond_len(self) -> int:
        """Conditioning positions: speaker (1) + perceiver queries (32) + emotion (1) = 34. Without a
        perceiver (Turbo) the most a row can have: speaker (1) + every prompt token (375); each row
        then has its own count (`tts_core.t3.layout.cond_lens`)."""
        prompt = self.perceiver_queries if self.perceiver else self.speech_cond_prompt_len
        return 1 + prompt + (1 if self.emotion_adv else 0)

    @property
    def text_pos_size(self) -> int:
        return self.max_text_tokens + 2

    @property
    def speech_pos_size(self) -> int:
        return self.max_speech_tokens + 4

    @classmethod
    def preset(cls, name: str, **overrides) -> "T3Config":
        """`"520m"`: Chatterbox's real shape. `"tiny"` (CI, demo) and `"small"` (the lab): same token
        language, CPU-trainable."""
        if name not in PRESET_SHAPES:
            raise ValueError(f"unknown T3 preset {name!r}; choose one of {sorted(PRESET_SHAPES)}")
        return dataclasses.replace(cls(**PRESET_SHAPES[name]), **overrides)

    def replace(self, **changes) -> "T3Config":
        return dataclasses.replace(self, **changes)

    @property
    def speech_codes(self) -> int | None:
        """The speech codes (ids below BOS) this config was sized to by `sized_to_speech_codes`; None when it
        keeps Chatterbox's table (8194 rows, BOS 6561, EOS 6562, the S3 vocabulary)."""
        if (self.speech_vocab_size, self.start_speech_token, self.stop_speech_token) == CHATTERBOX_SPEECH_IDS:
            return None
        return self.start_speech_token

    def sized_to_speech_codes(self, codes: int | None) -> "T3Config":
        """The speech embedding and head sized to a tokenizer of ``codes`` codes: ``codes + 2`` rows, BOS
        ``codes``, EOS ``codes + 1`` (no id between the codes and BOS that nothing could decode). None: this
        config unchanged (Chatterbox's table). Only fresh weights are sized (`tts_core.stage2.model.build_t3`)."""
        if codes is None:
            return self
        if codes < 1:
            raise ValueError(f"a speech tokenizer needs at least one code, not {codes}")
        return self.replace(speech_vocab_size=codes + 2, start_speech_token=codes, stop_speech_token=codes + 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "T3Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown T3Config fields: {sorted(unknown)}")
        return cls(**d)

    def to_llama_config(self) -> LlamaConfig:
        """The `transformers.LlamaConfig` of `tfmr` (Chatterbox's Llama_520M dict at this shape)."""
        kwargs = dict(
            vocab_size=self.llama_vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            mlp_bias=False,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=0.02,
            tie_word_embeddings=False,
            pretraining_tp=1,
            use_cache=True,
            attn_implementation=self.attn_implementation,
        )
        scaling = {k: v for k, v in self.rope_scaling.items()}
        if int(transformers.__version__.split(".")[0]) >= 5:
            kwargs["rope_parameters"] = {**scaling, "rope_theta": self.rope_theta}
        else:  # transformers 4.x spelling
            kwargs["rope_scaling"] = scaling
            kwargs["rope_theta"] = self.rope_theta
        return LlamaConfig(**kwargs)


# T3 presets: overrides of the 520m defaults. "small" is what the lab trains on 2 CPU cores (~0.2 s/step at
# batch 16): at the same 3000 steps it follows pitch and rate on held-out voices clearly better than "tiny"
# (docs/benchmarks.md, "Lab").
_CPU = dict(instruction_dim=32, max_text_tokens=512, max_speech_tokens=1024)
PRESET_SHAPES: dict[str, dict] = {
    "520m": {},
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=128,
                 adapter_hidden=32, **_CPU),
    "small": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, intermediate_size=256,
                  adapter_hidden=64, **_CPU),
}
