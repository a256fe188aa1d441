"""Text tokenizers for T3's text vocabulary (704 ids; SOT 255 and EOT 0 are added by the layout).

Two implementations of one small contract (`TextTokenizer`):

* `ChatterboxTextTokenizer` — Chatterbox's ``EnTokenizer`` reproduced exactly: a HF ``tokenizers``
  ``tokenizer.json`` whose vocabulary holds ``[START]`` / ``[STOP]``; every space is replaced by the
  literal ``[SPACE]`` token before encoding (``txt.replace(' ', '[SPACE]')``), and decoding undoes
  it. With ``punc_norm=True`` (the default) the text first goes through Chatterbox's ``punc_norm``
  (what ``ChatterboxTTS.generate`` does right before ``text_to_tokens``), so training sees text the
  way inference will. Use it with an official ``t3_cfg.safetensors``: the pretrained text
  embeddings are indexed by this vocabulary.

* `ByteTextTokenizer` — the embedded default, no file needed: the UTF-8 bytes of the (NFC
  normalised) text, byte ``b`` → id ``b + 256``. Ids therefore lie in [256, 512): they never collide
  with SOT (255) or EOT (0), fit the 704-row text embedding, and any script is representable
  (Vietnamese, CJK, emoji — a character is 1–4 ids). NFC makes "ệ" typed precomposed or decomposed
  the same ids. Lossless: ``decode(encode(t)) == unicodedata.normalize("NFC", t)`` (with
  ``punc_norm=False``, its default). Meant for fresh (preset) T3 weights or a new language: it does
  not match the pretrained Chatterbox text embeddings.

Both expose ``encode(text) -> list[int]`` (raw ids: no SOT/EOT), ``encode_batch``, ``decode``,
``vocab_size`` (ids are < vocab_size), ``identity`` (`ModelIdentity`: name + sha256 of what defines
the mapping) and ``save(dir)`` / `load_text_tokenizer(dir)` so a stage-2 checkpoint directory
carries the tokenizer it was trained with.
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path
from typing import Sequence

from tts_core.atomic_files import atomic_copy, atomic_write_text
from tts_core.identity import ModelIdentity, sha256_file

SOT_TOKEN = "[START]"
EOT_TOKEN = "[STOP]"
UNK_TOKEN = "[UNK]"
SPACE_TOKEN = "[SPACE]"
CHATTERBOX_FILE = "tokenizer.json"  # the name Chatterbox (and a --t3 directory) uses
BYTE_FILE = "text_tokenizer.json"  # descriptor of the byte tokenizer in a checkpoint directory
CHATTERBOX_META = "chatterbox_tokenizer.json"  # settings (punc_norm) beside a copied tokenizer.json
BYTE_OFFSET = 256


class TextTokenizerError(ValueError):
    pass


def punc_norm(text: str) -> str:
    """Chatterbox's ``punc_norm`` (``chatterbox/tts.py``), except that empty text stays empty
    (Chatterbox substitutes a canned sentence, which would be a wrong training target)."""
    if len(text) == 0:
        return text
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in (("...", ", "), ("…", ", "), (":", ","), (" - ", ", "), (";", ", "), ("—", "-"), ("–", "-"),
                     (" ,", ","), ("“", "\""), ("”", "\""), ("‘", "'"), ("’", "'")):
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if text and not any(text.endswith(p) for p in (".", "!", "?", "-", ",")):
        text += "."
    return text


class TextTokenizer:
    """The contract stage 2 and inference share. Subclasses implement `_encode` and `decode`."""

    name: str = "text-tokenizer"
    vocab_size: int
    identity: ModelIdentity
    punc_norm: bool = False

    def normalize(self, text: str) -> str:
        text = "" if text is None else str(text)
        return punc_norm(text) if self.punc_norm else text

    def encode(self, text: str) -> list[int]:
        """Raw text ids (no SOT/EOT) of one text."""
        return self._encode(self.normalize(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.name, "vocab_size": self.vocab_size, "punc_norm": self.punc_norm,
                "identity": self.identity.to_dict()}

    def check_fits(self, text_vocab_size: int, sot: int, eot: int) -> None:
        """Refuse a tokenizer whose ids do not fit T3's text vocabulary."""
        if self.vocab_size > text_vocab_size:
            raise TextTokenizerError(
                f"text tokenizer {self.identity.name!r} has {self.vocab_size} ids but T3's text vocabulary has "
                f"{text_vocab_size} rows")


class ByteTextTokenizer(TextTokenizer):
    """UTF-8 bytes of the NFC text, byte b → id b + 256 (module doc)."""

    name = "bytes"

    def __init__(self, punc_norm: bool = False, offset: int = BYTE_OFFSET):
        if offset <= 255 < offset + 256 or offset <= 0:  # must skip EOT (0) and SOT (255)
            raise ValueError("offset must put the 256 byte ids clear of 0 and 255 (use 256)")
        self.offset = int(offset)
        self.punc_norm = bool(punc_norm)
        self.vocab_size = self.offset + 256
        spec = f"utf8-nfc-bytes+{self.offset}/punc_norm={int(self.punc_norm)}"
        self.identity = ModelIdentity(name=f"utf8-bytes+{self.offset}" + ("+punc_norm" if self.punc_norm else ""),
                                      sha256=hashlib.sha256(spec.encode()).hexdigest(),
                                      source="tts_core.stage2.text_tokenizer")

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", super().normalize(text))

    def _encode(self, text: str) -> list[int]:
        off = self.offset
        return [b + off for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        off = self.offset
        return bytes(int(i) - off for i in ids if off <= int(i) < off + 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / BYTE_FILE
        atomic_write_text(path, json.dumps(self.to_dict() | {"offset": self.offset}, indent=2) + "\n")
        return path


class ChatterboxTextTokenizer(TextTokenizer):
    """Chatterbox's EnTokenizer over a ``tokenizer.json`` (module doc)."""

    name = "chatterbox"

    def __init__(self, path: str | os.PathLike, punc_norm: bool = True):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Chatterbox text tokenizer not found: {self.path}")
        self.tokenizer = Tokenizer.from_file(str(self.path))
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in (SOT_TOKEN, EOT_TOKEN) if t not in vocab]
        if missing:
            raise TextTokenizerError(f"{self.path} is not a Chatterbox text tokenizer: no {missing} in its vocabulary")
        self.sot_id, self.eot_id = int(vocab[SOT_TOKEN]), int(vocab[EOT_TOKEN])
        self.space_id = vocab.get(SPACE_TOKEN)
        self.punc_norm = bool(punc_norm)
        self.vocab_size = int(max(vocab.values()) + 1)
        self.identity = ModelIdentity(name="chatterbox-en-tokenizer" + ("" if self.punc_norm else "-no-punc-norm"),
                                      sha256=sha256_file(self.path), source=str(self.path))

    @classmethod
    def from_file(cls, path: str | os.PathLike, punc_norm: bool = True) -> "ChatterboxTextTokenizer":
        return cls(path, punc_norm=punc_norm)

    def _prep(self, text: str) -> str:
        return self.normalize(text).replace(" ", SPACE_TOKEN)

    def _strip(self, ids: Sequence[int]) -> list[int]:
        # A literal "[START]"/"[STOP]" in a transcript is not text: the layout adds SOT/EOT itself.
        return [int(i) for i in ids if i != self.sot_id and i != self.eot_id]

    def _encode(self, text: str) -> list[int]:
        return self._strip(self.tokenizer.encode(text.replace(" ", SPACE_TOKEN)).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encs = self.tokenizer.encode_batch([self._prep(t) for t in texts])
        return [self._strip(e.ids) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        txt = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        return txt.replace(" ", "").replace(SPACE_TOKEN, " ").replace(EOT_TOKEN, "").replace(UNK_TOKEN, "")

    def check_fits(self, text_vocab_size: int, sot: int, eot: int) -> None:
        super().check_fits(text_vocab_size, sot, eot)
        if (self.sot_id, self.eot_id) != (sot, eot):
            raise TextTokenizerError(
                f"{self.path}: [START]/[STOP] are ids {self.sot_id}/{self.eot_id} but T3 uses SOT {sot} / EOT {eot}; "
                "this tokenizer.json does not belong to this T3")

    def save(self, directory: str | os.PathLike) -> Path:
        dst = Path(directory) / CHATTERBOX_FILE
        if dst.resolve() != self.path.resolve():
            atomic_copy(self.path, dst)
        atomic_write_text(Path(directory) / CHATTERBOX_META,
                           json.dumps(self.to_dict(), indent=2) + "\n")
        return dst


def load_text_tokenizer(spec: str | os.PathLike | None, t3_dir: str | os.PathLike | None = None,
                        punc_norm: bool | None = None) -> TextTokenizer:
    """Resolve the text tokenizer of a run.

    ``spec``: ``"bytes"`` → `ByteTextTokenizer`; a directory with Chatterbox Turbo's GPT-2 BPE files
    (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) → `TurboTextTokenizer`; a ``tokenizer.json`` path (or a directory holding one)
    → `ChatterboxTextTokenizer`; a directory holding ``text_tokenizer.json`` → the byte tokenizer it
    describes; ``None`` → from ``t3_dir`` the same way (its ``tokenizer.json`` wins), else bytes.
    ``punc_norm`` overrides the class default (a saved descriptor's setting wins over the default).
    """
    from tts_core.stage2.turbo_tokenizer import TurboTextTokenizer, is_turbo_tokenizer_dir

    if spec is None or str(spec) == "auto":
        if t3_dir is not None and Path(t3_dir).is_dir():
            d = Path(t3_dir)
            if (d / CHATTERBOX_FILE).is_file() or (d / BYTE_FILE).is_file() or is_turbo_tokenizer_dir(d):
                return load_text_tokenizer(d, punc_norm=punc_norm)
        return ByteTextTokenizer(**({} if punc_norm is None else {"punc_norm": punc_norm}))
    if str(spec) == "bytes":
        return ByteTextTokenizer(**({} if punc_norm is None else {"punc_norm": punc_norm}))
    p = Path(spec)
    if p.is_dir():
        if is_turbo_tokenizer_dir(p):  # before tokenizer.json: a GPT-2 directory may also hold one
            return TurboTextTokenizer.load(p, punc_norm=punc_norm)
        if (p / CHATTERBOX_FILE).is_file():
            saved = p / CHATTERBOX_META
            pn = punc_norm
            if pn is None and saved.is_file():
                pn = bool(json.loads(saved.read_text()).get("punc_norm", True))
            return ChatterboxTextTokenizer(p / CHATTERBOX_FILE, **({} if pn is None else {"punc_norm": pn}))
        if (p / BYTE_FILE).is_file():
            d = json.loads((p / BYTE_FILE).read_text())
            pn = d.get("punc_norm", False) if punc_norm is None else punc_norm
            return ByteTextTokenizer(punc_norm=pn, offset=int(d.get("offset", BYTE_OFFSET)))
        raise FileNotFoundError(f"{p} holds neither {CHATTERBOX_FILE} nor {BYTE_FILE}")
    if p.is_file():
        return ChatterboxTextTokenizer(p, **({} if punc_norm is None else {"punc_norm": punc_norm}))
    raise FileNotFoundError(f"text tokenizer {spec!r}: not 'bytes', a tokenizer.json or a directory holding one")
