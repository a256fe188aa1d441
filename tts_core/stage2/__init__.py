"""Stage 2: train T3 (+ AdaRMSNorm instruction adapters) on instruction-only / audio-only rows."""
from tts_core.stage2.data import BucketBatchSampler, Stage2Batch, Stage2Data, batch_rng, prepare_stage2_data
from tts_core.stage2.row_mix import RowMix
from tts_core.stage2.text_tokenizer import (
    ByteTextTokenizer, ChatterboxTextTokenizer, MultilingualTextTokenizer, TextTokenizer, TextTokenizerError,
    load_text_tokenizer, punc_norm,
)
from tts_core.stage2.turbo_tokenizer import TurboTextTokenizer, turbo_punc_norm
from tts_core.stage2.train import (
    Stage2Config, Stage2Model, Stage2NonFiniteError, Stage2Result, build_t3, parameter_groups, train_stage2,
)

__all__ = ["BucketBatchSampler", "ByteTextTokenizer", "ChatterboxTextTokenizer", "MultilingualTextTokenizer", "RowMix", "Stage2Batch", "Stage2Config",
           "Stage2Data", "Stage2Model", "Stage2NonFiniteError", "Stage2Result", "TextTokenizer", "TextTokenizerError",
           "TurboTextTokenizer", "batch_rng", "build_t3", "load_text_tokenizer", "parameter_groups",
           "prepare_stage2_data", "punc_norm", "train_stage2", "turbo_punc_norm"]
