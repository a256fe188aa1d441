"""A stage-2 run directory's files (module doc of `tts_core.stage2.train`, "Checkpoints"): their names, and the
run-level files beside the checkpoints — the published final checkpoint, the embedded tokenizer's codebook.

Inference reads a run through these names (`tts_core.synthesis`), so this module imports no training code.
"""
from __future__ import annotations

from pathlib import Path

from tts_core.atomic_files import atomic_copy

T3_WEIGHTS = "t3_cfg.safetensors"
STAGE2_META = "stage2.json"
TRAIN_STATE = "train_state.pt"
LATEST = "latest.json"
METRICS = "metrics.jsonl"
SPEECH_CODEBOOK = "mel_vq.safetensors"  # embedded tokenizer codebook beside a run (absent for S3 runs)
PREPARED = "prepared.safetensors"
FORMAT = "instruct-tts/stage2"
# What a fresh start in an existing out_dir removes (the fingerprinted prepared tables are kept).
RUN_FILES = (METRICS, "report.md", "loss_curves.png", T3_WEIGHTS, STAGE2_META, "tokenizer.json",
             "text_tokenizer.json", "chatterbox_tokenizer.json")


def absolute(url: str) -> str:
    """Local paths recorded absolute (a run is used from other working directories); URLs as given."""
    return url if "://" in url else str(Path(url).resolve())


def store_speech_tokenizer(store: str):
    """The store's embedded speech tokenizer (mel-vq / world-vq, restored from its arrays), or None when the store
    holds S3 tokens."""
    from cache.writer import saved_codebook
    from tts_core.encoders.embedded import restore

    codebook = saved_codebook(store)
    return None if codebook is None else restore(codebook)


def save_speech_codebook(tokenizer, out: Path) -> None:
    """The embedded tokenizer's codebook beside the run (``mel_vq.safetensors``; ``tokenizer``: the store's,
    `store_speech_tokenizer`, None for S3 tokens: nothing written): the run directory then decodes its own tokens
    wherever it is moved, without the cache store."""
    if tokenizer is not None:
        tokenizer.to_safetensors(out / SPEECH_CODEBOOK)


def speech_vocab_record(t3_cfg, tokenizer) -> dict:
    """``stage2.json`` ``speech_vocab``: the T3's speech table (rows, BOS, EOS) and the kind of the store's embedded
    tokenizer it was sized to (`T3Config.sized_to_speech_codes`), None when it is not sized to one (Chatterbox's
    table: S3 tokens, an official checkpoint)."""
    sized = tokenizer is not None and t3_cfg.speech_codes == tokenizer.vocab_size
    return {"size": t3_cfg.speech_vocab_size, "start": t3_cfg.start_speech_token, "stop": t3_cfg.stop_speech_token,
            "sized_to": tokenizer.kind if sized else None}


def publish(out: Path, ckpt: Path) -> None:
    """Copy the final checkpoint's inference files to the run root (weights first, stage2.json last)."""
    for f in sorted(ckpt.iterdir()):
        if f.is_file() and f.name not in (TRAIN_STATE, STAGE2_META):
            atomic_copy(f, out / f.name)
    atomic_copy(ckpt / STAGE2_META, out / STAGE2_META)
