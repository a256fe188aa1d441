"""Chatterbox Turbo's text tokenizer: GPT-2 byte-level BPE from the checkpoint directory's own files.

`ChatterboxTurboTTS.from_local` runs ``AutoTokenizer.from_pretrained(DIR)`` over ``vocab.json``,
``merges.txt``, ``added_tokens.json`` (the 19 paralinguistic tags ``[laugh]``, ``[chuckle]``, …),
``special_tokens_map.json`` and ``tokenizer_config.json`` (50276 ids), and its ``generate`` feeds
``tokenizer(punc_norm(text), truncation=True).input_ids`` — no BOS/EOS, no SOT/EOT — to T3. This class
does exactly that through the same ``transformers`` call (no hand-written BPE), behind the
`TextTokenizer` contract of stage 2, and ``save(dir)`` copies the files so a run carries them.

Turbo's ``punc_norm`` is its own (fewer rules than the English model's: no "...", " - " or ";"
rewrites); empty text stays empty here (the official substitutes a canned sentence, which would be
a wrong training target).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from tts_core.atomic_files import atomic_copy, atomic_write_text
from tts_core.identity import ModelIdentity, sha256_file
from tts_core.stage2.text_tokenizer import TextTokenizer

REQUIRED_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
OPTIONAL_FILES = ("added_tokens.json", "special_tokens_map.json")
TURBO_META = "turbo_tokenizer.json"  # settings (punc_norm) beside copied files in a run directory

_PUNC = (("…", ", "), (":", ","), ("—", "-"), ("–", "-"), (" ,", ","), ("“", "\""), ("”", "\""), ("‘", "'"),
         ("’", "'"))


def turbo_punc_norm(text: str) -> str:
    """`chatterbox.tts_turbo.punc_norm`, except that empty text stays empty."""
    if len(text) == 0:
        return text
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in _PUNC:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not any(text.endswith(p) for p in (".", "!", "?", "-", ",")):
        text += "."
    return text


def is_turbo_tokenizer_dir(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return all((d / f).is_file() for f in REQUIRED_FILES)


class TurboTextTokenizer(TextTokenizer):
    """GPT-2 BPE of a Chatterbox Turbo directory (module doc). `check_fits` is the base one: Turbo
    adds no SOT/EOT, so ids 0 and 255 are ordinary tokens."""

    name = "turbo-gpt2-bpe"

    def __init__(self, directory: str | os.PathLike, punc_norm: bool = True):
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        missing = [f for f in REQUIRED_FILES if not (self.directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.directory}: Chatterbox Turbo's text tokenizer needs {', '.join(missing)} "
                                    f"(its GPT-2 BPE files, copied from the checkpoint directory)")
        self.files = [self.directory / f for f in REQUIRED_FILES + OPTIONAL_FILES if (self.directory / f).is_file()]
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        if self.tokenizer.pad_token is None:  # as ChatterboxTurboTTS.from_local
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.punc_norm = bool(punc_norm)
        self.vocab_size = len(self.tokenizer)
        digest = hashlib.sha256(json.dumps([(p.name, sha256_file(p)) for p in self.files]).encode()).hexdigest()
        self.identity = ModelIdentity(name="chatterbox-turbo-gpt2-bpe" + ("" if self.punc_norm else "-no-punc-norm"),
                                      sha256=digest, source=str(self.directory))

    def normalize(self, text: str) -> str:
        text = "" if text is None else str(text)
        return turbo_punc_norm(text) if self.punc_norm else text

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, truncation=True)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        for src in self.files:
            if (d / src.name).resolve() != src.resolve():
                atomic_copy(src, d / src.name)
        atomic_write_text(d / TURBO_META, json.dumps(self.to_dict(), indent=2) + "\n")
        return d / REQUIRED_FILES[0]

    @classmethod
    def load(cls, directory: str | os.PathLike, punc_norm: bool | None = None) -> "TurboTextTokenizer":
        """From a Turbo checkpoint directory or a run that saved one (its `punc_norm` setting kept)."""
        meta = Path(directory) / TURBO_META
        if punc_norm is None and meta.is_file():
            punc_norm = bool(json.loads(meta.read_text()).get("punc_norm", True))
        return cls(directory, **({} if punc_norm is None else {"punc_norm": punc_norm}))
