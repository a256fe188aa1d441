"""Per-language text front ends of Chatterbox's multilingual tokenizer (``MTLTokenizer.encode``, 0.1.7),
applied after lowercasing and NFKD and before the ``[lang]`` tag.

* ``ko``: Hangul syllables → conjoining Jamo (pure Python, always available);
* ``ja``: kanji → hiragana with ``pykakasi`` (katakana kept), then NFKD;
* ``zh``: pkuseg word segmentation (``spacy-pkuseg``), then every CJK glyph → ``[cj_x]…[cj_.]`` Cangjie
  codes from ``Cangjie5_TC.json``;
* ``he`` / ``ru``: diacritics (``dicta_onnx``) / stress marks (``russian_text_stresser``) when those
  packages are importable, else the text unchanged — what the official tokenizer does (it logs a
  warning; ``chatterbox-tts`` does not install either package).

Japanese and Chinese need packages this project does not install: without them the official tokenizer
would encode other ids than the model was trained on, so `front_end` refuses those languages with an
error that names what to install (`LanguageUnavailable`).
"""
from __future__ import annotations

import json
import logging
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

CANGJIE_FILE = "Cangjie5_TC.json"  # the Chinese front end's glyph → code table, beside the vocabulary


class LanguageUnavailable(ValueError):
    """A language whose official front end needs a package or file that is not here."""


def korean_normalize(text: str) -> str:
    def decompose(ch: str) -> str:
        if not ("\uac00" <= ch <= "\ud7af"):
            return ch
        base = ord(ch) - 0xAC00
        initial = chr(0x1100 + base // (21 * 28))
        medial = chr(0x1161 + (base % (21 * 28)) // 28)
        final = chr(0x11A7 + base % 28) if base % 28 > 0 else ""
        return initial + medial + final

    return "".join(decompose(c) for c in text).strip()


def _is_kanji(c: str) -> bool:
    return 19968 <= ord(c) <= 40959


def _is_katakana(c: str) -> bool:
    return 12449 <= ord(c) <= 12538


@lru_cache(maxsize=1)
def _kakasi():
    try:
        import pykakasi
    except ImportError:
        raise LanguageUnavailable("Japanese text needs pykakasi (the official front end converts kanji to hiragana "
                                  "with it): `uv pip install pykakasi==2.3.0`") from None
    return pykakasi.kakasi()


def hiragana_normalize(text: str) -> str:
    out = []
    for r in _kakasi().convert(text):
        inp, hira = r["orig"], r["hira"]
        if any(_is_kanji(c) for c in inp):
            if hira and hira[0] in ("は", "へ"):
                hira = " " + hira
            out.append(hira)
        elif inp and all(_is_katakana(c) for c in inp):
            out.append(r["orig"])
        else:
            out.append(inp)
    return unicodedata.normalize("NFKD", "".join(out))


class CangjieConverter:
    """Chatterbox's ``ChineseCangjieConverter`` over a local ``Cangjie5_TC.json``."""

    def __init__(self, mapping_file: Path):
        try:
            from spacy_pkuseg import pkuseg
        except ImportError:
            raise LanguageUnavailable("Chinese text needs spacy-pkuseg (the official front end segments words with "
                                      "it): `uv pip install spacy-pkuseg`") from None
        if not Path(mapping_file).is_file():
            raise LanguageUnavailable(f"Chinese text needs {Path(mapping_file).name} beside the multilingual "
                                      f"vocabulary ({mapping_file}); copy it from the official checkpoint")
        self.word2cj: dict[str, str] = {}
        self.cj2word: dict[str, list[str]] = {}
        for entry in json.loads(Path(mapping_file).read_text(encoding="utf-8")):
            word, code = entry.split("\t")[:2]
            self.word2cj[word] = code
            self.cj2word.setdefault(code, []).append(word)
        self.segmenter = pkuseg()

    def _code(self, glyph: str) -> str | None:
        code = self.word2cj.get(glyph)
        if code is None:
            return None
        index = self.cj2word[code].index(glyph)
        return code + (str(index) if index > 0 else "")

    def __call__(self, text: str) -> str:
        out = []
        for t in " ".join(self.segmenter.cut(text)):
            code = self._code(t) if unicodedata.category(t) == "Lo" else None
            out.append(t if code is None else "".join(f"[cj_{c}]" for c in code) + "[cj_.]")
        return "".join(out)


@lru_cache(maxsize=4)
def _cangjie(mapping_file: str) -> CangjieConverter:
    return CangjieConverter(Path(mapping_file))


def _optional(module: str, build: Callable[[], Callable[[str], str]], what: str) -> Callable[[str], str]:
    """The official behaviour for an optional front end: apply it when importable, else pass the text
    through (with one warning, as the official tokenizer logs)."""
    try:
        return build()
    except ImportError:
        log.warning("%s not available - %s skipped (as in the official tokenizer)", module, what)
        return lambda text: text


@lru_cache(maxsize=1)
def _hebrew() -> Callable[[str], str]:
    def build():
        from dicta_onnx import Dicta

        return Dicta().add_diacritics
    return _optional("dicta_onnx", build, "Hebrew diacritics")


@lru_cache(maxsize=1)
def _russian() -> Callable[[str], str]:
    def build():
        from russian_text_stresser.text_stresser import RussianTextStresser

        return RussianTextStresser().stress_text
    return _optional("russian_text_stresser", build, "Russian stress marks")


def front_end(language: str, text: str, vocab_dir: Path) -> str:
    """The official per-language processing of already lowercased, NFKD text (module doc)."""
    if language == "zh":
        return _cangjie(str(Path(vocab_dir) / CANGJIE_FILE))(text)
    if language == "ja":
        return hiragana_normalize(text)
    if language == "he":
        return _hebrew()(text)
    if language == "ko":
        return korean_normalize(text)
    if language == "ru":
        return _russian()(text)
    return text
