"""Stage 1 models: the instruction encoder (attention pooling) and the flow-matching mapper."""
from tts_core.mapper.flow import InstructionMapper, MapperConfig, make_target
from tts_core.mapper.pooling import InstructionEncoder, TextEncoderMismatchError, check_text_encoder_identity

__all__ = ["InstructionEncoder", "InstructionMapper", "MapperConfig", "TextEncoderMismatchError",
           "check_text_encoder_identity", "make_target"]
