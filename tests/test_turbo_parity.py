"""Chatterbox Turbo against the official `chatterbox` package (0.1.7, the `vocoder` extra).

Each test builds the official module with seeded random weights — a shrunken GPT-2 T3 (2 layers,
hidden 128, the official code path of `ChatterboxTurboTTS.from_local` with a tiny entry in its
`LLAMA_CONFIGS`) and the full-size `S3Gen(meanflow=True)` — saves it under the official file name,
loads it through our `load_turbo` / `S3GenSpec` and compares: keys, teacher-forced logits, greedy and
seeded sampled tokens, text token ids from the official tokenizer call, the meanflow waveform, and a
stage-2 training step. Turbo has no CFG: the official `generate` ignores `cfg_weight` (warning), so
"CFG on" must give the tokens of "CFG off".

Tokenizer files cannot be downloaded: a tiny byte-level BPE is trained here with the `tokenizers`
library and written under the official names (vocab.json, merges.txt, added_tokens.json,
special_tokens_map.json, tokenizer_config.json), with `<|endoftext|>` last and "!" = id 0 as in GPT-2.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("chatterbox", reason="the `vocoder` extra (chatterbox-tts) is not installed")

from chatterbox.models.s3gen import S3Gen  # noqa: E402
from chatterbox.models.s3gen.const import S3GEN_SIL  # noqa: E402
from chatterbox.models.t3 import T3 as OfficialT3  # noqa: E402
from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS  # noqa: E402
from chatterbox.models.t3.modules.cond_enc import T3Cond as OfficialCond  # noqa: E402
from chatterbox.models.t3.modules.t3_config import T3Config as OfficialHP  # noqa: E402
from chatterbox.tts_turbo import punc_norm as official_punc_norm  # noqa: E402

from tts_core.stage2.text_tokenizer import load_text_tokenizer  # noqa: E402
from tts_core.stage2.train import Stage2Model, freeze_for_stage2  # noqa: E402
from tts_core.stage2.turbo_tokenizer import TurboTextTokenizer  # noqa: E402
from tts_core.t3 import (  # noqa: E402
    AdaLayerNorm, CheckpointMismatchError, T3Batch, T3Cond, build_layout, is_adapter_key, load_turbo, pad_sequences,
    turbo_config,
)
from tts_core.vocoders import S3GenSpec, S3GenVocoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "GPT2_tiny_turbo_test"
HIDDEN, LAYERS, HEADS = 128, 2, 2
INSTRUCTION_DIM = 16
BOS, EOS = 6561, 6562
TAGS = ["[laugh]", "[chuckle]", "[cough]"]
CORPUS = ["Hello there, how are you today?", "The quick brown fox jumps over the lazy dog!",
          "Oh, that's hilarious - anyway, we do have a new model in store."]


# ---- fixtures: official tokenizer files, official tiny T3 saved under the official name ------------------------
def _write_tokenizer_files(d) -> None:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 10, vocab_size=300, min_frequency=1, show_progress=False)
    bpe.save_model(str(d))
    vocab = json.loads((d / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)  # last, as in GPT-2 (50256)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "added_tokens.json").write_text(json.dumps({t: len(vocab) + i for i, t in enumerate(TAGS)}))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (d / "special_tokens_map.json").write_text(json.dumps(special))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {**special, "add_bos_token": False, "add_prefix_space": False, "model_max_length": 1024,
         "tokenizer_class": "GPT2Tokenizer"}))


def _official_hp(vocab: int) -> OfficialHP:
    """`ChatterboxTurboTTS.from_local`'s hp, over the shrunken GPT-2 entry."""
    hp = OfficialHP(text_tokens_dict_size=vocab)
    hp.llama_config_name = TINY
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    return hp


@pytest.fixture(scope="module")
def turbo_dir(tmp_path_factory):
    """(directory, official T3 loaded as from_local does) with seeded random weights."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chatterbox_turbo")
    _write_tokenizer_files(d)
    vocab = len(AutoTokenizer.from_pretrained(str(d)))
    LLAMA_CONFIGS[TINY] = {**GPT2_MEDIUM_CONFIG, "n_embd": HIDDEN, "hidden_size": HIDDEN, "n_head": HEADS,
                           "n_layer": LAYERS, "n_positions": 2048, "n_ctx": 2048, "vocab_size": vocab,
                           "bos_token_id": vocab - 4, "eos_token_id": vocab - 4}
    try:
        torch.manual_seed(0)
        source = OfficialT3(_official_hp(vocab))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # every tensor random, LayerNorm gains and biases included
            for p in source.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(d / "t3_turbo_v1.safetensors"))
        official = OfficialT3(_official_hp(vocab))  # from_local: strict load, then `del t3.tfmr.wte`
        official.load_state_dict(load_file(str(d / "t3_turbo_v1.safetensors")))
        del official.tfmr.wte
        yield d, official.eval()
    finally:
        del LLAMA_CONFIGS[TINY]


@pytest.fixture(scope="module")
def ours(turbo_dir):
    return load_turbo(turbo_dir[0], instruction_dim=INSTRUCTION_DIM, adapter_hidden=8)


def _inputs(seed: int, prompt_len: int = 20, text_len: int = 9, speech_len: int = 12):
    g = torch.Generator().manual_seed(seed)
    return dict(spk=torch.randn(256, generator=g),
                prompt=torch.randint(0, 6561, (prompt_len,), generator=g),
                text=torch.randint(0, 300, (text_len,), generator=g),
                speech=torch.randint(0, 6561, (speech_len,), generator=g),
                instruction=torch.randn(INSTRUCTION_DIM, generator=g))


def _official_cond(x) -> OfficialCond:
    prompt = x["prompt"][None] if len(x["prompt"]) else None
    return OfficialCond(speaker_emb=x["spk"][None], cond_prompt_speech_tokens=prompt, emotion_adv=torch.ones(1, 1, 1))


def _our_cond(x, instruction: bool = True) -> T3Cond:
    P = len(x["prompt"])
    return T3Cond(speaker_emb=x["spk"][None], prompt_tokens=x["prompt"][None] if P else None,
                  prompt_lens=torch.tensor([P]), instruction_emb=x["instruction"][None] if instruction else None,
                  instruction_mask=torch.tensor([True]) if instruction else None)


def _official_teacher_forced(official, x):
    """The official modules' computation (prepare_input_embeds → tfmr → heads), as inference_turbo runs it."""
    speech_in = torch.cat([torch.tensor([BOS]), x["speech"]])[None]
    with torch.no_grad():
        embeds, len_cond = official.prepare_input_embeds(t3_cond=_official_cond(x), text_tokens=x["text"][None],
                                                         speech_tokens=speech_in)
        h = official.tfmr(inputs_embeds=embeds).last_hidden_state[0]
        T = len(x["text"])
        return official.text_head(h[len_cond: len_cond + T]), official.speech_head(h[len_cond + T:])


# ---- model: keys, adapters, teacher-forced logits ------------------------------------------------------------
def test_turbo_loads_every_official_key_strictly_adapters_only_extra(turbo_dir, ours):
    d, official = turbo_dir
    file_keys = set(load_file(str(d / "t3_turbo_v1.safetensors")))
    ours_keys = set(ours.t3.state_dict())
    assert {k for k in ours_keys if not is_adapter_key(k)} == file_keys
    assert len(file_keys) == 12 * LAYERS + 4 + 7  # GPT-2 blocks, wte/wpe/ln_f, T3 heads/embeddings/cond
    assert set(ours.report.loaded) == file_keys and len(ours.report.missing_adapter) == (2 * LAYERS + 1) * 4
    norms = [ours.t3.tfmr.h[0].ln_1, ours.t3.tfmr.h[0].ln_2, ours.t3.tfmr.ln_f]
    assert all(isinstance(n, AdaLayerNorm) for n in norms)
    assert torch.equal(ours.t3.tfmr.h[1].ln_2.bias, official.tfmr.h[1].ln_2.bias)  # the LayerNorm's own bias
    cfg = ours.t3.cfg
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.speech_vocab_size, cfg.text_vocab_size) == \
        (HIDDEN, LAYERS, HEADS, 6563, ours.text_tokenizer.vocab_size)
    assert ours.vocoder.meanflow and ours.vocoder.cfm_steps == 2 and ours.vocoder.path.name == "s3gen_meanflow.safetensors"


def test_turbo_full_size_config_has_the_official_shape():
    with torch.device("meta"):
        from tts_core.t3 import TurboT3

        m = TurboT3(turbo_config(adapters=False))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert len(shapes) == 299  # the official t3_turbo_v1.safetensors tensor count
    assert shapes["tfmr.wte.weight"] == (50276, 1024) and shapes["tfmr.wpe.weight"] == (8196, 1024)
    assert shapes["speech_head.bias"] == (6563,) and "text_head.bias" not in shapes
    assert shapes["tfmr.h.23.attn.c_attn.weight"] == (1024, 3072)
    assert 4.7e8 < sum(v.numel() for v in m.state_dict().values()) < 4.9e8  # ~479M


def test_a_llama_checkpoint_or_missing_key_is_refused(turbo_dir, tmp_path):
    d, _ = turbo_dir
    state = load_file(str(d / "t3_turbo_v1.safetensors"))
    for f in d.iterdir():
        if f.suffix == ".json" or f.suffix == ".txt":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    del state["speech_head.bias"]
    save_file(state, str(tmp_path / "t3_turbo_v1.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="t3_turbo_v1.safetensors.*speech_head.bias"):
        load_turbo(tmp_path)
    save_file({"tfmr.layers.0.input_layernorm.weight": torch.ones(4)}, str(tmp_path / "t3_turbo_v1.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="not a Chatterbox Turbo"):
        load_turbo(tmp_path)
    with pytest.raises(FileNotFoundError, match="no t3_turbo_v1.safetensors"):
        load_turbo(tmp_path / "nowhere")


@pytest.mark.parametrize("prompt_len", [20, 0])
def test_teacher_forced_logits_equal_the_official_with_fresh_adapters(turbo_dir, ours, prompt_len):
    _, official = turbo_dir
    x = _inputs(seed=prompt_len, prompt_len=prompt_len)
    ref_text, ref_speech = _official_teacher_forced(official, x)
    with torch.no_grad():  # an instruction on every row: zero-initialised adapters are exactly the identity
        out = ours.t3(T3Batch(x["text"][None], torch.tensor([9]), x["speech"][None], torch.tensor([12]), _our_cond(x)))
    lay = out.layout
    assert int(lay.cond_lens[0]) == 1 + prompt_len  # speaker + raw prompt tokens: no perceiver, no emotion
    s0, c = int(lay.speech_start[0]), int(lay.cond_lens[0])
    # equal to float32 rounding: the two GPT-2 implementations may take other CPU kernels (seen: 1-ulp differences
    # on one machine where they had been bit-equal); a wrong layout or adapter moves logits by far more
    torch.testing.assert_close(out.speech_logits[0, s0: s0 + 13], ref_speech, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text_logits[0, c: c + 9], ref_text, rtol=1e-5, atol=1e-5)


def test_batched_rows_with_different_prompts_equal_each_row_alone_and_kv_decoding(ours):
    """Per-row conditioning lengths (the layout's Turbo case), teacher forcing == KV-cached steps."""
    t3 = ours.t3
    xs = [_inputs(seed=10 + i, prompt_len=p, text_len=t, speech_len=s) for i, (p, t, s) in
          enumerate([(20, 9, 12), (0, 4, 7), (33, 6, 3)])]
    text, tl = pad_sequences([x["text"] for x in xs])
    speech, sl = pad_sequences([x["speech"] for x in xs])
    prompt, pl = pad_sequences([x["prompt"] for x in xs])
    cond = T3Cond(speaker_emb=torch.stack([x["spk"] for x in xs]), prompt_tokens=prompt, prompt_lens=pl,
                  instruction_emb=torch.stack([x["instruction"] for x in xs]), instruction_mask=torch.ones(3, dtype=bool))
    with torch.no_grad():
        full = t3(T3Batch(text, tl, speech, sl, cond))
        lay = full.layout
        for b, x in enumerate(xs):
            alone = t3(T3Batch(x["text"][None], tl[b: b + 1], x["speech"][None], sl[b: b + 1], _our_cond(x)))
            n = int(alone.layout.seq_lens[0])
            torch.testing.assert_close(full.speech_logits[b, :n], alone.speech_logits[0], atol=1e-5, rtol=1e-5)
        gen = build_layout(t3.cfg, text, tl, None, None, append_eos=False, prompt_lens=pl)
        logits, cache = t3.prefill(gen, cond)
        for b in range(3):
            torch.testing.assert_close(logits[b], full.speech_logits[b, int(lay.speech_start[b])], atol=1e-5, rtol=1e-5)
        for t in range(int(sl.max())):
            logits, cache = t3.decode_step(gen, t, speech[:, t], cache, cond)
            for b in range(3):
                if t < int(sl[b]):
                    col = int(lay.speech_start[b]) + 1 + t
                    torch.testing.assert_close(logits[b], full.speech_logits[b, col], atol=1e-5, rtol=1e-5)


def test_layout_turbo_rows_have_no_text_markers_and_their_own_conditioning_length():
    from tts_core.t3 import SEG_COND, SEG_SPEECH, SEG_TEXT, T3Config

    cfg = turbo_config(hidden_size=64, num_layers=1)
    text, tl = pad_sequences([[0, 255, 7], [9]])  # GPT-2 ids 0 ("!") and 255 are ordinary text here
    speech, sl = pad_sequences([[5, 6], [7, 8, 9]])
    lay = build_layout(cfg, text, tl, speech, sl, prompt_lens=torch.tensor([4, 0]))
    assert lay.cond_lens.tolist() == [5, 1] and lay.cond_len == 5
    assert lay.segment[0].tolist() == [SEG_COND] * 5 + [SEG_TEXT] * 3 + [SEG_SPEECH] * 4
    assert lay.token_ids[0, 5:].tolist() == [0, 255, 7, BOS, 5, 6, EOS]
    assert lay.segment[1, :7].tolist() == [SEG_COND, SEG_TEXT] + [SEG_SPEECH] * 5
    assert lay.position_ids[1, :7].tolist() == list(range(7))  # GPT-2 wpe positions: contiguous per row
    assert lay.text_labels[0, 5:8].tolist() == [255, 7, -100]  # next text token; the last one has none
    with pytest.raises(ValueError, match="special id"):  # the English layout keeps SOT/EOT reserved
        build_layout(T3Config.preset("tiny"), text, tl, speech, sl)


def test_turbo_runs_decode_with_the_meanflow_s3gen_beside_s3gen(tmp_path):
    from tts_core.vocoders import s3gen_spec_for

    turbo = s3gen_spec_for("gpt2", tmp_path / "s3gen.safetensors")
    assert (turbo.path, turbo.meanflow, turbo.cfm_steps, turbo.trailing_silence) == \
        (tmp_path / "s3gen_meanflow.safetensors", True, 2, 3)
    en = s3gen_spec_for("llama", tmp_path / "s3gen.safetensors")
    assert (en.path.name, en.meanflow, en.cfm_steps, en.trailing_silence) == ("s3gen.safetensors", False, 10, 0)


# ---- generation: greedy, seeded sampling, CFG ignored ---------------------------------------------------------
def _official_generate(official, x, seed: int, **kw):
    torch.manual_seed(seed)
    return official.inference_turbo(_official_cond(x), x["text"][None], **kw)[0]


def _our_generate(ours, x, seed: int, **kw):
    g = torch.Generator().manual_seed(seed)
    return ours.t3.generate(x["text"][None], torch.tensor([len(x["text"])]), _our_cond(x), generator=g, **kw)[0]


def test_greedy_tokens_equal_the_official(turbo_dir, ours):
    _, official = turbo_dir
    x = _inputs(seed=3)
    ref = _official_generate(official, x, 0, top_k=1, max_gen_len=15)  # top_k=1 is the official greedy
    got = _our_generate(ours, x, 0, top_k=1, do_sample=False, max_new_tokens=16)
    assert len(ref) == 16 and torch.equal(got, ref[ref < BOS])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seeded_sampling_equals_the_official_and_cfg_is_ignored(turbo_dir, ours, seed, caplog):
    """Defaults (temperature 0.8, top_k 1000, top_p 0.95, repetition penalty 1.2) and the official
    processor order. CFG on (0.5) is ignored by Turbo, officially and here: same tokens, a warning."""
    _, official = turbo_dir
    x = _inputs(seed=20 + seed)
    ref = _official_generate(official, x, seed, max_gen_len=24)
    off = _our_generate(ours, x, seed, max_new_tokens=25)
    with caplog.at_level("WARNING"):
        on = _our_generate(ours, x, seed, max_new_tokens=25, cfg_weight=0.5)
    assert torch.equal(off, ref[ref < BOS]) and torch.equal(on, off)
    assert "neither CFG nor min_p" in caplog.text


def test_synthesis_samples_each_family_with_its_official_defaults():
    """`synthesize` without sampling options uses the run's family's `generate` defaults (Turbo: top_k 1000,
    top_p 0.95, no min_p/CFG); a given option overrides; one the family lacks is refused, except those
    Turbo's official `generate` ignores with a warning."""
    from tts_core.synthesis import SamplingConfig, SamplingOptionError

    assert SamplingConfig().for_family("turbo") == dict(temperature=0.8, top_k=1000, top_p=0.95,
                                                        repetition_penalty=1.2)
    assert SamplingConfig().for_family("english") == dict(temperature=0.8, top_p=1.0, min_p=0.05,
                                                          repetition_penalty=1.2, cfg_weight=0.5)
    assert SamplingConfig().for_family("multilingual")["repetition_penalty"] == 2.0
    assert SamplingConfig(top_p=0.5, top_k=7).for_family("turbo")["top_k"] == 7
    assert SamplingConfig(cfg_weight=0.3).for_family("turbo")["cfg_weight"] == 0.3  # warned about by generate
    with pytest.raises(SamplingOptionError, match="english T3 does not sample with top_k"):
        SamplingConfig(top_k=50).for_family("english")


def test_sampling_stops_at_eos_like_the_official(turbo_dir, ours):
    """Seeds 0–5 with a raised EOS logit: some rows stop early, and some draw EOS as their *first*
    token, which the official loop does not treat as a stop."""
    _, official = turbo_dir
    x = _inputs(seed=5)
    lengths, first_eos = [], 0
    heads = (official.speech_head, ours.t3.speech_head)
    saved = [h.bias[EOS].item() for h in heads]
    with torch.no_grad():
        for h in heads:
            h.bias[EOS] += 7.0  # make EOS likely within a few steps
        try:
            for seed in range(6):
                ref = _official_generate(official, x, seed, max_gen_len=40)
                got = _our_generate(ours, x, seed, max_new_tokens=41)
                assert torch.equal(got, ref[ref < BOS])
                lengths.append(len(got))
                first_eos += int(ref[0] == EOS)
        finally:
            for h, v in zip(heads, saved):
                h.bias[EOS] = v
    assert min(lengths) < 40 and len(set(lengths)) > 1  # stopped early, at different steps
    assert first_eos  # and the official quirk is covered: an EOS drawn first does not stop the row


# ---- tokenizer --------------------------------------------------------------------------------------------------
def test_text_token_ids_equal_the_official_tokenizer_call(turbo_dir, ours):
    from transformers import AutoTokenizer

    d, _ = turbo_dir
    official = AutoTokenizer.from_pretrained(str(d))  # ChatterboxTurboTTS.from_local, line for line
    if official.pad_token is None:
        official.pad_token = official.eos_token
    texts = ["hello there: how are you today… [laugh] fine!", "The quick “brown” fox — jumps", "Oh [chuckle], dog!"]
    for text in texts:
        ref = official(official_punc_norm(text), return_tensors="pt", padding=True, truncation=True).input_ids[0]
        assert ours.text_tokenizer.encode(text) == ref.tolist()
    assert ours.text_tokenizer.encode("!") == [0]  # GPT-2's id 0: an ordinary token, not EOT
    assert official.convert_tokens_to_ids("[laugh]") in ours.text_tokenizer.encode("a [laugh]")
    assert ours.text_tokenizer.encode("") == []  # the official substitutes a canned sentence: not a training target


def test_tokenizer_travels_with_a_run_and_is_found_by_load_text_tokenizer(turbo_dir, ours, tmp_path):
    d, _ = turbo_dir
    tok = load_text_tokenizer(None, t3_dir=d)
    assert isinstance(tok, TurboTextTokenizer) and tok.identity == ours.text_tokenizer.identity
    tok.save(tmp_path)
    again = load_text_tokenizer(tmp_path)
    assert isinstance(again, TurboTextTokenizer) and again.identity.sha256 == tok.identity.sha256
    assert again.encode(CORPUS[2]) == tok.encode(CORPUS[2])


# ---- stage 2 on the Turbo T3 -----------------------------------------------------------------------------------
def test_stage2_step_trains_turbo_adapters_from_the_exact_official_model(turbo_dir, ours):
    _, official = turbo_dir
    t3 = load_turbo(turbo_dir[0], instruction_dim=INSTRUCTION_DIM, adapter_hidden=8).t3  # a fresh copy to train
    xs = [_inputs(seed=40 + i, prompt_len=p) for i, p in enumerate([20, 0])]
    text, tl = pad_sequences([x["text"] for x in xs])
    speech, sl = pad_sequences([x["speech"] for x in xs])
    prompt, pl = pad_sequences([x["prompt"] for x in xs])
    cond = T3Cond(speaker_emb=torch.stack([x["spk"] for x in xs]), prompt_tokens=prompt, prompt_lens=pl,
                  instruction_emb=torch.stack([x["instruction"] for x in xs]),
                  instruction_mask=torch.tensor([False, True]))  # an audio row and an instruction row
    batch = T3Batch(text, tl, speech, sl, cond)
    t3.eval()
    with torch.no_grad():  # before training, an instruction on: exactly the official logits (row alone:
        for x in xs:       # the same kernels; batched rows agree to rounding, tested above)
            out = t3(T3Batch(x["text"][None], torch.tensor([9]), x["speech"][None], torch.tensor([12]), _our_cond(x)))
            s0 = int(out.layout.speech_start[0])
            torch.testing.assert_close(out.speech_logits[0, s0: s0 + 13], _official_teacher_forced(official, x)[1],
                                       rtol=1e-5, atol=1e-5)  # float32 rounding, as above
    trainable, frozen = freeze_for_stage2(t3, torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    assert "t3.tfmr.wte (unused)" in frozen and trainable["adapters"] > 0 and not t3.tfmr.wte.weight.requires_grad
    model = Stage2Model(t3).train()
    before = {n: p.detach().clone() for n, p in t3.named_parameters() if is_adapter_key(n)}
    opt = torch.optim.AdamW([p for p in t3.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)  # GPT-2 dropout is active in train mode
    loss, stats = model(batch, cond.instruction_mask)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and loss.item() > 0
    torch.testing.assert_close(stats[0], loss.detach())
    changed = [n for n, p in t3.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(".fc2." in n for n in changed) and any("ln_f.adapter" in n for n in changed)


def test_train_stage2_with_t3_turbo_dir_trains_and_publishes_a_turbo_run(turbo_dir, tmp_path):
    """`--t3 DIR` with Turbo's files: the GPT-2 T3 and its tokenizer train end to end; the run is a Turbo
    `--t3` source itself (T3Config records the GPT-2 backbone) and carries the tokenizer files."""
    from test_stage2_train import H, _build_store, _save_stage1, TE  # the tiny store and stage-1 run

    from tts_core.stage2 import Stage2Config, build_t3, train_stage2
    from tts_core.t3 import TurboT3

    _build_store(str(tmp_path / "store.zarr"))
    s1 = _save_stage1(tmp_path / "stage1", TE)
    res = train_stage2(Stage2Config(store=str(tmp_path / "store.zarr"), mapper_dir=str(s1), t3=str(turbo_dir[0]),
                                    out_dir=str(tmp_path / "run"), batch_size=8, max_steps=2, epochs=10,
                                    save_every=0, log_every=1, seed=0, device="cpu"))
    assert isinstance(res.t3, TurboT3) and isinstance(res.tokenizer, TurboTextTokenizer)
    assert res.global_step == 2 and res.nonfinite_steps == 0 and "extra: 20 adapter params" in res.load_report
    assert res.data_stats["prompt_seconds"] == 15.0  # Turbo's audio rows see its 15 s prompts (cache.schema.PROMPTS)
    assert np.isfinite([r["loss"] for r in res.history]).all()
    out = tmp_path / "run"
    assert (out / "vocab.json").read_bytes() == (turbo_dir[0] / "vocab.json").read_bytes()
    again, report, _ = build_t3(str(out), instruction_dim=H)
    assert isinstance(again, TurboT3) and report.missing_adapter == []
    assert all(torch.equal(v, res.t3.state_dict()[k].cpu()) for k, v in again.state_dict().items())
    carried = load_text_tokenizer(None, t3_dir=out).identity
    assert (carried.name, carried.sha256) == (res.tokenizer.identity.name, res.tokenizer.identity.sha256)


# ---- meanflow S3Gen -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meanflow_file(tmp_path_factory):
    """(path, official S3Gen(meanflow=True)) with seeded random weights, saved under the official name."""
    torch.manual_seed(0)
    official = S3Gen(meanflow=True).eval()
    with torch.no_grad():  # the time mixer starts diagonal: make it random too
        g = torch.Generator().manual_seed(2)
        mixer = official.flow.decoder.estimator.time_embed_mixer.weight
        mixer.add_(torch.randn(mixer.shape, generator=g) * 0.02)
        for t in official.state_dict().values():  # fp16-exact values: the file is written in fp16 (half the disk)
            if t.is_floating_point():
                t.copy_(t.half().float())
    path = tmp_path_factory.mktemp("turbo_s3gen") / "s3gen_meanflow.safetensors"
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in official.state_dict().items()}, str(path))
    return path, official


def test_meanflow_waveform_is_bit_equal_to_the_official(meanflow_file):
    path, official = meanflow_file
    voc = S3GenSpec.meanflow_in(path.parent).load()
    assert voc.model.meanflow and voc.spec.cfm_steps == 2
    tokens = (np.arange(20) * 37) % 6561
    xv = np.random.default_rng(0).normal(size=192).astype(np.float32)
    torch.manual_seed(7)
    got = voc.decode(np.concatenate([tokens, [BOS, EOS]]), x_vector=xv)  # ids ≥ 6561 are dropped
    ref_dict = dict(prompt_token=torch.zeros(1, 0, dtype=torch.long), prompt_token_len=torch.zeros(1, dtype=torch.long),
                    prompt_feat=torch.zeros(1, 0, 80), prompt_feat_len=None, embedding=torch.from_numpy(xv)[None])
    with_silence = torch.cat([torch.from_numpy(tokens), torch.full((3,), S3GEN_SIL)])  # ChatterboxTurboTTS.generate
    torch.manual_seed(7)
    ref, _ = official.inference(speech_tokens=with_silence, ref_dict=ref_dict, n_cfm_timesteps=2)
    assert got.shape == (23 * 960,) and np.array_equal(got, ref[0].numpy())


def test_meanflow_and_standard_s3gen_never_load_into_each_other(meanflow_file, tmp_path):
    path, _ = meanflow_file
    with pytest.raises(ValueError, match="meanflow .*s3gen_meanflow.safetensors.* but a standard"):
        S3GenVocoder.from_file(path, spec=S3GenSpec.standard_in(path.parent))
    misnamed = tmp_path / "s3gen.safetensors"  # meanflow weights under the standard name
    misnamed.symlink_to(path)
    with pytest.raises(ValueError, match="meanflow .* but a standard"):
        S3GenVocoder.from_file(misnamed)
    state = load_file(str(path))
    del state["flow.decoder.estimator.time_embed_mixer.weight"]  # a standard S3Gen's key set ...
    state["flow.decoder.estimator.extra.weight"] = torch.zeros(1)  # ... plus one key S3Gen lacks
    standard = tmp_path / "std" / "s3gen.safetensors"
    standard.parent.mkdir()
    save_file(state, str(standard))
    with pytest.raises(ValueError, match="standard .* but a meanflow"):
        S3GenVocoder.from_file(standard, spec=S3GenSpec.meanflow_in(standard.parent))
    with pytest.raises(ValueError, match="1 weights S3Gen does not"):  # strict: an unknown key is refused
        S3GenVocoder.from_file(standard)
