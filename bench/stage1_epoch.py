"""Benchmark: stage-1 training samples/s from the cache vs. encoding instructions on the fly, one run.

    uv run python -m bench.stage1_epoch [--store cache/X.zarr] [--rows 300000] [--device cuda]

*cached*: `train_stage1` itself (one epoch of ``--rows`` rows: the store's clips tiled, as a big cache
would be), its own rows/s over the training steps. *on the fly* (the seed's way): the same model and
step, but each batch's instruction states come from running the text encoder on the batch's texts;
timed over ``--fly-batches`` batches. Without ``--store`` a demo store is built first (not timed).

`synthetic_epoch` (what `bench.gpu` runs): the *cached* path alone on a synthetic `Stage1Data` of ``rows`` rows
at ``hidden`` (1024: flan-t5-large) with ``unique`` instructions of N(24, 6) states, default mapper, batch 512,
one epoch; goal: a 300k-row epoch in < 15 s on one H100-class GPU.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GOAL_EPOCH_S = 15.0


@dataclass
class EpochConfig:
    rows: int = 300_000
    unique: int = 30_000  # instructions (their states live on the device; the per-batch gather is what costs)
    hidden: int = 1024
    batch_size: int = 512
    device: str = "cpu"
    mapper_hidden: int | None = None  # None: MapperConfig's defaults (the production mapper)
    mapper_blocks: int | None = None
    seed: int = 0


def synthetic_data(c: EpochConfig):
    """A `Stage1Data` of random unit vectors and fp16 ragged states (the store's dtype)."""
    from tts_core.stage1.data import Stage1Data
    from tts_core.stage1.states import RaggedStates

    g = torch.Generator().manual_seed(c.seed)
    lens = torch.from_numpy(np.clip(np.rint(np.random.default_rng(c.seed).normal(24, 6, c.unique)), 8, 64)).long()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    flat = (0.25 * torch.randn(int(offsets[-1]), c.hidden, generator=g)).half()
    return Stage1Data(spk=torch.randn(c.rows, 256, generator=g), xvec=torch.randn(c.rows, 192, generator=g),
                      instruction_id=torch.randint(0, c.unique, (c.rows,), generator=g),
                      states=RaggedStates(flat, offsets), clip_ids=[f"r{i}" for i in range(c.rows)],
                      instruction_texts=[f"instruction {i}" for i in range(c.unique)],
                      text_encoder_identity={"name": "synthetic (bench)", "sha256": "0" * 64})


def synthetic_epoch(c: EpochConfig, work: Path) -> dict:
    """One epoch of `train_stage1` (cached path); → rows/s of its training steps and the epoch's seconds."""
    from tts_core.mapper import MapperConfig
    from tts_core.stage1 import Stage1TrainConfig, train_stage1

    data = synthetic_data(c)
    small = {k: v for k, v in (("hidden_dim", c.mapper_hidden), ("n_blocks", c.mapper_blocks)) if v}
    mapper = MapperConfig(cond_dim=c.hidden, **small)
    cfg = Stage1TrainConfig(out_dir=str(work / "cached"), phase="1", epochs=1, min_phase_steps=0, eval_every=0,
                            batch_size=c.batch_size, device=c.device, held_out_frac=0.01, resume=False,
                            nn_max_queries=256, nn_max_keys=2048)
    if c.device.startswith("cuda"):  # warm-up: kernels and allocator, not counted
        train_stage1(data, Stage1TrainConfig(**{**cfg.to_dict(), "out_dir": str(work / "warm"), "max_steps": 5}),
                     mapper)
    t0 = time.perf_counter()
    res = train_stage1(data, cfg, mapper)
    wall = time.perf_counter() - t0
    rate = res.history[-1]["rows_per_s"]
    epoch_s = c.rows / rate
    return {"rows": c.rows, "unique": c.unique, "hidden": c.hidden, "rows_s": rate, "epoch_s": epoch_s,
            "wall_s": wall, "goals": {f"300k-row epoch < {GOAL_EPOCH_S:.0f} s": 300_000 / rate < GOAL_EPOCH_S}}


def _demo_store(work: Path, clips: int) -> str:
    from tts_core.cachebuild.build import BuildConfig, build_cache
    from tts_core.corpus.demo import DemoCorpusConfig, generate_demo_corpus
    from tts_core.frozen import FrozenModelsConfig

    corpus = generate_demo_corpus(DemoCorpusConfig(out_dir=work / "corpus", n_clips=clips, seed=0))
    store = str(work / "bench.zarr")
    build_cache(BuildConfig(metadata=corpus.metadata, audio_root=corpus.root, store=store, models=FrozenModelsConfig()))
    return store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store")
    ap.add_argument("--clips", type=int, default=300, help="demo store size when --store is not given")
    ap.add_argument("--rows", type=int, default=20_000, help="epoch size (store rows tiled)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--fly-batches", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--text-encoder", help="local HF text-encoder dir (default: the embedded one)")
    a = ap.parse_args()

    from tts_core.frozen import FrozenModelsConfig, load_text_encoder
    from tts_core.mapper import MapperConfig
    from tts_core.stage1 import Stage1TrainConfig, train_stage1
    from tts_core.stage1.artifacts import Stage1Model
    from tts_core.stage1.from_store import load_stage1_data
    from tts_core.mapper import InstructionEncoder, InstructionMapper

    work = Path(tempfile.mkdtemp(prefix="bench-stage1-"))
    store = a.store or _demo_store(work, a.clips)
    data = load_stage1_data(store)
    reps = -(-a.rows // data.n_clips)
    big = type(data)(spk=data.spk.repeat(reps, 1)[:a.rows], xvec=data.xvec.repeat(reps, 1)[:a.rows],
                     instruction_id=data.instruction_id.repeat(reps)[:a.rows], states=data.states,
                     lengths=data.lengths, clip_ids=[f"r{i}" for i in range(a.rows)],
                     instruction_texts=data.instruction_texts, text_encoder_identity=data.text_encoder_identity)
    print(f"device: {a.device}  threads: {torch.get_num_threads()}  rows/epoch: {a.rows}  batch: {a.batch_size}  "
          f"text hidden: {data.hidden_size}")

    # cached: the real training loop, one epoch (held-out evaluation excluded from its rows/s)
    cfg = Stage1TrainConfig(out_dir=str(work / "cached"), phase="1", epochs=1, min_phase_steps=0, eval_every=0,
                            batch_size=a.batch_size, device=a.device, held_out_frac=0.01, resume=False)
    if a.device.startswith("cuda"):  # warm-up: kernels and allocator, not counted
        train_stage1(big, Stage1TrainConfig(**{**cfg.to_dict(), "out_dir": str(work / "warm"), "max_steps": 5}))
    t0 = time.perf_counter()
    res = train_stage1(big, cfg)
    wall = time.perf_counter() - t0
    cached = res.history[-1]["rows_per_s"]
    print(f"cached     : {cached:12,.0f} samples/s  (epoch of {res.n_train} rows: {res.n_train / cached:.2f} s of "
          f"training steps, {wall:.1f} s wall incl. baselines + evaluation)")

    # on the fly: same model and step; states from the text encoder per batch
    te = load_text_encoder(FrozenModelsConfig(text_encoder=Path(a.text_encoder) if a.text_encoder else None,
                                              device=a.device))
    dev = torch.device(a.device)
    model = Stage1Model(InstructionEncoder(data.hidden_size), InstructionMapper(MapperConfig(cond_dim=data.hidden_size))).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    texts = big.instruction_texts
    g = torch.Generator().manual_seed(0)
    n = 0
    t0 = time.perf_counter()
    for _ in range(a.fly_batches):
        idx = torch.randint(0, a.rows, (a.batch_size,), generator=g)
        style = model.encoder.encode_text([texts[int(i)] for i in big.instruction_id[idx]], te)
        loss, _ = model.mapper.loss(style, big.spk[idx].to(dev), big.xvec[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += a.batch_size
    if dev.type == "cuda":
        torch.cuda.synchronize()
    fly = n / (time.perf_counter() - t0)
    print(f"on the fly : {fly:12,.0f} samples/s  ({a.fly_batches} batches)")
    print(f"ratio cached / on-the-fly: {cached / fly:.1f}x;  projected 300k-row epoch: cached {300_000 / cached:.1f} s, "
          f"on the fly {300_000 / fly:.0f} s")


if __name__ == "__main__":
    main()
