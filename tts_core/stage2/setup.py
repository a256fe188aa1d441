"""What a stage-2 run loads before it trains, refused early (module doc of `tts_core.stage2.train`, "Identity" and
"t3 resolution"): the stage-1 models must match the store's text encoder, and the T3 gets its own family's tokenizer."""
from __future__ import annotations

import logging

from tts_core.mapper.pooling import TextEncoderMismatchError, check_text_encoder_identity
from tts_core.stage2.text_tokenizer import TextTokenizer, load_text_tokenizer
from tts_core.t3.families import TURBO

log = logging.getLogger(__name__)


def check_stage1_for_store(reader, encoder, mapper_meta: dict, *, store: str, mapper_dir) -> None:
    """Refuse a stage-1 mapper trained over another text encoder than the one that built the store (name + weights
    sha256), or pooling states of another width; warn when its checkpoint records no identity to check."""
    store_te = reader.identities.get("text_encoder")
    mapper_te = mapper_meta.get("text_encoder") or {}
    try:
        check_text_encoder_identity(mapper_te or None, store_te, what=f"the stage-1 mapper {mapper_dir}")
    except TextEncoderMismatchError as e:
        raise TextEncoderMismatchError(
            f"stage 2 refuses this combination: the store {store} was built with text encoder "
            f"{getattr(store_te, 'name', store_te)!r} (sha256 {getattr(store_te, 'sha256', '?')[:12]}) but the "
            f"stage-1 mapper {mapper_dir} was trained on {mapper_te.get('name')!r} (sha256 "
            f"{str(mapper_te.get('sha256'))[:12]}); names and weight hashes must match. Train stage 1 on this "
            f"store's cache, or use the store that mapper was trained on. ({e})") from None
    if mapper_meta.get("text_encoder") is None:
        log.warning("stage-1 checkpoint %s records no text-encoder identity: cannot verify it matches the store",
                    mapper_dir)
    if encoder.hidden_size != reader.text_hidden_size:
        raise TextEncoderMismatchError(f"stage-1 encoder pools {encoder.hidden_size}-d states, the store "
                                       f"holds {reader.text_hidden_size}-d ones")


def run_text_tokenizer(spec: str | None, t3, source) -> TextTokenizer:
    """The run's text tokenizer: ``spec`` (``--text-tokenizer``) when given, else the T3 family's own file(s) beside an
    official T3 (Turbo's GPT-2 BPE files are its directory) — never another family's — else what the T3 source holds
    (a stage-2 checkpoint's own file; bytes for a preset). Refused when it does not fit the T3's text vocabulary."""
    t3_dir = source.directory if source is not None else None
    if spec is None and source is not None and not source.own_checkpoint:
        spec = source.directory if source.family.name == TURBO else (source.text_tokenizer or "bytes")
    tokenizer = load_text_tokenizer(spec, t3_dir=t3_dir)
    tokenizer.check_fits(t3.cfg.text_vocab_size, t3.cfg.start_text_token, t3.cfg.stop_text_token)
    if source is not None and not source.own_checkpoint and getattr(tokenizer, "name", "") == "bytes":
        log.warning("training an official Chatterbox T3 with the byte tokenizer: its pretrained text embeddings "
                    "are indexed by its own tokenizer file, not by bytes")
    return tokenizer
