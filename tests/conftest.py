import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """A small real espeak-ng corpus shared by the tests that need audio (generated once per session)."""
    from tts_core.corpus.demo import DemoCorpusConfig, generate_demo_corpus

    return generate_demo_corpus(DemoCorpusConfig(out_dir=tmp_path_factory.mktemp("corpus"), n_clips=48, seed=0))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is several times faster than two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DEMO_STORE_CLIPS = 300  # the demo's own size: stage-1 learning is judged on what `instruct-tts demo` trains on


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    """A real cache of the embedded default (espeak-ng corpus, embedded frozen models), built once per session.

    Returns (store_url, corpus). Tests must not write into it."""
    from tts_core.cachebuild.build import BuildConfig, build_cache
    from tts_core.corpus.demo import DemoCorpusConfig, generate_demo_corpus
    from tts_core.frozen import FrozenModelsConfig

    root = tmp_path_factory.mktemp("demo_store")
    corpus = generate_demo_corpus(DemoCorpusConfig(out_dir=root / "corpus", n_clips=DEMO_STORE_CLIPS, seed=0))
    store = str(root / "demo.zarr")
    build_cache(BuildConfig(metadata=corpus.metadata, audio_root=corpus.root, store=store, models=FrozenModelsConfig()))
    return store, corpus


# ---- a short real pipeline on the demo store: stage 1 (8 steps) and stage 2 (tiny T3, 4 steps) ------------------
@pytest.fixture(scope="session")
def mapper_run(demo_store, tmp_path_factory):
    from instruct_tts.cli import main as cli_main

    store, _ = demo_store
    out = tmp_path_factory.mktemp("s2cli") / "mapper"
    assert cli_main(["train-stage1", "--store", store, "--out", str(out), "--no-prefect", "--device", "cpu",
                     "--phase", "1", "--max-steps", "8", "--eval-every", "4", "--batch-size", "32",
                     "--hidden-dim", "32", "--n-blocks", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def t3_run(demo_store, mapper_run, tmp_path_factory):
    """A finished train-stage2 run directory (tiny T3), for synthesis and evaluation tests."""
    from instruct_tts.cli import main as cli_main

    store, _ = demo_store
    out = tmp_path_factory.mktemp("synth") / "t3"
    assert cli_main(["train-stage2", "--store", store, "--mapper", str(mapper_run), "--t3", "tiny", "--out", str(out),
                     "--no-prefect", "--device", "cpu", "--batch-size", "8", "--max-steps", "4", "--log-every", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def chatterbox_en_dir(tmp_path_factory):
    """An official-format English Chatterbox directory (ve, s3gen at its real size, a shrunken t3_cfg, tokenizer.json)
    with seeded random weights (tests/chatterbox_files.py `write_official_en_dir`); needs the `vocoder` extra."""
    pytest.importorskip("chatterbox", reason="the `vocoder` extra (chatterbox-tts) is not installed")
    from chatterbox_files import write_official_en_dir

    return write_official_en_dir(tmp_path_factory.mktemp("chatterbox_en"))
