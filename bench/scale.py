"""Benchmark: growth with data size — wall time, rows/s and peak RSS of each stage on stores of 10k / 100k /
300k rows in the project's schema, side by side in one table.

    uv run python -m bench.scale                          # 10k and 100k rows, H=1024, every instruction unique
    uv run python -m bench.scale --sizes 300000           # the user's scale (~13 GB of store under --workdir)
    uv run python -m bench.scale --hidden 256 --unique-frac 0.2 --device cuda
    uv run python -m bench.scale --sizes 300000 --captions-per-clip 3   # 3 captions per clip (schema 4)

``--captions-per-clip K``: each of the ``rows`` clips is listed on K metadata lines (its own + K−1 caption rows,
`tts_core.captions`), so the store has rows × K lines and pairs; the per-clip tables — what stage 1 holds in
memory — stay ``rows`` long, only the caption table (8 bytes a pair) grows. The run also prints the
build-time saving against one line per pair: build-cache runs the audio models on ``rows`` clips instead of
rows × K lines, at ``--encode-clips-s`` (the measured end-to-end build rate, docs/benchmarks.md).

Stores hold synthetic vectors with realistic lengths: instructions N(24, 6) text-encoder tokens (clipped to
8..64; flan-t5 tokens of a one-sentence voice description), speech 25 Hz × U(2, 14) s, transcripts ~15
characters per second, one speaker per ~50 clips. ``--unique-frac`` sets unique instructions / rows (the
user's data: ~1). Every stage runs in its own process, so its peak RSS (``ru_maxrss``) is its own:

  write             build the store through `cache.writer.CacheWriter` (what build-cache calls)
  stage 1: load     `Stage1Data` from the store (tables, manifest; states streamed or in memory)
  stage 1: train    `train_stage1_from_store`: load + NN baseline + ``--steps`` steps + one held-out
                    evaluation; rows/s = training steps only; peak RSS = the whole stage-1 process
  NN baseline       load + `compute_baselines` (sampled nearest-instruction search)
  random access     `CacheDataset` items with their states, in `ChunkAwareSampler` order: batches of 256
                    (items + `CacheDataset.collate`, what a DataLoader does) in one process and
                    in a DataLoader with 2 workers, and item by item; then item by item in a uniform
                    random order (what the reader gave before)
  stage 2: prepare  `prepare_stage2_data` (byte tokenizer, untrained pooling + small mapper)

The mapper is small (``--mapper-hidden``/``--mapper-blocks``; its compute is not what is measured here).
Targets (printed pass/fail): peak RSS of stage 1 and stage 2 ≤ 6 GB at every size, random access with
states ≥ 5,000 rows/s in chunk-aware order. Stores are deleted after each size unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RSS_TARGET_GB = 6.0
RANDOM_TARGET = 5_000
STAGES = ("write", "stage1", "baseline", "random", "random_item", "random_loader", "random_uniform", "stage2")
WORDS = ("the", "a", "voice", "speaks", "slowly", "river", "morning", "light", "quiet", "city", "window", "green",
         "story", "number", "people", "under", "between", "often", "never", "always", "found", "small", "house")


# ---- the store -----------------------------------------------------------------------------------------------------
def write_store(url: str, n_rows: int, n_unique: int, hidden: int, seed: int = 0, captions: int = 1) -> None:
    """A finished store of ``n_rows`` OK clips and ``n_unique`` instructions (module doc); with ``captions`` K > 1,
    each clip's row is followed by K − 1 caption rows of it (n_rows × K lines)."""
    import pandas as pd

    from cache import schema
    from cache.writer import CacheWriter, ClipBatch
    from tts_core.identity import ModelIdentity

    rng = np.random.default_rng(seed)
    models = {r: ModelIdentity(f"synthetic {r} (bench)", f"{i + 1:064x}") for i, r in enumerate(schema.MODEL_ROLES)}
    n_clips, n_rows = n_rows, n_rows * captions
    w = CacheWriter.open_for_build(url, n_rows=n_rows, n_instructions=n_unique, lines_digest=f"bench/{n_rows}/{n_unique}",
                                   prefix_digest=None, models=models, normalisation=schema.Normalisation(),
                                   text_hidden_size=hidden)
    lens = np.clip(np.rint(rng.normal(24, 6, n_unique)), 8, 64).astype(np.int64)
    pool = (0.25 * rng.standard_normal((16384, hidden), dtype=np.float32)).astype(np.float16)  # fast "random" rows
    for a in range(0, n_unique, 1024):
        ln = lens[a:a + 1024]
        flat = pool[rng.integers(0, len(pool), int(ln.sum()))]
        w.append_instruction_states(a, np.split(flat, np.cumsum(ln)[:-1]))
    # instruction ids in first-appearance order (as build-cache assigns them); the rest drawn uniformly
    iid = np.concatenate([np.arange(n_unique), rng.integers(0, n_unique, n_rows - n_unique)]).astype(np.int32)
    texts = [f"voice {i}: " + " ".join(rng.choice(WORDS, 8)) for i in range(n_unique)]
    B = schema.CLIP_CHUNK
    for a in range(0, n_rows, B):
        n = min(B, n_rows - a)
        dur = rng.uniform(2, 14, n).astype(np.float32)
        toks = [rng.integers(0, 6561, int(25 * d)).astype(np.int16) for d in dur]
        ids = iid[a:a + n]
        rows = np.arange(a, a + n)
        clip = rows // captions  # the clip of each line; its first line (row clip × K) holds the audio
        own = rows % captions == 0
        status = np.where(own, schema.STATUS_OK, schema.STATUS_CAPTION).astype(np.int8)
        dur, toks = np.where(own, dur, 0).astype(np.float32), [t if o else t[:0] for t, o in zip(toks, own)]
        man = pd.DataFrame({
            "row": rows, "clip_id": [f"clip{i:07d}" for i in clip],
            "audio_path": [f"wavs/clip{i:07d}.wav" for i in clip],
            "transcript": [" ".join(rng.choice(WORDS, max(1, int(d * 15 / 6)))) for d in dur],
            "instruction": [texts[int(k)] for k in ids], "speaker": [f"spk{i // 50}" for i in clip],
            "instruction_id": ids, "status": [schema.STATUS_NAMES[int(x)] for x in status], "reason": "",
            "detail": "", "duration": dur, "line": rows + 1})
        w.write_clip_batch(ClipBatch(a, rng.standard_normal((n, 256), dtype=np.float32) * own[:, None],
                                     14 * rng.standard_normal((n, 192), dtype=np.float32) * own[:, None], dur, ids,
                                     status, toks, man, clip_row=(clip * captions).astype(np.int32)))
    w.finalize()


# ---- one stage, in a child process ---------------------------------------------------------------------------------
class _Timed:
    """Wall and CPU seconds (all threads of this process) of a block."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c

    def row(self, rows: int, note: str = "", cpu: bool = True) -> dict:
        """rows/s over wall time, and over CPU time (what the code costs, whatever else loads the machine)."""
        return {"wall": self.wall, "rows_s": rows / self.wall, "cpu_rows_s": rows / self.cpu if cpu else None,
                "note": note}


def _stage(name: str, store: str, a: argparse.Namespace) -> dict:
    n = a.rows
    if name == "write":
        import cache.writer  # noqa: F401  (imports are not the write's time)
        import pandas  # noqa: F401

        with _Timed() as t:
            write_store(store, a.rows, a.n_unique, a.hidden, a.seed, a.captions_per_clip)
        size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
        return {"write": t.row(n, f"{size / 2 ** 30:.1f} GiB on disk")}
    if name == "stage1":
        from tts_core.mapper import MapperConfig
        from tts_core.stage1.from_store import load_stage1_data
        from tts_core.stage1.train import Stage1TrainConfig, train_stage1

        cfg = Stage1TrainConfig(out_dir=str(Path(a.workdir) / "stage1"), phase="1", batch_size=a.batch_size,
                                epochs=1, min_phase_steps=0, max_steps=a.steps, eval_every=a.steps, resume=False,
                                device=a.device, eval_n_steps=2)
        with _Timed() as load:
            data = load_stage1_data(store, states_in_memory_mb=cfg.states_in_memory_mb,
                                    states_cache_mb=cfg.states_cache_mb)
        with _Timed() as t:
            res = train_stage1(data, cfg, MapperConfig(hidden_dim=a.mapper_hidden, n_blocks=a.mapper_blocks, n_steps=2))
        h = res.history[-1]
        train = t.row(0, f"{a.steps} steps of {a.batch_size}: {h['train_seconds']:.1f} s; the rest is the NN baseline "
                         f"and an evaluation of {res.n_val} held-out rows", cpu=False)
        train["rows_s"] = h["rows_per_s"]  # the training steps' own rate
        return {"stage1_load": load.row(n, f"states {'streamed' if data.states.streamed else 'in memory'}"),
                "stage1": train}
    if name == "baseline":
        from tts_core.stage1.from_store import load_stage1_data
        from tts_core.stage1.train import Stage1TrainConfig, compute_baselines

        cfg = Stage1TrainConfig()
        data = load_stage1_data(store)
        tr, va = data.split(cfg.held_out_frac, cfg.split_salt)
        with _Timed() as t:
            b = compute_baselines(data, tr, va, max_queries=cfg.nn_max_queries, max_keys=cfg.nn_max_keys)
        return {"baseline": t.row(len(va), f"{b['nn_queries']} held-out × {b['nn_keys']} train instructions"
                                           f"{' (sampled)' if b['nn_sampled'] else ''}; rows = held-out clips")}
    if name.startswith("random"):
        import torch

        from cache.reader import CacheDataset, CacheReader, ChunkAwareSampler

        ds = CacheDataset(CacheReader(store))
        if name == "random_uniform":  # one item at a time
            order = np.random.default_rng(0).permutation(len(ds))[:a.uniform_items]
        else:  # the loader's workers each read their own windows
            workers = dict(num_workers=2, batch_size=256) if name == "random_loader" else {}
            order = np.asarray(list(ChunkAwareSampler(ds, seed=0, **workers)))[:a.random_items]
        with _Timed() as t:
            if name == "random_loader":
                loader = torch.utils.data.DataLoader(ds, batch_size=256, sampler=order.tolist(), num_workers=2,
                                                     collate_fn=CacheDataset.collate)
                count = sum(len(b["clip_id"]) for b in loader)
            elif name == "random":  # what a DataLoader without workers does: batches of 256 from the sampler
                for i in range(0, len(order), 256):
                    CacheDataset.collate([ds[int(j)] for j in order[i:i + 256]])
                count = len(order)
            else:
                for i in order:
                    ds[int(i)]
                count = len(order)
        return {name: t.row(count, f"{count} items", cpu=name != "random_loader")}
    if name == "stage2":
        from cache.reader import CacheReader
        from tts_core.mapper import InstructionEncoder, InstructionMapper, MapperConfig
        from tts_core.stage2.prepare import prepare_stage2_data
        from tts_core.stage2.text_tokenizer import ByteTextTokenizer

        reader = CacheReader(store)
        H = reader.text_hidden_size
        enc = InstructionEncoder(H).eval()
        mapper = InstructionMapper(MapperConfig(cond_dim=H, hidden_dim=a.mapper_hidden, n_blocks=a.mapper_blocks)).eval()
        with _Timed() as t:
            data = prepare_stage2_data(reader, ByteTextTokenizer(), enc, mapper, n_steps=2)
        return {"stage2": t.row(len(data), f"{len(data)} rows kept")}
    raise ValueError(name)


def _child(a: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    out = _stage(a.child, a.store, a)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB → GiB
    for k in out:
        out[k].update(rss=rss, load=max(load, os.getloadavg()[0]))
    print("RESULT " + json.dumps(out), flush=True)


# ---- the driver ------------------------------------------------------------------------------------------------------
ROWS = (("write", "write store"), ("stage1_load", "stage 1: load"), ("stage1", "stage 1: train (whole process)"),
        ("baseline", "NN baseline"), ("random", "random access, chunk-aware, batches of 256"),
        ("random_item", "random access, chunk-aware, item by item"),
        ("random_loader", "random access, chunk-aware, DataLoader 2 workers × batches of 256"),
        ("random_uniform", "random access, uniform order"), ("stage2", "stage 2: prepare"))


def _run_child(stage: str, store: str, a: argparse.Namespace, n: int) -> dict:
    args = [sys.executable, "-m", "bench.scale", "--child", stage, "--store", store, "--rows", str(n),
            "--n-unique", str(max(1, int(round(n * a.captions_per_clip * a.unique_frac)))),
            "--captions-per-clip", str(a.captions_per_clip), "--hidden", str(a.hidden), "--seed", str(a.seed),
            "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--device", a.device, "--workdir", str(a.workdir),
            "--mapper-hidden", str(a.mapper_hidden), "--mapper-blocks", str(a.mapper_blocks),
            "--random-items", str(a.random_items), "--uniform-items", str(a.uniform_items)]
    p = subprocess.run(args, capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        print(f"  {stage} failed (exit {p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr)
        return {}
    return json.loads(lines[-1][len("RESULT "):])


def _table(results: dict[int, dict], a: argparse.Namespace) -> str:
    sizes = list(results)
    head = "| stage | " + " | ".join(f"{n // 1000}k: wall s | rows/s | rows/CPU-s | peak RSS GiB" for n in sizes) \
        + " | notes (largest) |"
    lines = [head, "|---|" + "---|---|---|---|" * len(sizes) + "---|"]
    for key, label in ROWS:
        if not any(key in results[n] for n in sizes):
            continue
        cells = []
        for n in sizes:
            r = results[n].get(key)
            cpu = f"{r['cpu_rows_s']:,.0f}" if r and r.get("cpu_rows_s") else "—"
            cells.append(f"{r['wall']:.1f} | {r['rows_s']:,.0f} | {cpu} | {r['rss']:.2f}" if r else "— | — | — | —")
        note = results[sizes[-1]].get(key, {}).get("note", "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def _verdicts(results: dict[int, dict]) -> list[str]:
    out = []
    for n, r in results.items():
        for key in ("stage1", "stage2"):
            if key in r:
                ok = r[key]["rss"] <= RSS_TARGET_GB
                out.append(f"{n // 1000}k {key} peak RSS {r[key]['rss']:.2f} GiB ≤ {RSS_TARGET_GB} GiB: "
                           f"{'PASS' if ok else 'FAIL'}")
        for key in ("random", "random_item", "random_loader"):
            if key in r:
                x = r[key]
                cpu = f"; {x['cpu_rows_s']:,.0f} rows per CPU-second" if x.get("cpu_rows_s") else ""
                out.append(f"{n // 1000}k {key} {x['rows_s']:,.0f} rows/s ≥ {RANDOM_TARGET:,}: "
                           f"{'PASS' if x['rows_s'] >= RANDOM_TARGET else 'FAIL'} (load average {x.get('load', 0):.1f} "
                           f"on {os.cpu_count()} cores{cpu})")
    return out


@dataclass
class ScaleConfig:
    """The driver's settings (``--help`` says what each is); `bench.gpu` runs the stage-1 rows on the device."""
    sizes: tuple[int, ...] = (10_000, 100_000)
    unique_frac: float = 1.0
    hidden: int = 1024
    stages: tuple[str, ...] = STAGES
    steps: int = 30
    batch_size: int = 512
    mapper_hidden: int = 256
    mapper_blocks: int = 2
    random_items: int = 50_000
    uniform_items: int = 500
    device: str = "cpu"
    workdir: Path | None = None
    keep: bool = False
    seed: int = 0
    captions_per_clip: int = 1


def run_scale(c: ScaleConfig, log=print) -> dict[int, dict]:
    """Every stage of every size, each in its own process; → {rows: {row key: result}} (also results.json)."""
    import torch

    a = argparse.Namespace(**{**asdict(c), "workdir": Path(c.workdir or tempfile.mkdtemp(prefix="bench-scale-"))})
    log(f"device {a.device}; torch threads {torch.get_num_threads()}; H={a.hidden}; unique instructions = "
        f"{a.unique_frac:g} × rows; stages {list(a.stages)}; stores under {a.workdir}")
    saved = Path(a.workdir) / "results.json"  # earlier runs in this workdir join the table (e.g. --keep, then more stages)
    results = {int(k): v for k, v in json.loads(saved.read_text()).items()} if saved.exists() else {}
    for n in a.sizes:
        store = str(Path(a.workdir) / f"scale-{n}.zarr")
        results.setdefault(n, {})
        for stage in a.stages:
            if stage != "write" and not Path(store).exists():
                print(f"  {n}: no store at {store} (run the write stage)", file=sys.stderr)
                break
            t = time.perf_counter()
            got = _run_child(stage, store, a, n)
            results[n].update(got)
            log(f"  {n:>7} rows  {stage:15s} {time.perf_counter() - t:7.1f} s  "
                + "  ".join(f"{k}: {v['rows_s']:,.0f} rows/s, {v['rss']:.2f} GiB, load {v['load']:.1f}"
                            for k, v in got.items()))
        saved.write_text(json.dumps(results, indent=1))
        if not a.keep:
            shutil.rmtree(store, ignore_errors=True)
    return dict(sorted(results.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="store rows, comma-separated")
    ap.add_argument("--unique-frac", type=float, default=1.0, help="unique instructions / rows")
    ap.add_argument("--hidden", type=int, default=1024, help="text-encoder width (flan-t5-large: 1024)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--steps", type=int, default=30, help="stage-1 training steps")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--mapper-hidden", type=int, default=256)
    ap.add_argument("--mapper-blocks", type=int, default=2)
    ap.add_argument("--random-items", type=int, default=50_000)
    ap.add_argument("--uniform-items", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=None, help="where stores are written (default: a /tmp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--captions-per-clip", type=int, default=1, help="metadata lines (captions) per clip (module doc)")
    ap.add_argument("--encode-clips-s", type=float, default=16.5,
                    help="build-cache clips/s, for the saving of one encoding per clip (docs/benchmarks.md)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n-unique", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(a)
    c = ScaleConfig(sizes=tuple(int(s) for s in a.sizes.split(",")), unique_frac=a.unique_frac, hidden=a.hidden,
                    stages=tuple(s for s in a.stages.split(",") if s), steps=a.steps, batch_size=a.batch_size,
                    mapper_hidden=a.mapper_hidden, mapper_blocks=a.mapper_blocks, random_items=a.random_items,
                    uniform_items=a.uniform_items, device=a.device, workdir=a.workdir, keep=a.keep, seed=a.seed,
                    captions_per_clip=a.captions_per_clip)
    results = run_scale(c, log=lambda m: print(m, flush=True))
    print()
    print(_table(results, a))
    print()
    print("\n".join(_verdicts(results)))
    if a.captions_per_clip > 1:
        print("\n".join(caption_saving(list(c.sizes), a.captions_per_clip, a.encode_clips_s)))


def caption_saving(sizes: list[int], k: int, clips_s: float) -> list[str]:
    """What encoding each clip once saves against one metadata line (and one encoding) per (clip, caption) pair."""
    out = []
    for n in sizes:
        per_pair, per_clip = n * k / clips_s, n / clips_s
        out.append(f"{n // 1000}k clips × {k} captions: build-cache encodes {n:,} clips, not {n * k:,} lines — "
                   f"{per_clip / 3600:.1f} h instead of {per_pair / 3600:.1f} h of model work at {clips_s:g} clips/s "
                   f"(saves {per_pair - per_clip:,.0f} s, {1 - 1 / k:.0%})")
    return out


if __name__ == "__main__":
    main()
