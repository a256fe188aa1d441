"""train-stage2 as a user runs it: on the real embedded-default cache, after a (short) stage 1."""
from __future__ import annotations

import json

import pytest
import torch

from instruct_tts.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_train_stage2_tiny_on_the_demo_cache(demo_store, mapper_run, tmp_path, capsys):
    store, _ = demo_store
    out = tmp_path / "t3"
    rc = main(["train-stage2", "--store", store, "--mapper", str(mapper_run), "--t3", "tiny", "--out", str(out),
               "--no-prefect", "--device", "cpu", "--batch-size", "8", "--max-steps", "6", "--log-every", "3",
               "--warmup-steps", "2", "--lr", "1e-3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "adapter" in printed  # trainable parameters per group are in the printed report
    assert (out / "t3_cfg.safetensors").is_file() and (out / "stage2.json").is_file()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all(r["total_steps"] == 6 for r in rows)
    # both row kinds were trained on (50/50 mixing by default)
    assert 0 < sum(r["instruction_only_frac"] for r in rows) / len(rows) < 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("stage2/loss")] == [3, 6]


def test_cli_train_stage2_names_a_bad_t3(demo_store, mapper_run, tmp_path, capsys):
    store, _ = demo_store
    rc = main(["train-stage2", "--store", store, "--mapper", str(mapper_run), "--t3", str(tmp_path / "nowhere"),
               "--out", str(tmp_path / "t3"), "--no-prefect"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "preset" in err


def test_a_preset_over_the_embedded_store_speaks_only_its_tokenizers_codes(t3_run, demo_store, caplog):
    """A fresh preset over an embedded-tokenizer store gets a speech table of V + 2 rows (BOS V, EOS V + 1), not
    Chatterbox's 8194: the run records it, synthesis loads it from the checkpoint, and every sampled token is one
    the tokenizer decodes (an 8194-row head samples ids in [V, 6561) that the vocoder would drop)."""
    import logging

    import numpy as np

    from cache.writer import saved_codebook
    from tts_core.encoders import embedded
    from tts_core.synthesis import SamplingConfig, Synthesizer
    from tts_core.t3.families import read_shapes
    from tts_core.t3.loading import config_from_checkpoint

    store, _ = demo_store
    tok = embedded.restore(saved_codebook(store))
    V = tok.vocab_size
    assert tok.kind == "mel-vq" and 16 <= V < 6561
    for d in (t3_run, *sorted((t3_run / "checkpoints").glob("step_*"))):
        shapes = read_shapes(d / "t3_cfg.safetensors")
        assert shapes["speech_head.weight"][0] == shapes["speech_emb.weight"][0] == V + 2, d
        cfg = config_from_checkpoint(d / "t3_cfg.safetensors")
        assert (cfg.speech_vocab_size, cfg.start_speech_token, cfg.stop_speech_token) == (V + 2, V, V + 1), d
        meta = json.loads((d / "stage2.json").read_text())
        assert meta["speech_vocab"] == {"size": V + 2, "start": V, "stop": V + 1, "sized_to": "mel-vq"}, d
        assert meta["t3_config"]["speech_vocab_size"] == V + 2
    assert (f"speech vocabulary: {V + 2} rows (codes 0–{V - 1}, BOS {V}, EOS {V + 1}); sized to the store's "
            "`mel-vq` speech tokenizer") in (t3_run / "report.md").read_text()

    s = Synthesizer.from_run(t3_run)
    assert s.t3.cfg.speech_vocab_size == V + 2 and s.t3.speech_head.weight.shape[0] == V + 2
    assert (s.t3.cfg.start_speech_token, s.t3.cfg.stop_speech_token) == (V, V + 1)
    assert s.speech_tokenizer.vocab_size == V
    n = 0
    with caplog.at_level(logging.WARNING, logger="tts_core.encoders.embedded"):
        for seed in range(3):
            res = s.synthesize("Hello world.", instruction="A deep, slow male voice.", seed=seed,
                               sampling=SamplingConfig(max_new_tokens=40))
            assert res.tokens.size and 0 <= res.tokens.min() and res.tokens.max() < V, seed
            assert len(res.wav) == res.tokens.size * tok.config.hop_length  # every token voiced, none dropped
            n += res.tokens.size
    assert n > 20 and not [r for r in caplog.records if "outside the" in r.getMessage()]


# ---- synthesize ----------------------------------------------------------------------------------------------
def _synth(t3_run, out, *extra):
    return main(["synthesize", "--run", str(t3_run), "--text", "Hello world.", "--out", str(out),
                 "--max-new-tokens", "20", *extra])


def test_synthesize_instruction_reference_and_both(t3_run, demo_store, tmp_path):
    import numpy as np
    import soundfile as sf

    _, corpus = demo_store
    ref = str(corpus.root / "wavs" / "demo_00000.wav")
    runs = {"inst": ("--instruction", "A deep, slow male voice."), "ref": ("--reference", ref),
            "both": ("--instruction", "A deep, slow male voice.", "--reference", ref)}
    toks = {}
    for name, extra in runs.items():
        assert _synth(t3_run, tmp_path / f"{name}.wav", *extra) == 0
        wav, sr = sf.read(tmp_path / f"{name}.wav")
        toks[name] = np.load(tmp_path / f"{name}.tokens.npy")
        assert sr == 16_000 and 0 < len(toks[name]) <= 20 and np.isfinite(wav).all() and np.abs(wav).max() > 0
    # each mode conditions T3 the way its training rows did
    from tts_core.audio import load_clip
    from tts_core.synthesis import Synthesizer

    s = Synthesizer.from_run(t3_run)
    wav = load_clip(ref).wav
    inst, _ = s.condition("A deep, slow male voice.", None)
    refc, _ = s.condition(None, wav)
    both, _ = s.condition("A deep, slow male voice.", wav)
    assert inst.prompt_lens.tolist() == [0] and inst.instruction_mask.tolist() == [True]
    assert refc.prompt_lens.item() > 0 and refc.instruction_mask.tolist() == [False]
    assert not refc.instruction_emb.any()
    assert both.instruction_mask.tolist() == [True] and torch.equal(both.prompt_tokens, refc.prompt_tokens)
    assert torch.equal(both.speaker_emb, refc.speaker_emb) and not torch.equal(inst.speaker_emb, refc.speaker_emb)
    text = torch.tensor([s.tokenizer.encode("Hello world.")])
    from tts_core.t3.layout import build_generation_layout

    layout = build_generation_layout(s.t3.cfg, text, torch.tensor([text.shape[1]]))
    logits = {k: s.t3.prefill(layout, c)[0] for k, c in (("inst", inst), ("ref", refc), ("both", both))}
    assert not torch.allclose(logits["inst"], logits["ref"]) and not torch.allclose(logits["ref"], logits["both"])


def test_synthesize_is_deterministic_under_a_seed(t3_run, tmp_path):
    import numpy as np

    from tts_core.synthesis import SamplingConfig, Synthesizer

    s = Synthesizer.from_run(t3_run)
    a = s.synthesize("Hello world.", instruction="A bright female voice.", seed=3, sampling=SamplingConfig(max_new_tokens=15))
    b = s.synthesize("Hello world.", instruction="A bright female voice.", seed=3, sampling=SamplingConfig(max_new_tokens=15))
    c = s.synthesize("Hello world.", instruction="A bright female voice.", seed=4, sampling=SamplingConfig(max_new_tokens=15))
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.wav, b.wav)
    assert np.array_equal(a.speaker_emb, b.speaker_emb) and not np.array_equal(a.speaker_emb, c.speaker_emb)


def test_instruction_guidance_defaults_to_the_runs_and_zero_is_one_flag_away(t3_run, demo_store, tmp_path,
                                                                              monkeypatch):
    """Unset, W is the run's default: `INSTRUCTION_GUIDANCE` for a run that trained the null instruction (the
    Stage2Config default, as `t3_run`), 0 for one that did not; W > 0 there is refused. ``--instruction-guidance 0``
    reaches generate as the unguided path (whose tokens are today's: tests/test_t3_model.py)."""
    import shutil

    from tts_core.sampling_defaults import INSTRUCTION_GUIDANCE, REFERENCE_INSTRUCTION_GUIDANCE
    from tts_core.synthesis import SamplingConfig, SamplingOptionError, Synthesizer
    from tts_core.t3 import T3

    assert INSTRUCTION_GUIDANCE > 0
    assert "instruction_guidance" not in SamplingConfig().for_family("english")  # unset: the Synthesizer resolves it
    assert SamplingConfig(instruction_guidance=2.0).for_family("english")["instruction_guidance"] == 2.0
    with pytest.raises(SamplingOptionError, match="instruction guidance"):
        SamplingConfig(instruction_guidance=2.0).for_family("turbo")
    recorded = json.loads((t3_run / "stage2.json").read_text())
    assert recorded["train_config"]["instruction_dropout"] > 0 and recorded["null_instruction"] is True
    seen = []
    orig = T3.generate

    def spy(self, *a, **kw):
        seen.append(kw.get("instruction_guidance", 0.0))
        return orig(self, *a, **kw)

    monkeypatch.setattr(T3, "generate", spy)
    inst = ("--instruction", "A deep, slow male voice.")
    for k, flag in enumerate(((), ("--instruction-guidance", "0"), ("--instruction-guidance", "1.5"))):
        assert _synth(t3_run, tmp_path / f"{k}.wav", *inst, *flag) == 0
    assert seen == [INSTRUCTION_GUIDANCE, 0.0, 1.5]
    # with a reference clip as well: the reference's own default W (it keeps more of the voice); a given W wins
    assert REFERENCE_INSTRUCTION_GUIDANCE != INSTRUCTION_GUIDANCE
    ref = ("--reference", str(demo_store[1].root / "wavs" / "demo_00000.wav"))
    for k, flag in enumerate(((), ("--instruction-guidance", "1.5"))):
        assert _synth(t3_run, tmp_path / f"r{k}.wav", *inst, *ref, *flag) == 0
    assert seen[3:] == [REFERENCE_INSTRUCTION_GUIDANCE, 1.5]

    # a run whose stage 2 never trained the null instruction: unguided by default, W > 0 refused by name
    plain = tmp_path / "no_null"
    shutil.copytree(t3_run, plain)
    meta = json.loads((plain / "stage2.json").read_text())
    meta["train_config"]["instruction_dropout"] = 0.0
    meta["null_instruction"] = False  # stage2.json says so outright
    (plain / "stage2.json").write_text(json.dumps(meta))
    synth = Synthesizer.from_run(plain)
    assert synth.guidance(None) == 0.0 and synth.guidance(0.0) == 0.0
    with pytest.raises(SamplingOptionError, match="instruction-dropout"):
        synth.guidance(1.5)
    # the explicit record wins over the dropout; a run from before the key falls back to the recorded dropout
    meta["train_config"]["instruction_dropout"] = 0.1
    (plain / "stage2.json").write_text(json.dumps(meta))
    assert Synthesizer.from_run(plain).guidance(None) == 0.0
    del meta["null_instruction"]
    for dropout, w in ((0.1, INSTRUCTION_GUIDANCE), (None, 0.0)):
        if dropout is None:
            del meta["train_config"]["instruction_dropout"]  # older still: no dropout then, so none trained
        else:
            meta["train_config"]["instruction_dropout"] = dropout
        (plain / "stage2.json").write_text(json.dumps(meta))
        assert Synthesizer.from_run(plain).guidance(None) == w
    assert Synthesizer.from_run(t3_run).guidance(None) == INSTRUCTION_GUIDANCE


def test_synthesize_names_what_a_run_directory_lacks(t3_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(t3_run, broken)
    (broken / "stage2.json").unlink()
    assert _synth(broken, tmp_path / "x.wav", "--instruction", "A calm voice.") == 2
    err = capsys.readouterr().err
    assert "stage2.json" in err and str(broken) in err
    assert _synth(t3_run, tmp_path / "y.wav") == 2  # neither instruction nor reference


def test_evaluate_writes_report_json_plot_and_scores_directions(t3_run, demo_store, tmp_path, capsys):
    store, _ = demo_store
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(t3_run), "--store", store, "--out", str(out), "--n", "6",
                 "--max-new-tokens", "40", "--no-prefect"]) == 0
    s = json.loads((out / "eval.json").read_text())
    assert s["n"] == 6 and (out / "eval.png").is_file() and (out / "report.md").is_file()
    assert set(s["accuracy"]) == {"pitch", "rate", "loudness"}
    from tts_core.sampling_defaults import INSTRUCTION_GUIDANCE

    assert s["config"]["instruction_guidance"] == INSTRUCTION_GUIDANCE  # the W used: the run's default, recorded
    assert f"instruction guidance W = {INSTRUCTION_GUIDANCE}" in (out / "report.md").read_text()
    for r in s["rows"]:
        assert r["wav"] and r["tokens"] > 0 and -1 <= r["spk_cos"] <= 1
    # held-out means the mapper never trained on these texts
    from tts_core.stage1.data import normalise_instruction

    meta = json.loads((t3_run / "stage2.json").read_text())
    from tts_core.stage1.artifacts import read_meta

    m = read_meta(meta["mapper"]["dir"])
    held = {normalise_instruction(r["instruction"]) for r in s["rows"]}
    from cache.reader import CacheReader
    from tts_core.stage1.data import split_rows

    rd = CacheReader(store)
    import numpy as np

    iid = np.asarray(rd.instruction_id())
    tr, _ = split_rows(iid, rd.instruction_texts, m["train_config"]["held_out_frac"], m["train_config"]["split_salt"])
    train_texts = {normalise_instruction(rd.instruction_texts[int(i)]) for i in np.unique(iid[tr])}
    assert not held & train_texts
    assert "Direction accuracy" in capsys.readouterr().out


def test_a_moved_run_directory_still_synthesizes_from_its_own_codebook(t3_run, mapper_run, tmp_path, monkeypatch):
    import shutil

    import numpy as np

    import tts_core.synthesis as synthesis

    moved = tmp_path / "elsewhere"
    shutil.copytree(t3_run, moved / "t3")
    shutil.copytree(mapper_run, moved / "mapper")
    assert (moved / "t3" / "mel_vq.safetensors").is_file()

    def no_store(url):
        raise AssertionError("the run's own codebook must be used, not the cache store")

    monkeypatch.setattr(synthesis, "_store_codebook", no_store)
    monkeypatch.chdir(tmp_path)
    s = synthesis.Synthesizer.from_run(moved / "t3")
    res = s.synthesize("Hello.", instruction="A quiet woman.", sampling=synthesis.SamplingConfig(max_new_tokens=10))
    assert res.wav is not None and np.isfinite(res.wav).all()
