"""What every training recipe shares: run directory + resume protocol, atomic checkpoints, metrics rows,
non-finite steps, progress bar and TensorBoard hook (`tts_core.training.tb`), the DDP helper
(docs/architecture.md).

A recipe (`tts_core.stage1.train.Stage1Recipe`, `tts_core.stage2.recipe.Stage2Recipe`) is one class whose
``train()`` reads top to bottom — set-up, resume, the step loop, evaluation, checkpoint, report — in the
manner of torchtune's recipes; the pieces here are the components those methods call, so each concern
lives once.
"""
from tts_core.training.distributed import DistEnv, init_distributed
from tts_core.training.loop import (
    NonFiniteSteps, fmt, progress_bar, resolve_device, set_lr,
)
from tts_core.training.runs import (
    CheckpointDir, config_changes, read_metrics, refuse_other_run, truncate_metrics, write_metrics_row,
)

__all__ = ["DistEnv", "init_distributed", "NonFiniteSteps", "fmt", "progress_bar", "resolve_device", "set_lr",
           "CheckpointDir", "config_changes", "read_metrics", "refuse_other_run", "truncate_metrics",
           "write_metrics_row"]
