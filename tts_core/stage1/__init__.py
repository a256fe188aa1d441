"""Stage 1: train the instruction encoder + flow-matching mapper on cached vectors and text states."""
from tts_core.stage1.artifacts import Stage1Model, load_mapper
from tts_core.stage1.data import Stage1Data, split_rows
from tts_core.stage1.train import NonFiniteLossError, Stage1Result, Stage1TrainConfig, train_stage1

__all__ = ["NonFiniteLossError", "Stage1Data", "Stage1Model", "Stage1Result", "Stage1TrainConfig", "load_mapper",
           "split_rows", "train_stage1"]
