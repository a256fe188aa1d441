"""End to end on CPU with production-shaped models (issue #31, item 3): every stage from the official file
formats, through the command line and through the served Prefect deployments.

The models are what a production machine holds, in the official formats and key names, with small seeded
random weights written by the test: an English Chatterbox directory (``ve.safetensors``, ``s3gen.safetensors``
at S3Gen's real shape — our loader builds ``S3Gen()`` itself —, ``t3_cfg.safetensors`` of the official T3 shrunk to
64 wide x 2 layers, which `detect_t3` reads as the English family by its shapes, ``tokenizer.json``) and a tiny T5
saved by ``transformers`` in flan-t5's format. The audio is 12 real espeak-ng clips of the embedded corpus.

build-cache --chatterbox-dir --text-encoder → train-stage1 → train-stage2 --t3 DIR/t3_cfg.safetensors, then
synthesize and evaluate with *no* model flags: the run remembers its frozen models. S3 tokens are voiced by
S3Gen: 24 kHz, 960 samples per valid (< 6561) speech token (25 Hz tokens → 50 Hz mel → hop 480).

The deployments are served as a user serves them (`instruct-tts serve --no-server` in a process of its own, against
the session's temporary Prefect server) and run with the real `prefect deployment run FLOW/- -p k=v` command;
train-stage1/-, synthesize/- and evaluate/- must give what the CLI gave (same mapper weights, tokens, waveforms).
About 2 minutes on 2 shared CPU cores (S3Gen at full size: ~20 s to write, ~10 s per process that loads it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("chatterbox", reason="the `vocoder` extra (chatterbox-tts) is not installed")

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from instruct_tts.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

S3GEN_SR = 24_000
SAMPLES_PER_TOKEN = 960  # S3Gen: 25 Hz tokens, token_mel_ratio 2 → 50 Hz mel, HiFT hop 480 at 24 kHz
S3_VOCAB = 6561  # valid S3 ids; T3's BOS/EOS and the rest of its 8194-row table are not voiced
TEXT, INSTRUCTION, SEED, MAX_NEW = "Hello there.", "A deep, slow male voice.", 3, 20
EVAL_N, EVAL_NEW = 2, 12
# train-stage1's options (CLI flags / deployment parameters): 4 steps of a small mapper, 2 draws per voice vector
STAGE1 = dict(device="cpu", phase=1, max_steps=4, eval_every=4, batch_size=8, hidden_dim=32, n_blocks=1,
              mapper_draws=2, held_out_frac=0.3)
N_CLIPS = 12


@pytest.fixture(scope="module")
def prod(chatterbox_en_dir, tmp_path_factory):
    """The three training stages through the CLI (no Prefect) on production-format files; → dict of paths."""
    from text_encoder_files import write_tiny_t5_dir
    from tts_core.corpus.demo import DemoCorpusConfig, generate_demo_corpus

    root = tmp_path_factory.mktemp("prod")
    corpus = generate_demo_corpus(DemoCorpusConfig(out_dir=root / "corpus", n_clips=N_CLIPS, seed=0, workers=1))
    t5 = root / "flan-t5-tiny"
    write_tiny_t5_dir(t5)
    cb = chatterbox_en_dir
    store, mapper, t3run = str(root / "prod.zarr"), root / "runs" / "mapper", root / "runs" / "t3"
    assert main(["build-cache", "--metadata", str(corpus.metadata), "--audio-root", str(corpus.root), "--store", store,
                 "--chatterbox-dir", str(cb), "--text-encoder", str(t5), "--no-prefect", "--loader-threads", "1"]) == 0
    assert main(["train-stage1", "--store", store, "--out", str(mapper), "--no-prefect",
                 *(f"--{k.replace('_', '-')}={v}" for k, v in STAGE1.items())]) == 0
    assert main(["train-stage2", "--store", store, "--mapper", str(mapper), "--t3", str(cb / "t3_cfg.safetensors"),
                 "--out", str(t3run), "--no-prefect", "--device", "cpu", "--batch-size", "4", "--max-steps", "2",
                 "--log-every", "1"]) == 0
    return dict(root=root, corpus=corpus, chatterbox=cb, t5=t5, store=store, mapper=mapper, t3=t3run)


def _s3gen_wav(path: Path, tokens: np.ndarray) -> np.ndarray:
    """The wav at ``path`` is S3Gen's rendering of ``tokens``: 24 kHz, 960 samples per valid token, not silent."""
    info = sf.info(str(path))
    wav, sr = sf.read(str(path), dtype="float32")
    n_valid = int((np.asarray(tokens) < S3_VOCAB).sum())
    assert sr == info.samplerate == S3GEN_SR and info.channels == 1
    assert n_valid > 0 and len(wav) == SAMPLES_PER_TOKEN * n_valid, (len(wav), n_valid)
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0
    return wav


# ---- 1. the command line ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_outputs(prod, tmp_path_factory):
    """`synthesize` and `evaluate` through the CLI with no model flags; → (wav path, tokens, eval.json)."""
    out = tmp_path_factory.mktemp("cli")
    wav = out / "cli.wav"
    assert main(["synthesize", "--run", str(prod["t3"]), "--text", TEXT, "--instruction", INSTRUCTION,
                 "--out", str(wav), "--seed", str(SEED), "--max-new-tokens", str(MAX_NEW)]) == 0
    assert main(["evaluate", "--run", str(prod["t3"]), "--store", prod["store"], "--out", str(out / "eval"),
                 "--n", str(EVAL_N), "--max-new-tokens", str(EVAL_NEW), "--no-prefect"]) == 0
    return wav, np.load(wav.with_suffix(".tokens.npy")), json.loads((out / "eval" / "eval.json").read_text())


def test_stages_record_the_frozen_models(prod):
    """mapper.json and stage2.json name the Chatterbox files and the text encoder the run was built over, with
    the identities (name + sha256) of what the cache was built with."""
    from tts_core.encoders.text_encoder import HFTextEncoder

    cb, t5 = prod["chatterbox"], prod["t5"]
    te = HFTextEncoder.from_dir(t5).identity
    mapper = json.loads((prod["mapper"] / "mapper.json").read_text())
    stage2 = json.loads((prod["t3"] / "stage2.json").read_text())
    store_models = mapper["cache"]["models"]
    for rec in (mapper["frozen_models"], stage2["frozen_models"]):
        assert rec["chatterbox"] == {"dir": str(cb), "ve": str(cb / "ve.safetensors"),
                                     "s3gen": str(cb / "s3gen.safetensors")}
        m = rec["models"]
        assert m["text_encoder"]["source"] == str(t5) and not m["text_encoder"]["embedded"]
        assert (m["text_encoder"]["name"], m["text_encoder"]["sha256"]) == (te.name, te.sha256)
        assert m["voice_encoder"]["source"] == str(cb / "ve.safetensors")
        assert m["xvector"]["source"] == m["speech_tokenizer"]["source"] == str(cb / "s3gen.safetensors")
        for role in ("text_encoder", "voice_encoder", "xvector", "speech_tokenizer"):
            assert m[role]["sha256"] == store_models[role]["sha256"] and not m[role]["embedded"], role
    assert stage2["t3_source"] == str(cb / "t3_cfg.safetensors") and stage2["family"] == "english"
    assert stage2["tokenizer"]["identity"]["source"] == str(cb / "tokenizer.json")


def test_cli_synthesize_voices_s3_tokens_with_s3gen(cli_outputs):
    wav_path, tokens, _ = cli_outputs
    assert 0 < len(tokens) <= MAX_NEW
    _s3gen_wav(wav_path, tokens)


def test_cli_evaluate_renders_held_out_instructions_with_s3gen(cli_outputs):
    _, _, summary = cli_outputs
    assert summary["n"] == len(summary["rows"]) >= 1
    for row in summary["rows"]:
        info = sf.info(row["wav"])
        assert info.samplerate == S3GEN_SR and info.channels == 1
        assert 0 < info.frames <= SAMPLES_PER_TOKEN * row["tokens"] and info.frames % SAMPLES_PER_TOKEN == 0
        wav, _ = sf.read(row["wav"], dtype="float32")
        assert np.abs(wav).max() > 0


def test_python_api_generates_the_cli_waveform(prod, cli_outputs, tmp_path):
    """`InstructTTS.from_run(run)` with no model arguments: Chatterbox-shaped output ([1, N] float32 at `sr` =
    S3Gen's 24 kHz), the same waveform as `instruct-tts synthesize` for the same seed."""
    from instruct_tts import InstructTTS

    cli_wav, cli_tokens, _ = cli_outputs
    model = InstructTTS.from_run(prod["t3"], device="cpu")
    wav = model.generate(TEXT, instruction=INSTRUCTION, seed=SEED, max_new_tokens=MAX_NEW)
    assert model.sr == S3GEN_SR and wav.dtype == torch.float32
    assert tuple(wav.shape) == (1, SAMPLES_PER_TOKEN * int((cli_tokens < S3_VOCAB).sum()))
    sf.write(str(tmp_path / "api.wav"), wav[0].numpy(), model.sr)  # the CLI's wav file is 16-bit PCM
    assert np.array_equal(sf.read(str(tmp_path / "api.wav"))[0], sf.read(str(cli_wav))[0])


# ---- 2. the served deployments -----------------------------------------------------------------------------------
SERVED = ("train-stage1", "synthesize", "evaluate")  # the deployments run here: FLOW/-


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the serving process exited with {proc.returncode}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


@pytest.fixture(scope="module")
def served(prefect_harness, tmp_path_factory):
    """`instruct-tts serve --no-server` against the session's temporary Prefect server, as a user serves the
    deployments (its flow runs execute in processes of their own); → the environment that reaches it."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    started = datetime.now(timezone.utc)
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "instruct_tts", "serve", "--no-server"], env=env,
                                cwd=Path(__file__).resolve().parents[1], stdout=fh, stderr=subprocess.STDOUT)

    async def polled_by_this_server() -> bool:
        """Each deployment used here is polled by a runner started now (not a deployment another test left)."""
        async with get_client() as c:
            for flow_name in SERVED:
                try:
                    d = await c.read_deployment_by_name(f"{flow_name}/-")
                except Exception:  # not registered yet
                    return False
                if d.last_polled is None or d.last_polled < started:
                    return False
        return True

    try:
        _wait(lambda: asyncio.run(polled_by_this_server()), 120, "deployments registered", proc)
        yield env, log
    finally:
        proc.terminate()  # serve_all turns SIGTERM into SystemExit: its `finally` runs
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _deployment_runs(env: dict, log: Path, *runs: tuple[str, dict], timeout: float = 400) -> None:
    """`prefect deployment run NAME -p k=v ...` for each (NAME, params), typed as a user types them, all submitted
    at once (the served runner executes them side by side); → when every flow run has completed."""
    import asyncio
    import re
    from uuid import UUID

    from prefect.client.orchestration import get_client

    procs = []
    for name, params in runs:
        cmd = [sys.executable, "-m", "prefect", "deployment", "run", name]
        for k, v in params.items():
            cmd += ["-p", f"{k}={v}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    ids = []
    for (name, _), proc in zip(runs, procs):
        out = proc.communicate(timeout=120)[0]
        found = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert proc.returncode == 0 and found, f"{name}: {out[-2000:]}"
        ids.append(UUID(found.group(1)))

    async def states():
        async with get_client() as c:
            return [(await c.read_flow_run(i)).state for i in ids]

    final = _wait(lambda: (lambda s: s if all(x.is_final() for x in s) else None)(asyncio.run(states())), timeout,
                  "deployment runs")
    failed = [f"{name}: {st.type.value} {st.message}" for (name, _), st in zip(runs, final) if not st.is_completed()]
    assert not failed, "\n".join(failed) + "\nserve log:\n" + log.read_text()[-6000:]


def test_deployments_train_synthesize_and_evaluate_as_the_cli_does(prod, cli_outputs, served, tmp_path):
    """`prefect deployment run train-stage1/-`, `synthesize/-` and `evaluate/-` on the served deployments, with
    the CLI flags' names as parameters and no model parameters: the CLI's mapper (same weights, same recorded
    models); S3Gen wavs, and for the same seed the CLI's tokens and waveforms."""
    env, log = served
    cli_wav, cli_tokens, cli_eval = cli_outputs
    batch = tmp_path / "batch.txt"
    batch.write_text(f"# one clip\n{TEXT}|{INSTRUCTION}\n", encoding="utf-8")
    _deployment_runs(env, log,
                     # `-p phase=1`, as a user types it: -p values are JSON, so 1 arrives as an int
                     ("train-stage1/-", dict(store=prod["store"], out=tmp_path / "mapper", **STAGE1)),
                     ("synthesize/-", dict(run=prod["t3"], batch=batch, out_dir=tmp_path / "wavs", seed=SEED,
                                           max_new_tokens=MAX_NEW)),
                     ("evaluate/-", dict(run=prod["t3"], store=prod["store"], out=tmp_path / "eval", n=EVAL_N,
                                         max_new_tokens=EVAL_NEW)))
    cli_mapper = json.loads((prod["mapper"] / "mapper.json").read_text())
    dep_mapper = json.loads((tmp_path / "mapper" / "mapper.json").read_text())
    assert dep_mapper["step"] == STAGE1["max_steps"] and dep_mapper["mapper_config"]["draws"] == STAGE1["mapper_draws"]
    assert dep_mapper["weights_sha256"] == cli_mapper["weights_sha256"]  # bit-equal on CPU, same seed
    assert dep_mapper["frozen_models"] == cli_mapper["frozen_models"]

    wav_path = tmp_path / "wavs" / "0002.wav"  # NNNN = the batch file's line
    tokens = np.load(wav_path.with_suffix(".tokens.npy"))
    assert tokens.tolist() == cli_tokens.tolist()
    wav = _s3gen_wav(wav_path, tokens)
    assert np.array_equal(wav, sf.read(str(cli_wav), dtype="float32")[0])  # S3Gen's noise is seeded too

    dep_eval = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [(r["instruction"], r["tokens"]) for r in dep_eval["rows"]] == \
           [(r["instruction"], r["tokens"]) for r in cli_eval["rows"]]
    for mine, theirs in zip(dep_eval["rows"], cli_eval["rows"]):
        assert sf.info(mine["wav"]).samplerate == S3GEN_SR
        assert np.array_equal(sf.read(mine["wav"], dtype="float32")[0], sf.read(theirs["wav"], dtype="float32")[0])
