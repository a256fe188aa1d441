"""`instruct-tts demo`: the whole pipeline on the embedded default, from nothing.

Generates the espeak-ng demo corpus, builds its cache with the embedded frozen models, and prints
where everything is. Every step is idempotent, so running it twice does no work the second time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class DemoConfig:
    out: Path = Path("demo")
    n_clips: int = 300
    seed: int = 0
    device: str = "cpu"
    use_prefect: bool = True


def run_demo(cfg: DemoConfig) -> int:
    from tts_core.corpus.demo import DemoCorpusConfig, generate_demo_corpus

    print(f"[1/2] demo corpus: {cfg.n_clips} clips -> {cfg.out / 'corpus'}")
    corpus = generate_demo_corpus(DemoCorpusConfig(out_dir=cfg.out / "corpus", n_clips=cfg.n_clips, seed=cfg.seed))
    store = str(cfg.out / "cache" / "demo.zarr")
    print(f"[2/2] build-cache -> {store}")
    args = dict(metadata=str(corpus.metadata), audio_root=str(corpus.root), store=store, device=cfg.device)
    if cfg.use_prefect:
        from flows.build_cache import build_cache_flow

        build_cache_flow(**args)
    else:
        from cache.build import BuildConfig, build_cache
        from tts_core.frozen import FrozenModelsConfig

        summary = build_cache(BuildConfig(metadata=Path(args["metadata"]), audio_root=Path(args["audio_root"]),
                                          store=store, models=FrozenModelsConfig(device=cfg.device)))
        for line in summary.lines():
            print(line)
    from cache.reader import CacheReader
    from cache import norms
    import json

    report = json.loads(Path(store, "norm_report.json").read_text())
    r = CacheReader(store)
    print("\n== demo done ==")
    print(f"store:        {store}  ({len(r)} OK clips, {r.n_instructions} unique instructions)")
    print(f"norm report:  {store}/norm_report.md  (.json, .png)")
    for v in ("spk", "xvec"):
        s = report[v]
        print(f"  {s['name']:8s} mean norm {s['mean']:.3f} ± {s['std']:.3f}: {s['verdict']}")
    print(f"  verdict: {report['verdict']} — {report['recommendation']}")
    return 0
