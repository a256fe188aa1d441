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


# ---- a whole official English Chatterbox directory (seeded random weights) --------------------------------------
S3GEN_FRONT_END = ("tokenizer._mel_filters", "tokenizer.window")  # kept fp32: checked against the s3tokenizer package


def write_official_s3gen(path, seed: int = 0):
    """``s3gen.safetensors`` of the official ``S3Gen`` (chatterbox-tts, the `vocoder` extra) at its real shape
    (264M parameters: our loader builds ``S3Gen()`` itself, so nothing can be shrunk), seeded random weights,
    Chatterbox's key names; fp16 to halve the disk (loading casts to fp32) except the S3 tokenizer's front end.
    ~20 s on one CPU core, ~530 MB."""
    import torch
    from safetensors.torch import save_file

    from tts_core.vocoders import _s3gen_class

    torch.manual_seed(seed)
    model = _s3gen_class()()
    save_file({k: v.detach().half().contiguous() if v.is_floating_point() and k not in S3GEN_FRONT_END
               else v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_official_ve(path, seed: int = 0):
    """``ve.safetensors`` of the official ``VoiceEncoder`` (``lstm.*``, ``proj.*``, ``similarity_*``), seeded."""
    import torch
    from chatterbox.models.voice_encoder import VoiceEncoder
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    save_file({k: v.detach().contiguous() for k, v in VoiceEncoder().state_dict().items()}, str(path))
    return path


def write_official_en_t3(path, seed: int = 0, hidden: int = 64, layers: int = 2, mlp: int = 128):
    """``t3_cfg.safetensors`` of the official English ``T3`` (``T3Config.english_only()``: text vocab 704, speech
    vocab 8194, Chatterbox's position tables and perceiver) shrunk to ``hidden`` wide (16 heads, as Chatterbox's
    Llama_520M) and ``layers`` deep through the package's own LLAMA_CONFIGS table — what `detect_t3` reads as the
    English family by its shapes. Speech head scaled x6, as tests/test_official_parity.py, so sampling is not
    near-uniform."""
    import pytest
    import torch
    from chatterbox.models.t3 import llama_configs
    from chatterbox.models.t3.modules import cond_enc
    from chatterbox.models.t3.modules.perceiver import Perceiver
    from chatterbox.models.t3.modules.t3_config import T3Config as OfficialConfig
    from chatterbox.models.t3.t3 import T3 as OfficialT3
    from safetensors.torch import save_file

    name = f"Llama_e2e_{hidden}x{layers}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(llama_configs.LLAMA_CONFIGS, name, dict(llama_configs.LLAMA_520M_CONFIG_DICT, hidden_size=hidden,
                                                            intermediate_size=mlp, num_hidden_layers=layers,
                                                            head_dim=hidden // 16))
        mp.setattr(cond_enc, "Perceiver", lambda: Perceiver(32, hidden, hidden, 4))
        hp = OfficialConfig.english_only()
        hp.llama_config_name = name
        torch.manual_seed(seed)
        model = OfficialT3(hp).eval()
    with torch.no_grad():
        model.speech_head.weight.mul_(6.0)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_official_en_dir(directory, seed: int = 0):
    """An official English Chatterbox checkpoint directory, as copied from the hub: ve.safetensors,
    s3gen.safetensors, t3_cfg.safetensors, tokenizer.json (layout and key names of ResembleAI/chatterbox)."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_official_ve(directory / "ve.safetensors", seed)
    write_official_s3gen(directory / "s3gen.safetensors", seed)
    write_official_en_t3(directory / "t3_cfg.safetensors", seed)
    write_en_tokenizer(directory / "tokenizer.json")
    return directory
