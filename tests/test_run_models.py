"""A run remembers its frozen models (issue #31): a run trained over a (tiny) T5 text encoder synthesizes with no
--text-encoder, refuses a moved or different encoder by name, and accepts the same one given explicitly."""
from __future__ import annotations

import json
import shutil

import pytest

from instruct_tts.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLIPS = 12


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    """build-cache (embedded speech models, tiny T5 instructions) → train-stage1 → train-stage2 (tiny T3)."""
    from text_encoder_files import write_tiny_t5_dir
    from tts_core.cachebuild.build import BuildConfig, build_cache
    from tts_core.corpus.demo import DemoCorpusConfig, generate_demo_corpus
    from tts_core.frozen import FrozenModelsConfig

    root = tmp_path_factory.mktemp("t5run")
    corpus = generate_demo_corpus(DemoCorpusConfig(out_dir=root / "corpus", n_clips=N_CLIPS, seed=0, workers=1))
    t5 = root / "models" / "t5"
    write_tiny_t5_dir(t5)
    store, mapper, t3 = str(root / "t5.zarr"), root / "runs" / "mapper", root / "runs" / "t3"
    build_cache(BuildConfig(metadata=corpus.metadata, audio_root=corpus.root, store=store,
                            models=FrozenModelsConfig(text_encoder=t5)))
    assert main(["train-stage1", "--store", store, "--out", str(mapper), "--no-prefect", "--device", "cpu",
                 "--phase", "1", "--max-steps", "4", "--eval-every", "4", "--batch-size", "8", "--hidden-dim", "32",
                 "--n-blocks", "1", "--draws", "2", "--held-out-frac", "0.3"]) == 0
    assert main(["train-stage2", "--store", store, "--mapper", str(mapper), "--t3", "tiny", "--out", str(t3),
                 "--no-prefect", "--device", "cpu", "--batch-size", "4", "--max-steps", "2", "--log-every", "1"]) == 0
    return dict(root=root, t5=t5, store=store, mapper=mapper, t3=t3)


def test_runs_record_the_text_encoder_and_the_embedded_models(t5_run):
    from tts_core.encoders.text_encoder import HFTextEncoder

    te = HFTextEncoder.from_dir(t5_run["t5"]).identity
    mapper = json.loads((t5_run["mapper"] / "mapper.json").read_text())
    stage2 = json.loads((t5_run["t3"] / "stage2.json").read_text())
    assert mapper["mapper_config"]["draws"] == 2  # the effective values are what the run records
    assert stage2["train_config"]["prompt_instruction_prob"] == 0.2 and stage2["null_instruction"] is True
    for rec in (mapper["frozen_models"], stage2["frozen_models"]):
        m = rec["models"]
        assert (m["text_encoder"]["name"], m["text_encoder"]["sha256"]) == (te.name, te.sha256)
        assert m["text_encoder"]["source"] == str(t5_run["t5"]) and not m["text_encoder"]["embedded"]
        assert all(m[r]["embedded"] for r in ("voice_encoder", "xvector", "speech_tokenizer"))
        assert rec["chatterbox"] is None


def test_recorded_text_encoder_is_used_refused_when_moved_or_different_and_accepted_when_the_same(
        t5_run, tmp_path, capsys):
    from text_encoder_files import write_tiny_t5_dir
    from tts_core.mapper.pooling import TextEncoderMismatchError
    from tts_core.run_models import RunModelMismatch, RunModelMissing
    from tts_core.synthesis import SamplingConfig, Synthesizer

    t5, run = t5_run["t5"], t5_run["t3"]
    recorded = json.loads((run / "stage2.json").read_text())["frozen_models"]["models"]["text_encoder"]
    # no option: the recorded encoder
    s = Synthesizer.from_run(run)
    assert s.text_encoder.identity.sha256 == recorded["sha256"] and s.text_encoder.identity.source == str(t5)
    res = s.synthesize("Hello.", instruction="A quiet woman.", sampling=SamplingConfig(max_new_tokens=4))
    assert res.wav is not None and len(res.tokens) > 0

    moved = tmp_path / "elsewhere" / "t5"  # same directory name: the same model (name + sha256)
    shutil.move(str(t5), str(moved))
    try:
        with pytest.raises(RunModelMissing) as e:
            Synthesizer.from_run(run)
        assert str(t5) in str(e.value) and "--text-encoder" in str(e.value) and recorded["name"] in str(e.value)
        assert isinstance(e.value, FileNotFoundError)
        # the command line prints it as an error
        out = tmp_path / "a.wav"
        assert main(["synthesize", "--run", str(run), "--text", "Hi.", "--instruction", "A quiet woman.",
                     "--out", str(out), "--max-new-tokens", "4"]) == 2
        err = capsys.readouterr().err
        assert "instruct-tts: error:" in err and str(t5) in err and "--text-encoder" in err

        # another T5 (other weights) given explicitly: refused, naming both
        other = tmp_path / "other" / "t5"
        write_tiny_t5_dir(other, seed=1)
        with pytest.raises(RunModelMismatch) as e:
            Synthesizer.from_run(run, text_encoder=other)
        assert isinstance(e.value, TextEncoderMismatchError) and "--text-encoder" in str(e.value)
        assert recorded["sha256"][:12] in str(e.value) and str(other) in str(e.value)

        # the same model at its new place: accepted, and the same voice as from the recorded place
        again = Synthesizer.from_run(run, text_encoder=moved)
        assert again.text_encoder.identity.sha256 == recorded["sha256"]
        res2 = again.synthesize("Hello.", instruction="A quiet woman.", sampling=SamplingConfig(max_new_tokens=4))
        assert (res2.tokens == res.tokens).all() and (res2.speaker_emb == res.speaker_emb).all()
        assert main(["synthesize", "--run", str(run), "--text", "Hi.", "--instruction", "A quiet woman.",
                     "--out", str(out), "--max-new-tokens", "4", "--text-encoder", str(moved)]) == 0
    finally:
        shutil.move(str(moved), str(t5))


def test_a_run_without_records_behaves_as_before_and_chatterbox_files_are_refused_on_an_embedded_run(t5_run,
                                                                                                    tmp_path):
    from tts_core.mapper.pooling import TextEncoderMismatchError
    from tts_core.run_models import RunModelMismatch
    from tts_core.synthesis import Synthesizer

    # an embedded-model run told to use Chatterbox files: not what it was trained with
    with pytest.raises(RunModelMismatch, match="omit --chatterbox-dir"):
        Synthesizer.from_run(t5_run["t3"], chatterbox_dir=tmp_path)
    # written before records: the embedded default text encoder unless told, as before (here: the old error)
    old = tmp_path / "old"
    shutil.copytree(t5_run["t3"], old)
    meta = json.loads((old / "stage2.json").read_text())
    del meta["frozen_models"]
    (old / "stage2.json").write_text(json.dumps(meta))
    with pytest.raises(TextEncoderMismatchError):
        Synthesizer.from_run(old)
    assert Synthesizer.from_run(old, text_encoder=t5_run["t5"]).text_encoder.identity.source == str(t5_run["t5"])


def test_stage_defaults_are_the_recipe_defined_once():
    import subprocess
    import sys

    from instruct_tts.lab import PRESETS, LabConfig
    from tts_core import recipe
    from tts_core.mapper.flow import MapperConfig
    from tts_core.sampling_defaults import INSTRUCTION_GUIDANCE, REFERENCE_INSTRUCTION_GUIDANCE
    from tts_core.stage2.train import Stage2Config

    m, s, lab = MapperConfig(), Stage2Config(), LabConfig()
    assert (m.draws, m.temperature) == (lab.mapper_draws, lab.mapper_temperature) == (64, 0.8)
    mix = s.row_mix
    assert (mix.instruction_prob, mix.prompt_instruction_prob, mix.instruction_dropout) == (0.5, 0.2, 0.1)
    assert (lab.prompt_instruction_prob, lab.instruction_dropout) == (0.2, 0.1)
    assert INSTRUCTION_GUIDANCE == recipe.INSTRUCTION_GUIDANCE == 3.0
    assert REFERENCE_INSTRUCTION_GUIDANCE == recipe.REFERENCE_INSTRUCTION_GUIDANCE == 1.0
    assert recipe.RECIPE == {"mapper_draws": 64, "mapper_temperature": 0.8, "instruction_prob": 0.5,
                             "prompt_instruction_prob": 0.2, "instruction_dropout": 0.1, "instruction_guidance": 3.0,
                             "reference_instruction_guidance": 1.0}
    tiny = LabConfig.preset("tiny")  # CI keeps its one fast draw; the other presets override sizes and steps only
    assert (tiny.mapper_draws, tiny.mapper_temperature) == (1, 0.3)
    assert all(not set(PRESETS[p]) & set(recipe.RECIPE) - {"instruction_guidance"} for p in ("medium", "default"))
    subprocess.run([sys.executable, "-c", "import sys, tts_core.recipe, tts_core.sampling_defaults; "
                    "assert 'torch' not in sys.modules"], check=True)


def test_chatterbox_files_are_recorded_and_looked_up_by_role(tmp_path):
    """Without loading anything: production identities → the record → where each file is loaded from; a moved
    file is refused naming it and --chatterbox-dir; a loaded identity other than the record is refused."""
    from tts_core.encoders.campplus import CAMPPLUS_NAME
    from tts_core.encoders.s3_tokenizer import IDENTITY_NAME
    from tts_core.encoders.voice_encoder import CHATTERBOX_NAME
    from tts_core.frozen import WeightsNotFound
    from tts_core.identity import ModelIdentity
    from tts_core.run_models import RunModelMismatch, RunModelMissing, frozen_models_record, resolve_run_models

    cb = tmp_path / "chatterbox"
    ve, s3gen = cb / "ve.safetensors", cb / "s3gen.safetensors"
    ids = {"voice_encoder": ModelIdentity(CHATTERBOX_NAME, "a" * 64, str(ve)),
           "xvector": ModelIdentity(CAMPPLUS_NAME, "b" * 64, str(s3gen)),
           "speech_tokenizer": ModelIdentity(IDENTITY_NAME, "c" * 64, str(s3gen))}
    rec = frozen_models_record(ids)
    assert rec["chatterbox"] == {"dir": str(cb), "ve": str(ve), "s3gen": str(s3gen)}
    assert not any(m["embedded"] for m in rec["models"].values())
    with pytest.raises(RunModelMissing, match="--chatterbox-dir") as e:
        resolve_run_models(rec, run="the run R")
    assert str(ve) in str(e.value) and "the run R" in str(e.value)
    cb.mkdir()
    ve.write_bytes(b"x")
    s3gen.write_bytes(b"x")
    where = resolve_run_models(rec)
    assert (where.ve, where.s3gen, where.text_encoder) == (ve, s3gen, None)
    other = tmp_path / "copy"
    with pytest.raises(WeightsNotFound):  # an override directory without the files
        resolve_run_models(rec, chatterbox_dir=other)
    shutil.copytree(cb, other)
    where = resolve_run_models(rec, chatterbox_dir=other)
    assert (where.ve, where.s3gen) == (other / "ve.safetensors", other / "s3gen.safetensors")
    where.check("voice_encoder", ids["voice_encoder"], "R")  # the same model: fine
    with pytest.raises(RunModelMismatch, match="--chatterbox-dir"):
        where.check("voice_encoder", ModelIdentity(CHATTERBOX_NAME, "d" * 64, str(other / "ve.safetensors")), "R")
