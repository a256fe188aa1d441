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
