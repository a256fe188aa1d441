"""Files in the official Chatterbox formats, written by tests (no model hub): text tokenizer vocabularies."""
from __future__ import annotations

from tts_core.languages import MTL_LANGUAGES

EN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"


def write_en_tokenizer(path, start_id: int = 255):
    """A tokenizer.json like Chatterbox's English one: BPE over characters, [START] 255, [STOP] 0, [SPACE]."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace

    specials = ["[STOP]", "[UNK]", "[SPACE]"]
    vocab = {t: i for i, t in enumerate(specials + list(EN_CHARS))}
    vocab["he"] = len(vocab)
    vocab["ll"] = len(vocab)
    vocab["[START]"] = start_id
    tk = Tokenizer(BPE(vocab=vocab, merges=[("h", "e"), ("l", "l")], unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    tk.add_special_tokens(["[START]", "[STOP]", "[UNK]", "[SPACE]"])
    tk.save(str(path))
    return path


def write_mtl_vocab(path):
    """A grapheme_mtl_merged_expanded_v1.json-like vocabulary: lower-case graphemes of several scripts, NFKD
    combining marks, Hangul Jamo, [START] 255 / [STOP] 0 / [SPACE] and one ``[xx]`` tag per language."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    graphemes = ("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-\"" + "".join(map(chr, range(0x300, 0x370)))
                 + "αβγδεζηθικλμνξοπρστυφχψως" + "абвгдежзийклмнопрстуфхцчшщъыьэюя" + "ßøæå"
                 + "אבגדהוזחטיכלמנסעפצקרשתםןךףץ" + "".join(map(chr, range(0x1100, 0x1200))) + "ابتثجحخدذرزسشصضطظعغفقكلمنهوي")
    vocab = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2}
    for c in dict.fromkeys(graphemes):
        vocab[c] = len(vocab) + (len(vocab) >= 255)  # keep 255 for [START]
    vocab["[START]"] = 255
    merges = [("t", "h"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = max(vocab.values()) + 1
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tk.add_special_tokens(["[START]", "[STOP]", "[UNK]", "[SPACE]"] + [f"[{c}]" for c in MTL_LANGUAGES])
    tk.save(str(path))
    return path
