"""`instruct-tts`: one command per stage. Each subcommand parses flags into the stage's config
dataclass and calls the stage's Prefect flow (or, with --no-prefect, the same function directly)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frozen models (local paths; omit all for the embedded default)")
    g.add_argument("--chatterbox-dir", type=Path, help="dir with Chatterbox ve.safetensors and s3gen.safetensors")
    g.add_argument("--text-encoder", type=Path, help="local flan-t5-large (or other HF encoder) directory")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _cmd_build_cache(a: argparse.Namespace) -> int:
    kwargs = dict(metadata=str(a.metadata), audio_root=str(a.audio_root), store=a.store,
                  chatterbox_dir=str(a.chatterbox_dir) if a.chatterbox_dir else None,
                  text_encoder=str(a.text_encoder) if a.text_encoder else None, device=a.device,
                  normalise_spk=not a.raw_spk, normalise_xvec=not a.raw_xvec, loader_threads=a.loader_threads,
                  chunk_rows=a.chunk_rows)
    if a.no_prefect:
        from cache.build import BuildConfig, build_cache
        from cache.schema import Normalisation
        from tts_core.frozen import FrozenModelsConfig

        cfg = BuildConfig(metadata=a.metadata, audio_root=a.audio_root, store=a.store,
                          models=FrozenModelsConfig(chatterbox_dir=a.chatterbox_dir, text_encoder=a.text_encoder,
                                                    device=a.device),
                          normalisation=Normalisation(not a.raw_spk, not a.raw_xvec), loader_threads=a.loader_threads,
                          chunk_rows=a.chunk_rows)
        for line in build_cache(cfg, _print_progress).lines():
            print(line)
        return 0
    from flows.build_cache import build_cache_flow

    build_cache_flow(**kwargs)
    return 0


def _print_progress(p) -> None:
    end = "\n" if p.done == p.total else "\r"
    print(f"  {p.phase}: {p.done}/{p.total}", end=end, file=sys.stderr, flush=True)


def _cmd_report(a: argparse.Namespace) -> int:
    from cache import norms
    from cache.build import publish_norm_report

    report, paths = publish_norm_report(a.store, a.max_rows)
    print(norms.to_markdown(report, f"Norm statistics — {a.store}"))
    for p in paths.values():
        print(f"saved: {p}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from instruct_tts.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(out=a.out, n_clips=a.n_clips, seed=a.seed, device=a.device,
                               use_prefect=not a.no_prefect))


def _cmd_serve(a: argparse.Namespace) -> int:
    from flows.serve import serve_all

    serve_all(start_server=not a.no_server)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instruct-tts", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="generate the embedded corpus and run the pipeline on it")
    d.add_argument("--out", type=Path, default=Path("demo"))
    d.add_argument("--n-clips", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("build-cache", help="validate clips, run frozen models once, write a Zarr cache")
    b.add_argument("--metadata", type=Path, required=True, help="audio_path|transcript|instruction[|speaker] per line")
    b.add_argument("--audio-root", type=Path, required=True, help="directory the audio paths are relative to")
    b.add_argument("--store", required=True, help="output store: a path (cache/NAME.zarr) or any fsspec URL")
    _add_model_flags(b)
    b.add_argument("--raw-spk", action="store_true", help="reader does not L2-normalise speaker embeddings")
    b.add_argument("--raw-xvec", action="store_true", help="reader does not L2-normalise x-vectors")
    b.add_argument("--loader-threads", type=int, default=4)
    b.add_argument("--chunk-rows", type=int, default=256, help="rows per Zarr chunk and per batch (new stores)")
    b.add_argument("--no-prefect", action="store_true", help="run without Prefect (no artifacts)")
    b.set_defaults(func=_cmd_build_cache)

    r = sub.add_parser("report", help="print (and save beside the store) the norm-statistics report")
    r.add_argument("store")
    r.add_argument("--max-rows", type=int, default=200_000, help="seeded sample size for huge stores")
    r.set_defaults(func=_cmd_report)

    s = sub.add_parser("serve", help="serve the Prefect deployments (build-cache/-, ...)")
    s.add_argument("--no-server", action="store_true", help="use PREFECT_API_URL as it is; start no server")
    s.set_defaults(func=_cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine here reaches a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from cache.store import StoreError
        from tts_core.metadata import MetadataError

        if isinstance(exc, (StoreError, FileNotFoundError, MetadataError)):
            print(f"instruct-tts: error: {exc}", file=sys.stderr)
            return 2
        raise
