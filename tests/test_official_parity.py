"""Parity with the official chatterbox-tts 0.1.7 code (installed by `make setup`, the `vocoder` extra) for the
English and the multilingual T3 family.

The official T3 is built with seeded random weights at a shrunken shape that both sides share (width 64,
16 heads of 4, 14 layers — the multilingual AlignmentStreamAnalyzer reads layers 9, 12 and 13; set on the
official side through its own LLAMA_CONFIGS table and Perceiver width), saved under its official file
name and loaded through `--t3 DIR`'s code path (`build_t3`: family detection, strict load, adapters at
identity). Its speech head is scaled ×6 so sampling is not near-uniform and CFG changes the tokens.
Compared: keys, teacher-forced logits, greedy and seeded sampled tokens with CFG on and off, the
multilingual analyzer's EOS suppression / forcing, and text token ids from the official tokenizers.

The official generation entry point is `T3.inference` with `initial_speech_tokens` empty: it then feeds
`[cond | SOT text EOT | BOS]`, the one layout ours builds (its default feeds BOS twice — docs/architecture.md "Known
failure modes" 5). Seeded sampling: the official loop draws from the global RNG (`torch.manual_seed`),
ours from a generator with the same seed. Greedy: the official loop with `torch.multinomial` replaced by
argmax (every warper is monotone, so this is the argmax of its processed logits). Run with 1 thread
(exact equality also held with 2).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("chatterbox", reason="the `vocoder` extra (chatterbox-tts) is not installed")

from chatterbox_files import write_en_tokenizer, write_mtl_vocab  # noqa: E402
from tts_core.stage2.text_tokenizer import (  # noqa: E402
    ChatterboxTextTokenizer, MultilingualTextTokenizer, TextTokenizerError,
)
from tts_core.stage2.train import build_t3  # noqa: E402
from tts_core.t3 import T3Batch, T3Cond, is_adapter_key  # noqa: E402
from tts_core.t3.alignment import AlignmentStream  # noqa: E402
from tts_core.t3.families import T3FamilyError, detect_t3  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "Llama_parity_tiny"
H = 64
FAMILIES = {"english": ("t3_cfg.safetensors", "tokenizer.json"),
            "multilingual": ("t3_mtl23ls_v2.safetensors", "grapheme_mtl_merged_expanded_v1.json")}
RAW_TEXT = [5, 6, 7, 8, 9, 10, 11]  # S = 9 text columns with SOT/EOT: the analyzer suppresses early EOS
SOT, EOT, BOS, EOS = 255, 0, 6561, 6562
MAX_NEW = 40
SAMPLING = {"english": dict(temperature=0.8, min_p=0.05, top_p=1.0, repetition_penalty=1.2),
            "multilingual": dict(temperature=0.8, min_p=0.05, top_p=1.0, repetition_penalty=2.0)}


@pytest.fixture(scope="module")
def official():
    """`build(family, edit=None)` → an official chatterbox T3 (eval) at the shrunken shape."""
    from chatterbox.models.t3 import llama_configs
    from chatterbox.models.t3.modules import cond_enc
    from chatterbox.models.t3.modules.perceiver import Perceiver
    from chatterbox.models.t3.modules.t3_config import T3Config as OfficialConfig
    from chatterbox.models.t3.t3 import T3 as OfficialT3

    mp = pytest.MonkeyPatch()
    mp.setitem(llama_configs.LLAMA_CONFIGS, TINY, dict(llama_configs.LLAMA_520M_CONFIG_DICT, hidden_size=H,
                                                        intermediate_size=128, num_hidden_layers=14, head_dim=H // 16))
    mp.setattr(cond_enc, "Perceiver", lambda: Perceiver(32, H, H, 4))

    def build(family: str, edit=None, seed: int = 0):
        hp = OfficialConfig.multilingual() if family == "multilingual" else OfficialConfig.english_only()
        hp.llama_config_name = TINY
        torch.manual_seed(seed)
        model = OfficialT3(hp).eval()
        with torch.no_grad():
            model.speech_head.weight.mul_(6.0)
            if edit is not None:
                edit(model)
        return model

    yield build
    mp.undo()


def _install(model, directory, family: str):
    """The official files of one family in ``directory``: T3 weights under the official name + tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    t3_name, tok_name = FAMILIES[family]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / t3_name))
    (write_mtl_vocab if family == "multilingual" else write_en_tokenizer)(directory / tok_name)
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, official, tmp_path_factory):
    """(family, official model, ours loaded through --t3 DIR, LoadReport, T3Source)."""
    family = request.param
    model = official(family)
    d = _install(model, tmp_path_factory.mktemp(family), family)
    ours, report, source = build_t3(str(d), instruction_dim=16)
    return family, model, ours.eval(), report, source


def _conds(seed: int = 3):
    from chatterbox.models.t3.modules.cond_enc import T3Cond as OfficialCond

    g = torch.Generator().manual_seed(seed)
    spk, prompt = torch.randn(1, 256, generator=g), torch.randint(0, 6561, (1, 150), generator=g)
    official = OfficialCond(speaker_emb=spk, cond_prompt_speech_tokens=prompt, emotion_adv=0.5 * torch.ones(1, 1, 1))
    return official, T3Cond(speaker_emb=spk, prompt_tokens=prompt, emotion_adv=0.5)


def _official_generate(model, *, seed: int, greedy: bool = False, raw=RAW_TEXT, **sampling) -> list[int]:
    text = torch.tensor([[SOT, *raw, EOT]] * 2)  # the official entry point always runs two rows
    cond, _ = _conds()
    torch.manual_seed(seed)
    with pytest.MonkeyPatch.context() as mp:
        if greedy:
            mp.setattr(torch, "multinomial", lambda probs, num_samples: probs.argmax(-1, keepdim=True))
        out = model.inference(t3_cond=cond, text_tokens=text, initial_speech_tokens=torch.zeros(2, 0, dtype=torch.long),
                              max_new_tokens=MAX_NEW, **sampling)
    return out[0].tolist()


def _our_generate(model, *, seed: int, greedy: bool = False, raw=RAW_TEXT, **kw) -> list[int]:
    _, cond = _conds()
    out = model.generate(torch.tensor([raw]), torch.tensor([len(raw)]), cond, max_new_tokens=MAX_NEW,
                         generator=torch.Generator().manual_seed(seed), do_sample=not greedy, raw=True, **kw)
    return out[0].tolist()


# ---- loading through --t3 DIR ---------------------------------------------------------------------------------
def test_official_files_load_strictly_through_t3_dir(pair, capsys):
    family, model, ours, report, source = pair
    assert source.family.name == family and not source.own_checkpoint
    assert source.config.text_vocab_size == (2454 if family == "multilingual" else 704)
    assert bool(source.config.alignment_heads) == (family == "multilingual")
    assert set(report.loaded) == set(model.state_dict())  # every official key, nothing else
    assert report.missing_adapter and all(is_adapter_key(k) for k in report.missing_adapter)
    mine = ours.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in model.state_dict().items())
    assert set(mine) - set(model.state_dict()) == set(report.missing_adapter)


def test_detection_names_the_family_and_refuses_what_does_not_fit(official, tmp_path, capsys):
    mtl = official("multilingual")
    d = _install(mtl, tmp_path / "snapshot", "multilingual")
    torch.save({k: v.clone() for k, v in mtl.state_dict().items()}, d / "ve.pt")  # any .pt: reported with format
    build_t3(str(d), instruction_dim=16)
    err = capsys.readouterr().err
    assert "official Chatterbox multilingual T3 (t3_mtl23ls_v2.safetensors, text vocab 2454)" in err
    assert "ve.pt (pt)" in err
    # the official snapshot holds both families: name the file
    _install(official("english"), d, "english")
    with pytest.raises(FileNotFoundError, match="several T3 checkpoints.*pass the file itself"):
        detect_t3(d)
    assert detect_t3(d / "t3_cfg.safetensors").family.name == "english"
    # a .pt T3 under another name: the family comes from its shapes
    torch.save(mtl.state_dict(), tmp_path / "my_t3.pt")
    src = detect_t3(tmp_path / "my_t3.pt")
    assert src.family.name == "multilingual" and src.t3.format == "pt"
    t3, report, _ = build_t3(str(tmp_path / "my_t3.pt"), instruction_dim=16)
    assert set(report.loaded) == set(mtl.state_dict())
    # the English name over multilingual tensors is refused, not loaded with the wrong vocabulary
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({k: v.contiguous() for k, v in mtl.state_dict().items()}, str(bad / "t3_cfg.safetensors"))
    with pytest.raises(T3FamilyError, match="named like the english T3 but its tensors are not.*text vocab 2454"):
        detect_t3(bad)


# ---- model parity ------------------------------------------------------------------------------------------------
def test_teacher_forced_logits_equal_the_official_forward(pair):
    family, model, ours, _, _ = pair
    speech = [17, 4000, 23, 6000, 5]
    official_cond, cond = _conds()
    text = torch.tensor([[SOT, *RAW_TEXT, EOT]])
    with torch.no_grad():
        want = model(t3_cond=official_cond, text_tokens=text, text_token_lens=torch.tensor([text.shape[1]]),
                     speech_tokens=torch.tensor([[BOS, *speech, EOS]]), speech_token_lens=torch.tensor([len(speech) + 2]))
        got = ours(T3Batch(torch.tensor([RAW_TEXT]), torch.tensor([len(RAW_TEXT)]), torch.tensor([speech]),
                           torch.tensor([len(speech)]), cond))
    c, t = got.layout.cond_len, text.shape[1]
    torch.testing.assert_close(got.text_logits[0, c:c + t], want.text_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.speech_logits[0, c + t:c + t + len(speech) + 2], want.speech_logits[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
@pytest.mark.parametrize("cfg_weight", [2.0, 0.0], ids=["cfg", "no-cfg"])  # 2: CFG visibly changes tokens here
def test_generated_tokens_equal_the_official_inference(pair, cfg_weight, greedy):
    family, model, ours, _, _ = pair
    kw = dict(SAMPLING[family], cfg_weight=cfg_weight)
    want = _official_generate(model, seed=1, greedy=greedy, **kw)
    got = _our_generate(ours, seed=1, greedy=greedy, **kw)
    assert got == want
    assert len(got) >= 3
    if cfg_weight and not greedy:  # CFG changes what is sampled here, so the CFG path is really compared
        other = _our_generate(ours, seed=1, **dict(kw, cfg_weight=0.0))
        assert other != got


def test_each_row_of_a_batched_generation_equals_the_row_alone(pair):
    """Rows of different text lengths (one of 3 tokens: too short for the analyzer's repetition check) share
    a padded batch; each row's tokens — and, multilingual, its own analyzer's decisions — are the row's alone."""
    from tts_core.t3 import pad_sequences

    family, _, ours, _, _ = pair
    texts = [RAW_TEXT, [12, 13, 14], list(range(20, 31))]
    g = torch.Generator().manual_seed(3)
    spk, prompt = torch.randn(3, 256, generator=g), torch.randint(0, 6561, (3, 150), generator=g)
    kw = dict(SAMPLING[family], cfg_weight=0.5, do_sample=False, raw=True, max_new_tokens=30)
    t, tl = pad_sequences(texts)
    batch = ours.generate(t, tl, T3Cond(speaker_emb=spk, prompt_tokens=prompt, emotion_adv=0.5), **kw)
    for i, text in enumerate(texts):
        alone = ours.generate(torch.tensor([text]), torch.tensor([len(text)]),
                              T3Cond(speaker_emb=spk[i:i + 1], prompt_tokens=prompt[i:i + 1], emotion_adv=0.5), **kw)
        assert batch[i].tolist() == alone[0].tolist(), i


# ---- the multilingual AlignmentStreamAnalyzer ----------------------------------------------------------------------
def _constant_speech_input(model, token: int):
    """Every speech token embeds to one large vector v and `token`'s head row points along v: the last hidden
    state is ≈ v's direction whatever was fed, so `token` wins every step (a model stuck repeating)."""
    with torch.no_grad():
        v = torch.randn(H, generator=torch.Generator().manual_seed(7))
        model.speech_emb.weight.copy_(v.expand_as(model.speech_emb.weight) * 100)
        model.speech_head.weight[token] = 5 * v / v.norm() * model.speech_head.weight.norm(dim=1).mean()


@pytest.mark.parametrize("favoured", [1234, EOS], ids=["repeats-a-token", "wants-eos-at-once"])
def test_multilingual_eos_is_forced_and_suppressed_like_the_official_analyzer(official, tmp_path, favoured):
    model = official("multilingual", edit=lambda m: _constant_speech_input(m, favoured))
    ours, _, _ = build_t3(str(_install(model, tmp_path, "multilingual")), instruction_dim=16)
    ours.eval()
    kw = dict(SAMPLING["multilingual"], cfg_weight=0.5)
    want = _official_generate(model, seed=2, greedy=True, **kw)
    got = _our_generate(ours, seed=2, greedy=True, **kw)
    unguarded = _our_generate(ours, seed=2, greedy=True, alignment_guard=False, **kw)
    assert got == want and got[-1] == EOS
    if favoured == EOS:  # the analyzer suppresses the early EOS the model wants; without it, EOS comes at once
        assert unguarded == [EOS] and len(got) > 1 and EOS not in got[:-1]
    else:  # the analyzer forces EOS on the second repeat (3rd token); without it the model repeats to the end
        assert got == [favoured, favoured, EOS] and unguarded == [favoured] * MAX_NEW


def _attention_rows(text_start: int, S: int, path: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Attention rows of each frame over the whole sequence: mass 0.8 on the text column `path[t]`, the rest
    spread at random (frame 0 is the prefix's BOS row, over cond + text + BOS)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t, pos in enumerate(path):
        K = text_start + S + 1 + t
        noise = torch.rand(K, generator=g)
        row = 0.2 * noise / noise.sum()
        row[text_start + pos] += 0.8
        rows.append(row[None])
    return rows


@pytest.mark.parametrize("path, forces_eos", [
    (list(range(9)) + [8] * 12, True),  # reaches the end, then lingers on the last token: long tail
    (list(range(9)) + [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 0], True),  # reaches the end, then re-reads: repetition
    ([0, 1, 2, 3, 4, 5, 1, 5, 0, 5, 1, 5, 4, 5], False),  # jumps back (discontinuities), never ends
], ids=["long-tail", "alignment-repetition", "discontinuity"])
def test_alignment_stream_equals_the_official_analyzer_step_by_step(path, forces_eos):
    from chatterbox.models.t3.inference.alignment_stream_analyzer import AlignmentStreamAnalyzer

    C, S = 34, len(RAW_TEXT) + 2
    layers = SimpleNamespace(layers=[SimpleNamespace(self_attn=torch.nn.Identity()) for _ in range(14)])
    theirs = AlignmentStreamAnalyzer(layers, None, text_tokens_slice=(C, C + S), alignment_layer_idx=9, eos_idx=EOS)
    ours = AlignmentStream(S, EOS)
    g = torch.Generator().manual_seed(1)
    tokens = [BOS] + torch.randperm(6000, generator=g)[: len(path)].tolist()  # no token repeats here
    forced = []
    heads = [_attention_rows(C, S, path, seed=h) for h in range(3)]  # three aligned heads, averaged
    for t in range(len(path)):
        rows = [head[t] for head in heads]
        # the official hook stores each head's whole map: at frame 0 the prefix's rows, its BOS row last
        theirs.last_aligned_attns = [torch.cat([torch.rand(C + S, r.shape[1]), r]) if t == 0 else r for r in rows]
        logits = torch.randn(1, 8194, generator=g)
        want = theirs.step(logits.clone(), next_token=tokens[t])
        got = ours.step(logits.clone(), torch.stack([r[:, C:C + S] for r in rows]).mean(dim=0), tokens[t])
        assert torch.equal(got, want), t
        forced.append(bool(got[0, EOS] == 2 ** 15))
    assert ours.alignment.shape == (len(path), S) and torch.equal(ours.alignment, theirs.alignment)
    assert any(forced) == forces_eos


# ---- text token ids -------------------------------------------------------------------------------------------------
EN_TEXTS = ["hello world 42", "Hello... the well-known: test", "  spaced   out  ", "He said “hi” — then left"]
MTL_TEXTS = [("Héllo there, ça va? Très bien…", "fr"), ("Straße über Öl: Grüße", "de"), ("Γειά σου κόσμε", "el"),
             ("Привет, мир; всё хорошо", "ru"), ("안녕하세요 세계", "ko"), ("שלום עולם", "he"), ("ñandú açaí", "pt"),
             ("the weather is fine", "en"), ("مرحبا بالعالم", "ar"), ("Ẓ̌ǅ combining ﬁ ligature", "es")]


def test_english_text_ids_equal_the_official_en_tokenizer(tmp_path):
    from chatterbox.models.tokenizers import EnTokenizer
    from chatterbox.tts import punc_norm as official_punc_norm

    path = write_en_tokenizer(tmp_path / "tokenizer.json")
    theirs, ours = EnTokenizer(str(path)), ChatterboxTextTokenizer(path)
    for text in EN_TEXTS:  # ChatterboxTTS.generate: punc_norm, then text_to_tokens
        assert ours.encode(text) == theirs.text_to_tokens(official_punc_norm(text))[0].tolist(), text


def test_multilingual_text_ids_equal_the_official_mtl_tokenizer(tmp_path):
    from chatterbox.models.tokenizers import MTLTokenizer
    from chatterbox.mtl_tts import SUPPORTED_LANGUAGES
    from chatterbox.mtl_tts import punc_norm as official_punc_norm
    from tts_core.languages import MTL_LANGUAGES

    assert MTL_LANGUAGES == SUPPORTED_LANGUAGES
    path = write_mtl_vocab(tmp_path / "grapheme_mtl_merged_expanded_v1.json")
    theirs, ours = MTLTokenizer(str(path)), MultilingualTextTokenizer(path)
    for text, lang in MTL_TEXTS:  # ChatterboxMultilingualTTS.generate: punc_norm, then text_to_tokens(language)
        want = theirs.text_to_tokens(official_punc_norm(text), language_id=lang)[0].tolist()
        assert ours.encode(text, lang) == want, (lang, text)
    assert ours.encode("Ça", "FR") == ours.encode("ça", "fr")  # lower-cased codes and text, NFKD: ç → c + ◌̧
    assert ours.encode_batch(["a b", "a b"], ["fr", "de"])[0] != ours.encode_batch(["a b"], ["de"])[0]  # the tag
    with pytest.raises(TextTokenizerError, match="unsupported language 'xx'.*supported: ar, da, de"):
        ours.encode("hello", "xx")
    with pytest.raises(TextTokenizerError, match="no language given"):
        ours.encode("hello")
    try:
        import pykakasi  # noqa: F401
    except ImportError:  # the official front end would silently encode other ids: refused, with what to install
        with pytest.raises(TextTokenizerError, match="Japanese.*pykakasi"):
            ours.encode("こんにちは", "ja")
    with pytest.raises(TextTokenizerError, match="Chinese"):
        ours.encode("你好", "zh")  # needs spacy-pkuseg and Cangjie5_TC.json beside the vocabulary


def test_row_languages_from_the_metadata_column_or_the_default(tmp_path):
    import pandas as pd

    from tts_core.stage2.prepare import row_languages
    from tts_core.stage2.text_tokenizer import ByteTextTokenizer

    mtl = MultilingualTextTokenizer(write_mtl_vocab(tmp_path / "grapheme_mtl_merged_expanded_v1.json"))
    man = pd.DataFrame({"clip_id": ["a", "b", "c"], "language": ["FR", "", "de"]})
    assert row_languages(man, mtl, "it") == ["fr", "it", "de"]
    with pytest.raises(TextTokenizerError, match="1 row.*clip b: no language given.*supported"):
        row_languages(man, mtl, None)
    with pytest.raises(TextTokenizerError, match="2 row.*clip a: unsupported language 'xx'"):
        row_languages(pd.DataFrame({"clip_id": ["a", "b"], "language": ["xx", "yy"]}), mtl, None)
    assert row_languages(man.drop(columns="language"), ByteTextTokenizer(), None) == [None] * 3  # ignored


def test_pt_weights_are_found_and_read_like_safetensors(tmp_path):
    """The multilingual release's ve.pt / s3gen.pt: found in --chatterbox-dir, read with weights_only."""
    from tts_core.checkpoint import read_prefixed_state, read_weights
    from tts_core.frozen import FrozenModelsConfig, WeightsNotFound

    state = {"tokenizer.a": torch.arange(3.0), "flow.b": torch.ones(2)}
    torch.save(state, tmp_path / "s3gen.pt")
    save_file(state, str(tmp_path / "same.safetensors"))
    assert read_weights(tmp_path / "s3gen.pt").keys() == read_weights(tmp_path / "same.safetensors").keys()
    assert torch.equal(read_prefixed_state(tmp_path / "s3gen.pt", "tokenizer.")["a"], torch.arange(3.0))
    models = FrozenModelsConfig(chatterbox_dir=tmp_path)
    assert models.s3gen_path() == tmp_path / "s3gen.pt"
    with pytest.raises(WeightsNotFound, match="ve.safetensors or ve.pt"):
        models.ve_path()
    torch.save({"w": torch.ones(1), "code": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="not a plain state dict"):
        read_weights(tmp_path / "odd.pt")
