"""The lab's two caches: ``train.zarr`` (the training clips only) and ``all.zarr`` (a copy of it grown by the
held-out clips: same rows, same tokenizer, one codebook), built with the lab's frozen models."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from instruct_tts.lab.config import LabConfig
from instruct_tts.lab.paths import LabPaths


def frozen_models(cfg: LabConfig):
    """The frozen models the lab's caches are built with: the embedded defaults, with ``speech_tokenizer``
    choosing the tokenizer + vocoder (world-vq: its tokens carry F0 and level, docs/lab.md) and ``text_encoder``
    the instruction encoder."""
    from tts_core.frozen import FrozenModelsConfig

    return FrozenModelsConfig(device=cfg.device, speech_tokenizer=cfg.speech_tokenizer,
                              text_encoder=Path(cfg.text_encoder) if cfg.text_encoder else None)


def build_caches(cfg: LabConfig, root: Path, p: LabPaths, say) -> dict:
    """train.zarr from split/train.txt, then all.zarr: train.zarr copied and grown by split/all.txt's held-out
    lines (both builds resume or reuse; two stores encoded by different models are refused); → each build's wall
    seconds (the report's profile)."""
    import time

    from tts_core.cachebuild.build import BuildConfig, build_cache
    from cache.reader import CacheReader
    from cache.store import StoreError

    from contextlib import nullcontext

    from tts_core.cachebuild.shards import process_shard_map

    models = frozen_models(cfg)
    seconds, t = {}, time.time()
    with process_shard_map(cfg.cache_workers) if cfg.cache_workers > 1 else nullcontext() as shard_map:
        for line in build_cache(BuildConfig(metadata=p.split / "train.txt", audio_root=root, store=p.train_store,
                                            models=models), shard_map=shard_map).lines():
            say("  " + line)
        seconds["train.zarr (training clips)"], t = time.time() - t, time.time()
        if not Path(p.all_store).exists():  # grow a copy of the training store: same tokenizer, no re-encoding
            shutil.copytree(p.train_store, p.all_store + ".tmp", dirs_exist_ok=True)
            Path(p.all_store + ".tmp").rename(p.all_store)
        for line in build_cache(BuildConfig(metadata=p.split / "all.txt", audio_root=root, store=p.all_store,
                                            models=models), shard_map=shard_map).lines():
            say("  " + line)
        seconds["all.zarr (+ held-out clips)"] = time.time() - t
    a, t = CacheReader(p.all_store).identities, CacheReader(p.train_store).identities
    if {k: v.to_dict() for k, v in a.items()} != {k: v.to_dict() for k, v in t.items()}:
        raise StoreError(f"{p.all_store} and {p.train_store} were encoded by different models; delete "
                         f"{p.all_store} and rerun")
    return seconds


def caption_counts(cfg: LabConfig, out: Path) -> dict:
    """Clips, captions and unique instructions of the training store (what stage 1 and 2 trained on)."""
    from cache.reader import CacheReader

    r = CacheReader(LabPaths(out).train_store)
    ids = r.captions.ids
    return {"per_clip": cfg.captions_per_clip, "train_clips": len(r), "train_pairs": int(len(ids)),
            "train_instructions": int(len(np.unique(ids)))}
