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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is several times faster than two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
