# Two entry points do all set-up on a fresh machine (uv + the system Python 3.11):
#   make demo   — install, generate the embedded corpus, build its cache, run the pipeline on it
#   make test   — install, run the test suite (.ci/run calls exactly this)
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench
setup:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --extra vocoder --extra cloud

demo: setup
	$(UV) run instruct-tts demo

test: setup
	$(UV) run pytest -q

bench: setup
	$(UV) run python -m bench.cache_build
