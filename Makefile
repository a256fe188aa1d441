# Two entry points do all set-up on a fresh machine (uv + the system Python 3.11):
#   make demo   — install, generate the embedded corpus, build its cache, run the pipeline on it
#   make test   — install, run the test suite (.ci/run calls exactly this)
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench bench-gpu
setup:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --extra vocoder --extra cloud

demo: setup
	$(UV) run instruct-tts demo

test: setup
	$(UV) run pytest -q

bench: setup
	$(UV) run python -m bench.cache_build

# Every GPU figure in one command (<= 8 min on one H100/H200; a labelled tiny dry run without CUDA).
# Writes gpu_bench.md + gpu_bench.json under $OUT when set, else bench/results/ (bench/gpu.py).
bench-gpu: setup
	$(UV) run python -m bench.gpu
