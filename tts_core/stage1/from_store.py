"""Stage 1 from a cache store: the one call the CLI and the Prefect flow share.

Opens the store, refuses one that cannot train a mapper (no instruction states, nothing usable) with
a message that says what to do, loads the per-clip tables into memory once (instruction states too when
their ragged table fits ``states_in_memory_mb``, else they are streamed per batch), and trains with
TensorBoard scalars under ``out_dir/tb`` beside whatever hook the caller adds (progress bar, Prefect
artifacts).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from tts_core.mapper.flow import MapperConfig
from tts_core.stage1.data import Stage1Data
from tts_core.stage1.train import Stage1Result, Stage1TrainConfig, train_stage1
from tts_core.training.tb import logged


class Stage1InputError(ValueError):
    """The store cannot train stage 1; the message names the store and the fix."""


def load_stage1_data(store: str, with_states: bool = True, states_in_memory_mb: float = 2048,
                     states_cache_mb: float = 1024) -> Stage1Data:
    from cache.reader import CacheReader

    reader = CacheReader(store)
    if reader.n_instructions == 0:
        raise Stage1InputError(
            f"{store}: the cache holds no instruction states (no clip had an instruction, or it was built "
            "without a text encoder). Add the instruction column to the metadata and rebuild with build-cache.")
    data = Stage1Data.from_reader(reader, with_states=with_states, states_in_memory_mb=states_in_memory_mb,
                                  states_cache_mb=states_cache_mb)
    if data.n_clips < 2:
        raise Stage1InputError(f"{store}: only {data.n_clips} usable clips ({data.dropped} dropped); stage 1 needs a "
                               "train and a held-out split")
    return data


def train_stage1_from_store(store: str, cfg: Stage1TrainConfig, mapper_cfg: MapperConfig | None = None,
                            on_epoch: Callable[[dict], None] | None = None, tensorboard: bool = True) -> Stage1Result:
    data = load_stage1_data(store, states_in_memory_mb=cfg.states_in_memory_mb, states_cache_mb=cfg.states_cache_mb)
    with logged(Path(cfg.out_dir) / "tb" if tensorboard else None, "stage1", on_epoch) as hook:
        return train_stage1(data, cfg, mapper_cfg, on_epoch=hook)
