"""The one place that says what a cache store holds: array names, dtypes, widths, chunking, version.

Layout of a store (a Zarr v3 group, on any fsspec URL):

    <store>/                          attrs: see `cache.store.StoreInfo`
      clips/spk_emb      float32 [N, 256]   raw VoiceEncoder embedding (never normalised on disk)
      clips/xvec         float32 [N, 192]   raw x-vector
      clips/spk_norm     float32 [N]        L2 norm of the raw spk_emb
      clips/xvec_norm    float32 [N]        L2 norm of the raw xvec
      clips/duration     float32 [N]        seconds, after conversion to 16 kHz mono
      clips/instruction_id int32 [N]        row of instructions/*, -1 when the line had no instruction
      clips/status       int8    [N]        STATUS_* below; rows are metadata data-lines, in file order
      clips/clip_row     int32   [N]        row holding this line's audio arrays: the row itself for an OK clip,
                                            the clip's first line for another caption (STATUS_CAPTION), -1 else.
                                            (clip_row, instruction_id) of the OK and caption rows is the table of
                                            (clip, instruction) pairs; audio-derived arrays live at the clip's row
                                            only (a caption row's are zeros / empty)
      clips/token_offsets int64  [N + 1]    speech tokens of row i are tokens/flat[off[i]:off[i+1]]
      tokens/flat        int16   [T]        speech tokens, all clips concatenated
      clips/prompt_offsets int64 [N + 1]    prompt tokens of row i are prompt_tokens/flat[off[i]:off[i+1]]
      prompt_tokens/flat int16   [P]        S3 tokens of each clip's first 6 s (≤ 150): the English and
                                            multilingual T3's prompt as Chatterbox builds it from a reference
      clips/prompt15_offsets, prompt15_tokens/flat   the same for the first 15 s (≤ 375): Turbo's prompt
                                            (`PROMPTS`; tts_core.reference, tts_core.t3.families)
      instructions/offsets int64 [U + 1]    states of instruction j are instructions/states[off[j]:off[j+1]]
      instructions/states float16 [S, H]    text-encoder last hidden states, padding stripped
      models/mel_vq/*                        codebook of the embedded mel-vq tokenizer, when that one is used
      models/world_vq/*                      envelopes + aperiodicity of the embedded world-vq tokenizer, when used
                                            (which kind: attrs extra.speech_tokenizer_kind, absent = mel-vq;
                                            tts_core.encoders.embedded)
      manifest.parquet                       one row per data line (see MANIFEST_COLUMNS)
      norm_report.{json,md,png}              published beside the arrays (also as Prefect artifacts)

Every array's codecs are Blosc/zstd then CRC32C, and every chunk inside an array's shape is written (even
all-fill ones), so a finished store's reader refuses a corrupted or missing chunk (cache/store.py).

Rows are fixed by metadata line order (quarantined lines keep their row, filled with zeros), so a
resumed or sharded build writes every row to the same place an uninterrupted build does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tts_core.reference import PROMPT_SECONDS, TURBO_PROMPT_SECONDS

# 2: prompt tokens of each clip's first PROMPT_SECONDS and a manifest language column; every array ends its
#    codec chain with a CRC32C, every chunk of a finished store exists (empty chunks are written), attrs
#    record manifest_sha256.
# 3: a second prompt array, tokens of each clip's first 15 s (Chatterbox Turbo's prompt).
# 4: many captions per clip: clips/clip_row and STATUS_CAPTION (tts_core.captions); a clip is its resolved
#    audio file (+ speaker), so lines that spell one file differently are no longer separate rows of audio.
# Older stores are refused with "rebuild" (build-cache resumes nothing across versions; it rebuilds). A
# schema-3 store would read as one caption per clip, but its rows of one file spelled twice were encoded
# twice and its later captions quarantined: rebuilding is what recovers them.
SCHEMA_VERSION = 4
SCHEMA_CHANGE = "many captions per clip"  # what SCHEMA_VERSION added, in the refusal of an older store

SPK_DIM = 256
XVEC_DIM = 192

# Default rows per chunk of every per-clip array (recorded per store as `chunk_rows`); also the
# build's batch size, so a batch never shares a chunk with another (resume and sharded writers rely on it).
CLIP_CHUNK = 256
TOKEN_CHUNK = 1 << 16
STATE_CHUNK_ROWS = 4096

STATUS_PENDING = 0
STATUS_OK = 1
STATUS_QUARANTINED = 2
STATUS_CAPTION = 3  # usable line whose audio is the clip at clips/clip_row (its own audio arrays are empty)
STATUS_NAMES = {STATUS_PENDING: "pending", STATUS_OK: "ok", STATUS_QUARANTINED: "quarantined",
                STATUS_CAPTION: "caption"}


@dataclass(frozen=True)
class ArraySpec:
    path: str
    dtype: np.dtype
    width: int | None  # None: 1-D per clip
    fill: float | int = 0


CLIP_ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("clips/spk_emb", np.dtype("float32"), SPK_DIM),
    ArraySpec("clips/xvec", np.dtype("float32"), XVEC_DIM),
    ArraySpec("clips/spk_norm", np.dtype("float32"), None),
    ArraySpec("clips/xvec_norm", np.dtype("float32"), None),
    ArraySpec("clips/duration", np.dtype("float32"), None),
    ArraySpec("clips/instruction_id", np.dtype("int32"), None, -1),
    ArraySpec("clips/status", np.dtype("int8"), None, STATUS_PENDING),
    ArraySpec("clips/clip_row", np.dtype("int32"), None, -1),
)
TOKEN_OFFSETS = "clips/token_offsets"
TOKENS = "tokens/flat"
TOKEN_DTYPE = np.dtype("int16")  # S3 vocab 6561 < 2**15


@dataclass(frozen=True)
class PromptArrays:
    """One stored prompt: S3 tokens of each clip's first `seconds` (cut before tokenizing, as Chatterbox's
    reference path does), at most `max_tokens` (the T3's speech_cond_prompt_len)."""

    seconds: float
    max_tokens: int
    offsets: str
    flat: str


# One per distinct `prompt_seconds` of tts_core.t3.families.FAMILIES (a test keeps the two in step):
# English/multilingual ENC_COND_LEN = 6 s → 150 tokens; Turbo 15 s → 375 tokens.
PROMPTS = (PromptArrays(PROMPT_SECONDS, 150, "clips/prompt_offsets", "prompt_tokens/flat"),
           PromptArrays(TURBO_PROMPT_SECONDS, 375, "clips/prompt15_offsets", "prompt15_tokens/flat"))
PROMPT_OFFSETS, PROMPT_TOKENS, PROMPT_MAX_TOKENS = PROMPTS[0].offsets, PROMPTS[0].flat, PROMPTS[0].max_tokens
# (offsets, flat) of every ragged token array: the speech tokens, then each prompt of PROMPTS in order
RAGGED_TOKENS = ((TOKEN_OFFSETS, TOKENS),) + tuple((p.offsets, p.flat) for p in PROMPTS)


def prompt_arrays(seconds: float) -> PromptArrays:
    """The stored prompt a T3 family whose reference prompt is the first `seconds` reads."""
    for p in PROMPTS:
        if abs(p.seconds - seconds) < 1e-9:
            return p
    raise ValueError(f"the cache stores prompts of the first {[p.seconds for p in PROMPTS]} s, not {seconds} s: "
                     f"add a PromptArrays to cache.schema.PROMPTS for it (and rebuild the cache)")

INSTRUCTION_OFFSETS = "instructions/offsets"
INSTRUCTION_STATES = "instructions/states"
STATE_DTYPE = np.dtype("float16")
MEL_VQ_GROUP = "models/mel_vq"
TOKENIZER_GROUPS = {"mel-vq": MEL_VQ_GROUP, "world-vq": "models/world_vq"}  # embedded kind -> its arrays

MANIFEST_FILE = "manifest.parquet"
MANIFEST_PARTS = "manifest_parts"  # one parquet per committed batch while building
MANIFEST_COLUMNS = (
    "row", "clip_id", "audio_path", "transcript", "instruction", "speaker", "instruction_id",
    "status", "reason", "detail", "duration", "line", "language",
)
# What a store's directory holds at its top (besides norm_report.*): creating a store clears its location,
# so a location holding anything else is refused, never cleared.
STORE_ENTRIES = frozenset({"zarr.json", "clips", "tokens", *(p.flat.split("/")[0] for p in PROMPTS), "instructions",
                           MEL_VQ_GROUP.split("/")[0],
                           MANIFEST_FILE, MANIFEST_PARTS})

# The frozen models a store records; each is a tts_core.identity.ModelIdentity dict in attrs.
MODEL_ROLES = ("voice_encoder", "xvector", "speech_tokenizer", "text_encoder")


@dataclass(frozen=True)
class Normalisation:
    """Which vectors the reader L2-normalises. Raw values and raw norms stay on disk regardless."""

    spk_emb: bool = True
    xvec: bool = True

    def to_dict(self) -> dict:
        return {"spk_emb": self.spk_emb, "xvec": self.xvec}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalisation":
        return cls(spk_emb=bool(d["spk_emb"]), xvec=bool(d["xvec"]))
