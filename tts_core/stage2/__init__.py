"""Stage 2: train T3 (+ AdaRMSNorm instruction adapters) on instruction-only / audio-only / prompt + instruction rows.

The package's names are resolved on first use (PEP 562), so importing one of its modules — inference imports
`tts_core.stage2.model` and `tts_core.stage2.artifacts` — never imports the training loop (`tts_core.stage2.recipe`).
"""
import importlib

_EXPORTS = {  # name -> the module that defines it
    "BucketBatchSampler": "sampler", "Stage2Batch": "mixing", "batch_rng": "mixing", "Stage2Data": "data",
    "prepare_stage2_data": "prepare", "RowMix": "row_mix", "Stage2Config": "config", "Stage2Model": "model",
    "build_t3": "model", "parameter_groups": "model", "Stage2NonFiniteError": "recipe", "Stage2Result": "recipe",
    "train_stage2": "train", "ByteTextTokenizer": "text_tokenizer", "ChatterboxTextTokenizer": "text_tokenizer",
    "MultilingualTextTokenizer": "text_tokenizer", "TextTokenizer": "text_tokenizer",
    "TextTokenizerError": "text_tokenizer", "load_text_tokenizer": "text_tokenizer", "punc_norm": "text_tokenizer",
    "TurboTextTokenizer": "turbo_tokenizer", "turbo_punc_norm": "turbo_tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
