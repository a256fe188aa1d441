"""The Python API (issue #31): `InstructTTS`, in Chatterbox's style — ``from_run``, ``.sr``, ``.generate`` → a float
tensor [1, N] at ``.sr`` — and the same waveform as the ``synthesize`` command for the same seed."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from instruct_tts.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT, INSTRUCTION, SEED, MAX_NEW = "Hello world.", "A deep, slow male voice.", 5, 15


@pytest.fixture(scope="module")
def model(t3_run):
    from instruct_tts import InstructTTS

    return InstructTTS.from_run(t3_run, device="cpu")


def _cli_wav(t3_run, out, *extra):
    import soundfile as sf

    assert main(["synthesize", "--run", str(t3_run), "--text", TEXT, "--out", str(out), "--seed", str(SEED),
                 "--max-new-tokens", str(MAX_NEW), *extra]) == 0
    wav, sr = sf.read(str(out), dtype="float32")
    return wav, sr, np.load(out.with_suffix(".tokens.npy"))


def test_import_is_lazy_and_the_class_is_the_synthesizer():
    code = ("import sys, instruct_tts; assert 'torch' not in sys.modules, 'instruct_tts pulls torch'; "
            "from instruct_tts import InstructTTS; from tts_core.synthesis import Synthesizer; "
            "assert issubclass(InstructTTS, Synthesizer)")
    subprocess.run([sys.executable, "-c", code], check=True)
    import instruct_tts

    with pytest.raises(AttributeError):
        instruct_tts.NoSuchThing  # noqa: B018


def test_generate_returns_chatterbox_shaped_audio_equal_to_the_cli(model, t3_run, tmp_path):
    from tts_core.synthesis import SamplingConfig

    assert model.sr == model.vocoder.sample_rate == 16_000  # the embedded vocoder's rate
    wav = model.generate(TEXT, instruction=INSTRUCTION, seed=SEED, max_new_tokens=MAX_NEW)
    assert isinstance(wav, torch.Tensor) and wav.dtype == torch.float32 and wav.ndim == 2 and wav.shape[0] == 1
    assert wav.shape[1] > 0 and torch.isfinite(wav).all() and wav.abs().max() > 0
    # generate wraps synthesize: the same call, the same samples
    res = model.synthesize(TEXT, instruction=INSTRUCTION, seed=SEED, sampling=SamplingConfig(max_new_tokens=MAX_NEW))
    assert np.array_equal(wav[0].numpy(), res.wav)
    # ... and the synthesize command (a 16-bit wav file: equal to its quantisation step)
    cli, sr, tokens = _cli_wav(t3_run, tmp_path / "cli.wav", "--instruction", INSTRUCTION)
    assert sr == model.sr and np.array_equal(tokens, res.tokens) and cli.shape == (wav.shape[1],)
    assert np.abs(cli - np.clip(wav[0].numpy(), -1, 1)).max() <= 1 / 32768 + 1e-7
    # the seed matters, and the sampling keywords reach T3
    other = model.generate(TEXT, instruction=INSTRUCTION, seed=SEED + 1, max_new_tokens=MAX_NEW)
    assert other.shape != wav.shape or not torch.equal(other, wav)
    seen = {}
    orig = type(model.t3).generate

    def spy(self, *a, **kw):
        seen.update(kw)
        return orig(self, *a, **kw)

    type(model.t3).generate = spy
    try:
        model.generate(TEXT, instruction=INSTRUCTION, seed=SEED, max_new_tokens=4, temperature=0.5, top_p=0.9,
                       min_p=0.1, repetition_penalty=1.5, cfg_weight=0.0, instruction_guidance=0.0)
    finally:
        type(model.t3).generate = orig
    assert {k: seen[k] for k in ("temperature", "top_p", "min_p", "repetition_penalty", "cfg_weight",
                                 "max_new_tokens")} == dict(temperature=0.5, top_p=0.9, min_p=0.1,
                                                            repetition_penalty=1.5, cfg_weight=0.0, max_new_tokens=4)
    assert "instruction_guidance" not in seen  # W 0: the unguided path


def test_generate_with_an_audio_prompt_equals_the_cli_reference(model, t3_run, demo_store, tmp_path):
    _, corpus = demo_store
    ref = corpus.root / "wavs" / "demo_00000.wav"
    wav = model.generate(TEXT, instruction=INSTRUCTION, audio_prompt_path=ref, seed=SEED, max_new_tokens=MAX_NEW,
                         mapper_draws=1)
    cli, _, _ = _cli_wav(t3_run, tmp_path / "ref.wav", "--instruction", INSTRUCTION, "--reference", str(ref),
                         "--mapper-draws", "1")
    assert cli.shape == (wav.shape[1],) and np.abs(cli - np.clip(wav[0].numpy(), -1, 1)).max() <= 1 / 32768 + 1e-7
    with pytest.raises(ValueError, match="instruction, a reference"):
        model.generate(TEXT)


def test_generate_without_a_vocoder_says_what_to_pass(model):
    from tts_core.synthesis import RunIncompleteError

    vocoder, model.vocoder = model.vocoder, None
    try:
        assert model.sr is None
        with pytest.raises(RunIncompleteError, match="chatterbox_dir"):
            model.generate(TEXT, instruction=INSTRUCTION, max_new_tokens=2)
    finally:
        model.vocoder = vocoder
