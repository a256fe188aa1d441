"""Text tokenizers for T3's text vocabulary (704 / 2454 ids; SOT 255 and EOT 0 are added by the layout).

Three implementations of one small contract (`TextTokenizer`):

* `ChatterboxTextTokenizer` — Chatterbox's ``EnTokenizer`` reproduced exactly: a HF ``tokenizers``
  ``tokenizer.json`` whose vocabulary holds ``[START]`` / ``[STOP]``; every space is replaced by the
  literal ``[SPACE]`` token before encoding (``txt.replace(' ', '[SPACE]')``), and decoding undoes
  it. With ``punc_norm=True`` (the default) the text first goes through Chatterbox's ``punc_norm``
  (what ``ChatterboxTTS.generate`` does right before ``text_to_tokens``), so training sees text the
  way inference will. Use it with an official ``t3_cfg.safetensors``: the pretrained text
  embeddings are indexed by this vocabulary.

* `MultilingualTextTokenizer` — Chatterbox's ``MTLTokenizer`` over
  ``grapheme_mtl_merged_expanded_v1.json`` (the multilingual T3, text vocab 2454): Chatterbox's
  multilingual ``punc_norm`` (which also accepts CJK sentence enders), then lowercase, NFKD, the
  language's front end, the ``[lang]`` tag prepended, ``[SPACE]`` for spaces. Every text needs a
  language (`MTL_LANGUAGES`, Chatterbox's ``SUPPORTED_LANGUAGES``). Front ends: Korean (Hangul →
  Jamo, built in); Japanese (kanji → hiragana) needs ``pykakasi`` and Chinese (Cangjie codes after
  pkuseg segmentation) needs ``spacy-pkuseg`` plus ``Cangjie5_TC.json`` beside the vocabulary —
  without them those languages are refused (the official tokenizer would silently encode other ids).
  Hebrew diacritics (``dicta_onnx``) and Russian stress marks (``russian_text_stresser``) are applied
  when those packages are importable and skipped otherwise — exactly what the official tokenizer does
  (``chatterbox-tts`` does not install them).

* `ByteTextTokenizer` — the embedded default, no file needed: the UTF-8 bytes of the (NFC
  normalised) text, byte ``b`` → id ``b + 256``. Ids therefore lie in [256, 512): they never collide
  with SOT (255) or EOT (0), fit the 704-row text embedding, and any script is representable
  (Vietnamese, CJK, emoji — a character is 1–4 ids). NFC makes "ệ" typed precomposed or decomposed
  the same ids. Lossless: ``decode(encode(t)) == unicodedata.normalize("NFC", t)`` (with
  ``punc_norm=False``, its default). Meant for fresh (preset) T3 weights or a new language: it does
  not match the pretrained Chatterbox text embeddings.

All expose ``encode(text, language=None) -> list[int]`` (raw ids: no SOT/EOT; only the multilingual
tokenizer uses the language), ``encode_batch``, ``decode``,
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
from tts_core.languages import MTL_LANGUAGES
from tts_core.stage2.language_front_ends import CANGJIE_FILE, LanguageUnavailable, front_end
from tts_core.t3.families import ENGLISH, FAMILIES, MULTILINGUAL

SOT_TOKEN = "[START]"
EOT_TOKEN = "[STOP]"
UNK_TOKEN = "[UNK]"
SPACE_TOKEN = "[SPACE]"
CHATTERBOX_FILE = FAMILIES[ENGLISH].tokenizer_file  # official names (and the names in a run directory)
MTL_FILE = FAMILIES[MULTILINGUAL].tokenizer_file
BYTE_FILE = "text_tokenizer.json"  # descriptor of the byte tokenizer in a checkpoint directory
CHATTERBOX_META = "chatterbox_tokenizer.json"  # settings (punc_norm) beside a copied tokenizer.json
BYTE_OFFSET = 256


EN_SENTENCE_ENDERS = (".", "!", "?", "-", ",")
MTL_SENTENCE_ENDERS = EN_SENTENCE_ENDERS + ("、", "，", "。", "？", "！")  # chatterbox/mtl_tts.py's punc_norm


class TextTokenizerError(ValueError):
    pass


def check_language(language: str | None) -> str:
    """A supported multilingual language code (lower-cased), or a clear error listing them."""
    code = (language or "").strip().lower()
    if code not in MTL_LANGUAGES:
        what = f"unsupported language {language!r}" if code else "no language given"
        raise TextTokenizerError(f"{what} for the multilingual T3; supported: {', '.join(sorted(MTL_LANGUAGES))} "
                                 "(metadata's 5th column, or --language)")
    return code


def punc_norm(text: str, sentence_enders: Sequence[str] = EN_SENTENCE_ENDERS) -> str:
    """Chatterbox's ``punc_norm`` (``chatterbox/tts.py``; ``mtl_tts.py`` passes `MTL_SENTENCE_ENDERS`),
    except that empty text stays empty (Chatterbox substitutes a canned sentence, which would be a
    wrong training target)."""
    if len(text) == 0:
        return text
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in (("...", ", "), ("…", ", "), (":", ","), (" - ", ", "), (";", ", "), ("—", "-"), ("–", "-"),
                     (" ,", ","), ("“", "\""), ("”", "\""), ("‘", "'"), ("’", "'")):
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if text and not any(text.endswith(p) for p in sentence_enders):
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

    requires_language: bool = False  # True: every text needs a language code (multilingual)

    def encode(self, text: str, language: str | None = None) -> list[int]:
        """Raw text ids (no SOT/EOT) of one text. ``language`` is used by the multilingual tokenizer only."""
        return self._encode(self.normalize(text))

    def encode_batch(self, texts: Sequence[str], languages: Sequence[str | None] | None = None) -> list[list[int]]:
        langs = [None] * len(texts) if languages is None else list(languages)
        return [self.encode(t, lang) for t, lang in zip(texts, langs, strict=True)]

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
    file_name = CHATTERBOX_FILE  # the name it is saved under in a run directory
    identity_name = "chatterbox-en-tokenizer"

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
        self.identity = ModelIdentity(name=self.identity_name + ("" if self.punc_norm else "-no-punc-norm"),
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

    def encode_batch(self, texts: Sequence[str], languages: Sequence[str | None] | None = None) -> list[list[int]]:
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
        dst = Path(directory) / self.file_name
        if dst.resolve() != self.path.resolve():
            atomic_copy(self.path, dst)
        atomic_write_text(Path(directory) / CHATTERBOX_META,
                           json.dumps(self.to_dict(), indent=2) + "\n")
        return dst


class MultilingualTextTokenizer(ChatterboxTextTokenizer):
    """Chatterbox's MTLTokenizer over ``grapheme_mtl_merged_expanded_v1.json`` (module doc)."""

    name = "chatterbox-mtl"
    file_name = MTL_FILE
    identity_name = "chatterbox-mtl-tokenizer"
    requires_language = True

    def normalize(self, text: str) -> str:
        text = "" if text is None else str(text)
        return punc_norm(text, MTL_SENTENCE_ENDERS) if self.punc_norm else text

    def prepare(self, text: str, language: str | None) -> str:
        """The string the HF tokenizer encodes: MTLTokenizer.encode's preprocessing, tag included."""
        code = check_language(language)
        txt = unicodedata.normalize("NFKD", self.normalize(text).lower())
        try:
            txt = front_end(code, txt, self.path.parent)
        except LanguageUnavailable as e:
            raise TextTokenizerError(f"{MTL_LANGUAGES[code]} ({code}): {e}") from None
        return f"[{code}]{txt}".replace(" ", SPACE_TOKEN)

    def encode(self, text: str, language: str | None = None) -> list[int]:
        return self._strip(self.tokenizer.encode(self.prepare(text, language)).ids)

    def encode_batch(self, texts: Sequence[str], languages: Sequence[str | None] | None = None) -> list[list[int]]:
        langs = [None] * len(texts) if languages is None else list(languages)
        encs = self.tokenizer.encode_batch([self.prepare(t, lang) for t, lang in zip(texts, langs, strict=True)])
        return [self._strip(e.ids) for e in encs]

    def save(self, directory: str | os.PathLike) -> Path:
        dst = super().save(directory)
        cangjie = self.path.parent / CANGJIE_FILE
        if cangjie.is_file() and cangjie.resolve() != (Path(directory) / CANGJIE_FILE).resolve():
            atomic_copy(cangjie, Path(directory) / CANGJIE_FILE)
        return dst


def _chatterbox_class(path: Path) -> type[ChatterboxTextTokenizer]:
    return MultilingualTextTokenizer if path.name == MTL_FILE else ChatterboxTextTokenizer


def load_text_tokenizer(spec: str | os.PathLike | None, t3_dir: str | os.PathLike | None = None,
                        punc_norm: bool | None = None) -> TextTokenizer:
    """Resolve the text tokenizer of a run.

    ``spec``: ``"bytes"`` → `ByteTextTokenizer`; a directory with Chatterbox Turbo's GPT-2 BPE files
    (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) → `TurboTextTokenizer`; a ``tokenizer.json``
    path → `ChatterboxTextTokenizer`, a ``grapheme_mtl_merged_expanded_v1.json`` path →
    `MultilingualTextTokenizer`; a directory holding one of them (not both) → that one; a directory holding
    ``text_tokenizer.json`` → the byte tokenizer it describes; ``None`` → from ``t3_dir`` the same way,
    else bytes. ``punc_norm`` overrides the class default (a saved descriptor's setting wins over the default).
    """
    from tts_core.stage2.turbo_tokenizer import TurboTextTokenizer, is_turbo_tokenizer_dir

    kw = {} if punc_norm is None else {"punc_norm": punc_norm}
    if spec is None or str(spec) == "auto":
        if t3_dir is not None and Path(t3_dir).is_dir():
            d = Path(t3_dir)
            if any((d / f).is_file() for f in (CHATTERBOX_FILE, MTL_FILE, BYTE_FILE)) or is_turbo_tokenizer_dir(d):
                return load_text_tokenizer(d, punc_norm=punc_norm)
        return ByteTextTokenizer(**kw)
    if str(spec) == "bytes":
        return ByteTextTokenizer(**kw)
    p = Path(spec)
    if p.is_dir():
        if is_turbo_tokenizer_dir(p):  # before tokenizer.json: a GPT-2 directory may also hold one
            return TurboTextTokenizer.load(p, punc_norm=punc_norm)
        files = [p / f for f in (CHATTERBOX_FILE, MTL_FILE) if (p / f).is_file()]
        if len(files) > 1:
            raise TextTokenizerError(f"{p} holds both {CHATTERBOX_FILE} and {MTL_FILE}: name the one to use")
        if files:
            saved = p / CHATTERBOX_META
            pn = punc_norm
            if pn is None and saved.is_file():
                pn = bool(json.loads(saved.read_text()).get("punc_norm", True))
            return _chatterbox_class(files[0])(files[0], **({} if pn is None else {"punc_norm": pn}))
        if (p / BYTE_FILE).is_file():
            d = json.loads((p / BYTE_FILE).read_text())
            pn = d.get("punc_norm", False) if punc_norm is None else punc_norm
            return ByteTextTokenizer(punc_norm=pn, offset=int(d.get("offset", BYTE_OFFSET)))
        raise FileNotFoundError(f"{p} holds none of {CHATTERBOX_FILE}, {MTL_FILE}, {BYTE_FILE}")
    if p.is_file():
        return _chatterbox_class(p)(p, **kw)
    raise FileNotFoundError(f"text tokenizer {spec!r}: not 'bytes', a tokenizer file or a directory holding one")
