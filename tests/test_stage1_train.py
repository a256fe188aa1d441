"""Stage-1 training loop: learning on structured synthetic data, phases, resume after a kill, non-finite
steps, checkpoint + load_mapper with text-encoder identity refusal. CPU only, small shapes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tts_core.identity import ModelIdentity
from tts_core.mapper import InstructionMapper, MapperConfig, TextEncoderMismatchError
from tts_core.stage1 import NonFiniteLossError, Stage1TrainConfig, load_mapper, train_stage1
from tts_core.stage1.synthetic import HashingTextEncoder, make_synthetic_data

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# one draw at T 0.3 (the pre-recipe sampling, tts_core.recipe): the thresholds below were set with it, and it is fast
ONE_DRAW = dict(draws=1, temperature=0.3)
SMALL_MAPPER = MapperConfig(hidden_dim=64, n_blocks=2, **ONE_DRAW)


def _small_data():
    return make_synthetic_data(n_clips=300, n_clusters=4, n_instructions=60, hidden_size=32, seed=1)


def _small_cfg(out, **kw) -> Stage1TrainConfig:
    base = dict(out_dir=str(out), phase="both", batch_size=32, lr_phase1=2e-3, lr_phase2=5e-4, epochs=1,
                eval_every=5, patience=10, warmup_steps=3, held_out_frac=0.2, eval_batch_size=256, device="cpu",
                min_phase_steps=0)
    base.update(kw)
    return Stage1TrainConfig(**base)


# ---- learning ------------------------------------------------------------------------------------------------
def test_learns_voice_from_instruction_text_beyond_mean_baseline(tmp_path):
    data = make_synthetic_data(n_clips=2000, n_clusters=8, n_instructions=300, hidden_size=32, seed=0)
    cfg = Stage1TrainConfig(out_dir=str(tmp_path / "run"), phase="1", batch_size=64, lr_phase1=2e-3, epochs=50,
                            eval_every=80, patience=10, warmup_steps=20, held_out_frac=0.2, max_steps=240,
                            eval_batch_size=1024, device="cpu")
    seen = []
    res = train_stage1(data, cfg, MapperConfig(hidden_dim=128, n_blocks=2, **ONE_DRAW), on_epoch=seen.append)
    b = res.baselines
    best = res.best
    print(f"\nheld-out: SpkCos {best['spk_cos']:.3f} XVecCos {best['xvec_cos']:.3f} AvgCos {best['avg_cos']:.3f}; "
          f"mean baseline {b['mean_avg_cos']:.3f}; NN baseline {b['nn_avg_cos']:.3f}; "
          f"curve {[round(h['avg_cos'], 3) for h in res.history]}")
    assert len(seen) == 3 and [h["step"] for h in seen] == [80, 160, 240]
    # measured for seeds 0-4 at 1 thread and seeds 0-1 at 2 threads: AvgCos, SpkCos, XVecCos all beat the mean
    # vector by +0.55…+0.57, so +0.2 holds with room and an untrained mapper (AvgCos ≈ 0) fails it
    assert best["avg_cos"] > b["mean_avg_cos"] + 0.2
    assert best["spk_cos"] > b["mean_spk_cos"] + 0.2 and best["xvec_cos"] > b["mean_xvec_cos"] + 0.2
    # outputs on disk
    assert (tmp_path / "run" / "mapper.safetensors").is_file() and (tmp_path / "run" / "phase1").is_dir()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "nearest instruction" in report and "train-set mean vector" in report
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["selected_phase"] == "1" and len(metrics["history"]) == 3
    assert {"spk_cos", "xvec_cos", "avg_cos", "mean_avg_cos", "nn_avg_cos"} <= set(metrics["history"][0])


# ---- phases, checkpoint, load_mapper ---------------------------------------------------------------------------
def test_both_phases_checkpoint_and_load_mapper(tmp_path):
    data = _small_data()
    cfg = _small_cfg(tmp_path / "run", patience=1, eval_every=3)
    res = train_stage1(data, cfg, SMALL_MAPPER)
    phases = [h["phase"] for h in res.history]
    assert phases[0] == "1" and phases[-1] == "2" and res.stopped_reason == "done"
    first2 = next(h for h in res.history if h["phase"] == "2")
    assert first2["improved"]  # best cosine reset for phase 2
    assert set(res.phase_best) == {"1", "2"}
    run = tmp_path / "run"
    for d in (run, run / "phase1", run / "phase2"):
        assert (d / "mapper.safetensors").is_file() and (d / "mapper.json").is_file()
    from safetensors import safe_open

    with safe_open(str(run / "mapper.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("encoder.", "mapper.")) for k in keys)
    assert any(k.startswith("encoder.attn.") for k in keys) and any(k.startswith("mapper.blocks.") for k in keys)
    meta = json.loads((run / "mapper.json").read_text())
    assert meta["text_encoder"] == data.text_encoder_identity
    assert meta["selected_phase"] in ("1", "2") and meta["cache"]["url"] == "synthetic"
    for k in ("epoch", "step", "best_avg_cos", "history", "mapper_config", "train_config"):
        assert k in meta

    te = HashingTextEncoder(32, seed=1)  # the encoder the synthetic data was made with
    enc, mapper, meta2 = load_mapper(run, text_encoder_identity=te.identity)
    assert not enc.training and not any(p.requires_grad for p in mapper.parameters())
    assert enc.hidden_size == 32 and mapper.config.cond_dim == 32 and mapper.config.n_blocks == 2
    # the loaded mapper reproduces the held-out AvgCos recorded for the selected checkpoint
    from tts_core.stage1.batches import Stage1Tables
    from tts_core.stage1.train import evaluate

    tr, va = data.split(cfg.held_out_frac, cfg.split_salt)
    noise = torch.randn((len(va), 512), generator=torch.Generator().manual_seed(cfg.eval_seed))
    from tts_core.stage1.artifacts import Stage1Model

    m = evaluate(Stage1Model(enc, mapper), Stage1Tables.build(data, tr, va, torch.device("cpu")), noise, 10)
    assert m["avg_cos"] == pytest.approx(meta2["metrics"]["avg_cos"], abs=1e-5)
    # inference from raw text == inference from the cached states
    texts = data.instruction_texts[:3]
    style_text = enc.encode_text(texts, te)
    style_cache = enc(*data.states.gather([0, 1, 2]))
    torch.testing.assert_close(style_text, style_cache, rtol=0, atol=1e-6)
    spk, xv = mapper.inference(style_text, seed=0)
    assert spk.shape == (3, 256) and xv.shape == (3, 192)


def test_text_encoder_identity_mismatch_is_refused(tmp_path):
    data = _small_data()
    train_stage1(data, _small_cfg(tmp_path / "run", phase="1", max_steps=5), SMALL_MAPPER)
    other = ModelIdentity("google/flan-t5-large", "e" * 64)
    with pytest.raises(TextEncoderMismatchError, match="flan-t5-large"):
        load_mapper(tmp_path / "run", text_encoder_identity=other)
    enc, _, _ = load_mapper(tmp_path / "run")  # no identity offered: loads, but remembers its own
    with pytest.raises(TextEncoderMismatchError):
        enc.encode_text(["a deep voice"], HashingTextEncoder(32, seed=99))
    # phase 2 alone refuses to start from a checkpoint trained over another text encoder
    data_other = make_synthetic_data(n_clips=300, n_clusters=4, n_instructions=60, hidden_size=32, seed=5)
    with pytest.raises(TextEncoderMismatchError):
        train_stage1(data_other, _small_cfg(tmp_path / "p2", phase="2", init_from=str(tmp_path / "run")),
                     SMALL_MAPPER)
    # a tampered weights file is detected
    w = tmp_path / "run" / "mapper.safetensors"
    raw = bytearray(w.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 8] = bytes(255 - x for x in raw[mid:mid + 8])
    w.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="half-written"):
        load_mapper(tmp_path / "run")


# ---- resume ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """12 steps straight through: phase 1 is one epoch (8 batches), phase 2 the remaining 4 steps."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight")
    res = train_stage1(_small_data(), _small_cfg(out, max_steps=12, eval_every=6), SMALL_MAPPER)
    opt = torch.load(out / "last" / "resume.pt", weights_only=True)["optimizer"]
    return res, opt


def _assert_same_run(res, opt, ref_res, ref_opt):
    assert res.global_step == ref_res.global_step == 12
    a, b = res.model.state_dict(), ref_res.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert opt["state"].keys() == ref_opt["state"].keys()
    for i in opt["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt["state"][i][k], ref_opt["state"][i][k])
    assert [(h["phase"], h["step"], h["avg_cos"]) for h in res.history] == \
        [(h["phase"], h["step"], h["avg_cos"]) for h in ref_res.history]


def test_resume_after_stop_equals_uninterrupted_run(tmp_path, uninterrupted):
    ref_res, ref_opt = uninterrupted
    assert [h["phase"] for h in ref_res.history] == ["1", "1", "2"]  # evals at 6, 8 (end of phase 1), 12
    data = _small_data()
    first = train_stage1(data, _small_cfg(tmp_path, max_steps=6, eval_every=6), SMALL_MAPPER)
    assert first.stopped_reason == "max_steps" and first.global_step == 6
    state = json.loads((tmp_path / "last" / "resume.json").read_text())["state"]
    assert (state["epoch"], state["batch"], state["global_step"]) == (0, 6, 6)
    res = train_stage1(data, _small_cfg(tmp_path, max_steps=12, eval_every=6), SMALL_MAPPER)
    opt = torch.load(tmp_path / "last" / "resume.pt", weights_only=True)["optimizer"]
    _assert_same_run(res, opt, ref_res, ref_opt)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_stage1_train import _small_cfg, _small_data, SMALL_MAPPER
    from tts_core.stage1 import train_stage1

    def on_epoch(m):
        if m["step"] == 6:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after the step-6 checkpoint

    train_stage1(_small_data(), _small_cfg({out!r}, max_steps=12, eval_every=6), SMALL_MAPPER, on_epoch=on_epoch)
""")


def test_resume_after_kill_9_equals_uninterrupted_run(tmp_path, uninterrupted):
    ref_res, ref_opt = uninterrupted
    out = tmp_path / "run"
    script = KILL_SCRIPT.format(tests=str(REPO / "tests"), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "mapper.json").exists()  # the kill came before the run finished
    res = train_stage1(_small_data(), _small_cfg(out, max_steps=12, eval_every=6), SMALL_MAPPER)
    opt = torch.load(out / "last" / "resume.pt", weights_only=True)["optimizer"]
    _assert_same_run(res, opt, ref_res, ref_opt)


class Killed(BaseException):
    """A kill, as far as the loop can tell: not an Exception, so nothing in the loop handles it."""


def _kill_during(monkeypatch, what: str, n: int) -> None:
    """Raise Killed at the n-th training step (mid-step: loss computed, no optimizer step yet), or half-way
    through writing the n-th resume checkpoint; for "ctrl-c", deliver SIGINT mid-step n instead."""
    calls = {"n": 0}

    def tick():
        calls["n"] += 1
        if calls["n"] == n:
            if what == "ctrl-c":
                signal.raise_signal(signal.SIGINT)
            else:
                raise Killed(f"{what} {n}")

    if what in ("step", "ctrl-c"):
        orig_loss = InstructionMapper.loss

        def loss(self, *a, **kw):
            out = orig_loss(self, *a, **kw)
            tick()
            return out

        monkeypatch.setattr(InstructionMapper, "loss", loss)
    elif what == "save":
        orig_save = torch.save

        def save(obj, f, *a, **kw):
            if calls["n"] + 1 == n:
                Path(f).write_bytes(b"half a checkpoint")
            tick()
            orig_save(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("what,n", [("step", 3), ("step", 7), ("step", 11), ("eval", 2), ("eval", 3), ("save", 1),
                                    ("save", 3), ("ctrl-c", 7)],
                         ids=["step3-before-any-checkpoint", "step7-between-checkpoints", "step11-in-phase2",
                              "phase1-end-eval", "after-the-last-checkpoint", "first-checkpoint-write",
                              "phase-switch-checkpoint-write", "ctrl-c"])
def test_killed_anywhere_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, monkeypatch, what, n):
    """Kill at any point (evaluations at steps 6, 8 = end of phase 1, 12; resume checkpoints written at 6, 8, 8
    after the phase switch, 12), rerun: weights, optimizer moments and evaluations equal the uninterrupted
    run's bit for bit (CPU, one thread). Ctrl-C saves the state at the step where it arrived."""
    from tts_core.interrupt import TrainingInterrupted, stop_after_step

    ref_res, ref_opt = uninterrupted
    data, cfg = _small_data(), _small_cfg(tmp_path, max_steps=12, eval_every=6)
    evals = {"n": 0}

    def on_epoch(m):
        evals["n"] += 1
        if what == "eval" and evals["n"] == n:
            raise Killed("eval")

    with monkeypatch.context() as m, stop_after_step():
        _kill_during(m, what, n)
        with pytest.raises(TrainingInterrupted if what == "ctrl-c" else Killed) as exc:
            train_stage1(data, cfg, SMALL_MAPPER, on_epoch=on_epoch)
    if what == "ctrl-c":
        assert json.loads((tmp_path / "last" / "resume.json").read_text())["state"]["global_step"] == n
        assert f"stopped at step {n}" in str(exc.value) and "resume.pt" in str(exc.value)
    res = train_stage1(data, cfg, SMALL_MAPPER)
    opt = torch.load(tmp_path / "last" / "resume.pt", weights_only=True)["optimizer"]
    _assert_same_run(res, opt, ref_res, ref_opt)


def test_resume_refuses_another_run(tmp_path):
    data = _small_data()
    train_stage1(data, _small_cfg(tmp_path, phase="1", max_steps=5), SMALL_MAPPER)
    with pytest.raises(ValueError, match="lr_phase1"):
        train_stage1(data, _small_cfg(tmp_path, phase="1", max_steps=10, lr_phase1=1e-2), SMALL_MAPPER)
    other = make_synthetic_data(n_clips=300, n_clusters=4, n_instructions=60, hidden_size=32, seed=2)
    with pytest.raises(ValueError, match="data differ"):
        train_stage1(replace(other), _small_cfg(tmp_path, phase="1", max_steps=10), SMALL_MAPPER)
    # resume=False starts over, so a changed config is fine
    res = train_stage1(data, _small_cfg(tmp_path, phase="1", max_steps=3, lr_phase1=1e-2, resume=False), SMALL_MAPPER)
    assert res.global_step == 3 and [h["step"] for h in res.history] == [3]


# ---- non-finite steps -------------------------------------------------------------------------------------------
def _poison_loss(monkeypatch, bad_calls):
    calls = {"n": 0}
    orig = InstructionMapper.loss

    def loss(self, *a, **kw):
        total, parts = orig(self, *a, **kw)
        calls["n"] += 1
        if bad_calls(calls["n"]):
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(InstructionMapper, "loss", loss)
    return calls


def test_a_nan_batch_is_skipped_and_counted(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, lambda n: n in (3, 4))
    res = train_stage1(_small_data(), _small_cfg(tmp_path, phase="1", max_steps=8, max_nonfinite=3), SMALL_MAPPER)
    assert res.nonfinite_steps == 2 and res.global_step == 8
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert res.history[-1]["nonfinite_total"] == 2 and all(torch.isfinite(torch.tensor(h["avg_cos"]))
                                                           for h in res.history)
    assert json.loads((tmp_path / "metrics.json").read_text())["nonfinite_steps"] == 2


def test_repeated_nan_raises_a_clear_error(tmp_path, monkeypatch):
    calls = _poison_loss(monkeypatch, lambda n: n >= 2)
    with pytest.raises(NonFiniteLossError, match="4 consecutive non-finite steps"):
        train_stage1(_small_data(), _small_cfg(tmp_path, phase="1", max_steps=50, max_nonfinite=3), SMALL_MAPPER)
    assert calls["n"] == 5
