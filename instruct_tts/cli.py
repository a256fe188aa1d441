"""`instruct-tts`: one command per stage. Each subcommand parses flags into the stage's config
dataclass and calls the stage's Prefect flow (or, with --no-prefect or when no Prefect API can be had, the same
function directly: instruct_tts/orchestration.py)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frozen models (local paths; omit all for the embedded default)")
    g.add_argument("--chatterbox-dir", type=Path,
                   help="dir with Chatterbox ve.safetensors / ve.pt and s3gen.safetensors / s3gen.pt")
    g.add_argument("--text-encoder", type=Path, help="local flan-t5-large (or other HF encoder) directory")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _cmd_build_cache(a: argparse.Namespace) -> int:
    kwargs = dict(metadata=str(a.metadata), audio_root=str(a.audio_root), store=a.store,
                  chatterbox_dir=str(a.chatterbox_dir) if a.chatterbox_dir else None,
                  text_encoder=str(a.text_encoder) if a.text_encoder else None, device=a.device,
                  normalise_spk=not a.raw_spk, normalise_xvec=not a.raw_xvec, loader_threads=a.loader_threads,
                  chunk_rows=a.chunk_rows, task_runner=a.task_runner, cluster=a.cluster, workers=a.workers,
                  speech_tokenizer=a.speech_tokenizer, allow_outside_root=a.allow_outside_root)
    if a.no_prefect and a.task_runner != "local":
        print("instruct-tts: error: --task-runner dask runs through Prefect (prefect-dask); drop --no-prefect",
              file=sys.stderr)
        return 2
    if not a.use_prefect:  # dask needs Prefect: without an API this process encodes (the same store)
        from tts_core.audio import AudioPolicy
        from tts_core.cachebuild.build import BuildConfig, build_cache
        from cache.schema import Normalisation
        from tts_core.frozen import FrozenModelsConfig

        cfg = BuildConfig(metadata=a.metadata, audio_root=a.audio_root, store=a.store,
                          models=FrozenModelsConfig(chatterbox_dir=a.chatterbox_dir, text_encoder=a.text_encoder,
                                                    device=a.device, speech_tokenizer=a.speech_tokenizer),
                          normalisation=Normalisation(not a.raw_spk, not a.raw_xvec), loader_threads=a.loader_threads,
                          chunk_rows=a.chunk_rows, audio=AudioPolicy(allow_outside_root=a.allow_outside_root))
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
    from cache.norms import publish_norm_report

    report, paths = publish_norm_report(a.store, a.max_rows)
    print(norms.to_markdown(report, f"Norm statistics — {a.store}"))
    for p in paths.values():
        print(f"saved: {p}")
    return 0


def _stage1_overrides(a: argparse.Namespace) -> tuple[dict, dict]:
    train = {k: v for k, v in dict(
        epochs=a.epochs, batch_size=a.batch_size, lr_phase1=a.lr, lr_phase2=a.lr_phase2, patience=a.patience,
        eval_every=a.eval_every, max_steps=a.max_steps, device=a.device, held_out_frac=a.held_out_frac,
        init_from=str(a.init_from) if a.init_from else None, seed=a.seed, resume=not a.restart, split_by=a.split_by,
        amp_dtype=a.amp, states_in_memory_mb=a.states_in_memory_mb, states_cache_mb=a.states_cache_mb).items()
        if v is not None}
    mapper = {k: v for k, v in dict(hidden_dim=a.hidden_dim, n_blocks=a.n_blocks, temperature=a.temperature,
                                    n_steps=a.n_steps, draws=a.draws).items() if v is not None}
    return train, mapper


def _cmd_train_stage1(a: argparse.Namespace) -> int:
    train, mapper = _stage1_overrides(a)
    if not a.use_prefect:
        from tts_core.mapper.flow import MapperConfig
        from tts_core.stage1.from_store import train_stage1_from_store
        from tts_core.stage1.train import Stage1TrainConfig

        cfg = Stage1TrainConfig(**{**train, "out_dir": str(a.out), "phase": a.phase, "progress": sys.stderr.isatty()})
        train_stage1_from_store(a.store, cfg, MapperConfig.from_dict(mapper), on_epoch=_print_stage1_row)
    else:
        from flows.train_stage1 import train_stage1_flow

        train_stage1_flow(store=a.store, out=str(a.out), phase=a.phase, train=train, mapper=mapper)
    print(Path(a.out, "report.md").read_text())
    return 0


def _print_stage1_row(r: dict) -> None:
    print(f"  phase {r['phase']} epoch {r['epoch']:.2f} step {r['step']}: SpkCos {r['spk_cos']:.4f} "
          f"XVecCos {r['xvec_cos']:.4f} AvgCos {r['avg_cos']:.4f}{' *' if r['improved'] else ''} "
          f"(mean {r['mean_avg_cos']:.4f}, NN {r['nn_avg_cos']:.4f})", file=sys.stderr, flush=True)


def _cmd_train_stage2(a: argparse.Namespace) -> int:
    train = {k: v for k, v in dict(
        instruction_prob=a.instruction_prob, prompt_instruction_prob=a.prompt_instruction_prob,
        instruction_dropout=a.instruction_dropout, batch_size=a.batch_size, max_tokens=a.max_tokens,
        grad_accum=a.grad_accum, lr=a.lr,
        adapter_lr=a.adapter_lr, epochs=a.epochs, max_steps=a.max_steps, warmup_steps=a.warmup_steps,
        device=a.device, amp_dtype=a.amp, compile=a.compile or None,
        activation_checkpointing=a.activation_checkpointing or None, save_every=a.save_every,
        log_every=a.log_every, text_tokenizer=a.text_tokenizer, seed=a.seed, language=a.language,
        hold_out=a.hold_out, eval_every=a.eval_every, resume=False if a.restart else None).items() if v is not None}
    if not a.use_prefect:  # also under torchrun: a flow run is one process; ranks run the library directly
        from tts_core.stage2.train import Stage2Config, train_stage2
        from tts_core.training.tb import logged

        cfg = Stage2Config.from_dict({**train, "store": a.store, "mapper_dir": str(a.mapper), "t3": a.t3,
                                      "out_dir": str(a.out), "progress": sys.stderr.isatty()})
        with logged(a.out / "tb", "stage2", _print_stage2_row) as hook:
            res = train_stage2(cfg, on_log=hook)
        if res.checkpoint is None:  # not rank 0
            return 0
    else:
        from flows.train_stage2 import train_stage2_flow

        train_stage2_flow(store=a.store, mapper=str(a.mapper), t3=a.t3, out=str(a.out), train=train)
    print(Path(a.out, "report.md").read_text())
    return 0


def _print_stage2_row(r: dict) -> None:
    held = (f"; held-out speech {r['val_speech_loss']:.4f}, text {r['val_text_loss']:.4f}"
            if "val_speech_loss" in r else "")
    print(f"  step {r['step']}/{r.get('total_steps')}: loss {r['loss']:.4f} (text {r['loss_text']:.4f}, speech "
          f"{r['loss_speech']:.4f}) {r['tokens_per_s']:.0f} tok/s{held}", file=sys.stderr, flush=True)


def _cmd_synthesize(a: argparse.Namespace) -> int:
    import numpy as np

    from tts_core.synthesis import SamplingConfig, Synthesizer

    if a.instruction is None and a.reference is None:
        print("instruct-tts: error: give --instruction, --reference, or both", file=sys.stderr)
        return 2
    ref = None
    if a.reference is not None:
        from tts_core.reference import Reference

        ref = Reference.load(a.reference)  # Chatterbox's loading: 24 kHz, resampled to 16 kHz
    synth = Synthesizer.from_run(a.run, device=a.device, text_encoder=a.text_encoder, chatterbox_dir=a.chatterbox_dir)
    sampling = SamplingConfig(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                              repetition_penalty=a.repetition_penalty, cfg_weight=a.cfg_weight,
                              max_new_tokens=a.max_new_tokens, instruction_guidance=a.instruction_guidance)
    res = synth.synthesize(a.text, instruction=a.instruction, reference=ref, seed=a.seed, sampling=sampling,
                           language=a.language, mapper_draws=a.mapper_draws)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(a.out.with_suffix(".tokens.npy"), res.tokens)
    if res.wav is not None:
        import soundfile as sf

        sf.write(str(a.out), res.wav, res.sample_rate)
        print(f"{a.out}: {len(res.wav) / res.sample_rate:.2f} s, {len(res.tokens)} speech tokens")
    else:
        print(f"{a.out.with_suffix('.tokens.npy')}: {len(res.tokens)} speech tokens (no wav: S3 tokens need "
              "--chatterbox-dir and the `vocoder` extra)")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from tts_core.evaluation.run import EvalConfig, evaluate_run, to_markdown

    cfg = EvalConfig(run_dir=str(a.run), store=a.store, out_dir=str(a.out) if a.out else None,
                     n_instructions=a.n, seed=a.seed, device=a.device, max_new_tokens=a.max_new_tokens,
                     text_encoder=str(a.text_encoder) if a.text_encoder else None,
                     chatterbox_dir=str(a.chatterbox_dir) if a.chatterbox_dir else None, language=a.language,
                     repetition_penalty=a.repetition_penalty, instruction_guidance=a.instruction_guidance)
    if not a.use_prefect:
        summary = evaluate_run(cfg, on_item=lambda k, n, r: print(f"  {k}/{n} {r['instruction']}", file=sys.stderr))
    else:
        from flows.evaluate import evaluate_flow

        summary = evaluate_flow(**vars(cfg))
    print(to_markdown(summary))
    print(f"wavs, eval.json, eval.png: {summary['out_dir']}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from instruct_tts.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(out=a.out, n_clips=a.n_clips, seed=a.seed, device=a.device,
                               use_prefect=a.use_prefect))


def _cmd_lab(a: argparse.Namespace) -> int:
    from instruct_tts.lab import LabConfig, run_lab

    overrides = {k: getattr(a, k) for k in ("n_clips", "seed", "device", "speech_tokenizer", "stage1_steps",
                                            "stage2_steps", "eval_clips", "t3", "text_encoder", "repetition_penalty",
                                            "instruction_guidance", "repetition_sweep", "guidance_sweep",
                                            "sweep_clips", "instruction_dropout", "prompt_instruction_prob", "mapper_draws",
                                            "captions_per_clip", "compare_to")}
    if a.use_prefect:
        from flows.lab import lab_flow

        report = lab_flow(out=str(a.out), preset=a.preset, overrides={k: v for k, v in overrides.items() if v is not None})
    else:
        report = run_lab(LabConfig.preset(a.preset, out=a.out, **overrides))
    print(Path(a.out, "report.md").read_text())
    return 0 if report else 1


def _cmd_serve(a: argparse.Namespace) -> int:
    from flows.serve import serve_all

    serve_all(start_server=not a.no_server)
    return 0


def _floats(text: str) -> tuple[float, ...]:
    """'1.0,1.1,1.2' → (1.0, 1.1, 1.2)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from tts_core.encoders.embedded import DEFAULT_KIND, KINDS
    from tts_core.languages import MTL_LANGUAGES
    from tts_core.sampling_defaults import INSTRUCTION_GUIDANCE, family_defaults_help

    guidance_default = (f"default {INSTRUCTION_GUIDANCE:g} for a run whose stage 2 trained the null instruction "
                        "(--instruction-dropout > 0), else 0")
    p = argparse.ArgumentParser(prog="instruct-tts", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="generate the embedded corpus and run the pipeline on it")
    d.add_argument("--out", type=Path, default=Path("demo"))
    d.add_argument("--n-clips", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect")
    d.set_defaults(func=_cmd_demo)

    lab = sub.add_parser("lab", help="the instruction-following lab: bigger corpus, held-out splits, report")
    lab.add_argument("--out", type=Path, default=Path("lab"))
    lab.add_argument("--preset", default="default", choices=("default", "medium", "tiny"), help="default (issue #10's run, <= 60 min on 2 cores), "
                                                        "medium (~10 min check), tiny (CI)")
    lab.add_argument("--n-clips", type=int, help="lab corpus size (preset's otherwise)")
    lab.add_argument("--stage1-steps", type=int)
    lab.add_argument("--stage2-steps", type=int)
    lab.add_argument("--text-encoder", help="local HF encoder directory for instructions (e.g. flan-t5-large); "
                                            "default: the embedded MiniLM")
    lab.add_argument("--t3", choices=("tiny", "small"), help="T3 preset trained in stage 2 (preset's otherwise: small)")
    lab.add_argument("--eval-clips", type=int, help="held-out clips synthesized per split")
    lab.add_argument("--mapper-draws", type=int, help="mapper draws averaged per voice vector for stage 2 and "
                     "synthesis (preset's otherwise; the report's stage-1 sampling curve measures the choice)")
    lab.add_argument("--captions-per-clip", type=int, help="training-wording captions per training clip (default 3; "
                     "1 = one per clip, the run to compare against)")
    lab.add_argument("--compare-to", help="another lab run's --out: the report shows its held-out-instruction "
                     "results beside this run's (e.g. the --captions-per-clip 1 run: same clips, same steps)")
    lab.add_argument("--speech-tokenizer", choices=("mel-vq", "world-vq"), help="embedded tokenizer + vocoder (default world-vq: its tokens keep F0)")
    lab.add_argument("--repetition-penalty", type=float,
                     help="sampling of the model renderings (default: the family's official 1.2)")
    lab.add_argument("--instruction-guidance", type=float, metavar="W",
                     help=f"instruction guidance of the model renderings ({guidance_default}; 0 = unguided)")
    lab.add_argument("--repetition-sweep", type=_floats, metavar="P,P,...",
                     help="also render the model at each repetition penalty (default 1.0,1.1,1.2; '' = none; report: "
                          "accuracy vs repetition penalty)")
    lab.add_argument("--guidance-sweep", type=_floats, metavar="W,W,...",
                     help="also render the model at each instruction guidance W (default 0,1.5,3; '' = none; report: "
                          "accuracy vs W)")
    lab.add_argument("--sweep-clips", type=int, help="held-out clips per split in each sweep (default 40)")
    lab.add_argument("--instruction-dropout", type=float, help="stage 2: share of instruction rows given the null "
                                                               "instruction (default: Stage2Config's)")
    lab.add_argument("--prompt-instruction-prob", type=float,
                     help="stage 2: share of prompt + instruction rows (default 0.2)")
    lab.add_argument("--seed", type=int)
    lab.add_argument("--device")
    lab.add_argument("--no-prefect", action="store_true", help="run without Prefect (no artifacts)")
    lab.set_defaults(func=_cmd_lab, ctrl_c_saves=True)

    b = sub.add_parser("build-cache", help="validate clips, run frozen models once, write a Zarr cache")
    b.add_argument("--metadata", type=Path, required=True,
                   help="audio_path|transcript|instruction[|speaker[|language]] per line")
    b.add_argument("--audio-root", type=Path, required=True, help="directory the audio paths are relative to")
    b.add_argument("--store", required=True, help="output store: a path (cache/NAME.zarr) or any fsspec URL")
    _add_model_flags(b)
    b.add_argument("--raw-spk", action="store_true", help="reader does not L2-normalise speaker embeddings")
    b.add_argument("--raw-xvec", action="store_true", help="reader does not L2-normalise x-vectors")
    b.add_argument("--loader-threads", type=_positive_int, default=4)
    b.add_argument("--chunk-rows", type=_positive_int, default=256, help="rows per Zarr chunk and per batch (new stores)")
    b.add_argument("--allow-outside-root", action="store_true",
                   help="read relative audio paths whose '..' leaves --audio-root (refused by default)")
    b.add_argument("--speech-tokenizer", choices=KINDS, default=DEFAULT_KIND,
                   help="embedded tokenizer + decoder fitted on the corpus when no --chatterbox-dir is given: "
                        "mel-vq (log-mel k-means, Griffin-Lim) or world-vq (WORLD envelope codes x log-F0 levels, "
                        "keeps pitch; docs/benchmarks.md 'Vocoder ceiling')")
    b.add_argument("--task-runner", choices=("local", "dask"), default="local",
                   help="where clip shards are encoded: this process, or Dask workers (prefect-dask)")
    b.add_argument("--cluster", help="Dask scheduler address, e.g. tcp://scheduler:8786 (default: a local cluster)")
    b.add_argument("--workers", type=int, default=2, help="worker processes of the local Dask cluster")
    b.add_argument("--no-prefect", action="store_true", help="run without Prefect (no artifacts)")
    b.set_defaults(func=_cmd_build_cache)

    t1 = sub.add_parser("train-stage1", help="train the instruction mapper (pooling + flow matching) on a cache")
    t1.add_argument("--store", required=True, help="cache store written by build-cache")
    t1.add_argument("--out", type=Path, required=True, help="run directory (resumed when it holds the same run)")
    t1.add_argument("--phase", choices=("1", "2", "both"), default="both")
    t1.add_argument("--init-from", type=Path, help="--phase 2 alone: the stage-1 run to start from")
    t1.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    t1.add_argument("--amp", choices=("auto", "bf16", "fp32"), help="mapper autocast (pooling is always fp32)")
    g = t1.add_argument_group("training (defaults: tts_core.stage1.Stage1TrainConfig)")
    g.add_argument("--epochs", type=int, help="max epochs per phase")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="phase-1 learning rate")
    g.add_argument("--lr-phase2", type=float)
    g.add_argument("--patience", type=int, help="evaluations without AvgCos improvement before a phase stops")
    g.add_argument("--eval-every", type=int, help="steps between held-out evaluations (0: every epoch, at least 100 steps)")
    g.add_argument("--max-steps", type=int, help="stop the whole run after this many steps")
    g.add_argument("--held-out-frac", type=float)
    g.add_argument("--split-by", choices=("instruction", "speaker"),
                   help="held-out unit: instruction texts (default) or speakers + their texts (needs a speaker column)")
    g.add_argument("--seed", type=int)
    g.add_argument("--restart", action="store_true", help="ignore out/last and start over")
    g.add_argument("--states-in-memory-mb", type=float,
                   help="instruction states up to this size (ragged) are held in memory / on the device (default 2048)")
    g.add_argument("--states-cache-mb", type=float,
                   help="bigger ones are streamed from the store through a chunk cache of this size (default 1024)")
    m = t1.add_argument_group("mapper (defaults: tts_core.mapper.MapperConfig)")
    m.add_argument("--hidden-dim", type=int)
    m.add_argument("--n-blocks", type=int)
    m.add_argument("--n-steps", type=int, help="Euler steps at inference")
    m.add_argument("--temperature", type=float, help="sampling temperature of the flow's start noise")
    m.add_argument("--draws", type=int, help="mapper draws averaged per vector that stage 2 and synthesis get "
                   "(1: one draw, most voice variety; recorded in mapper.json)")
    t1.add_argument("--no-prefect", action="store_true", help="run without Prefect (no artifacts)")
    t1.set_defaults(func=_cmd_train_stage1, ctrl_c_saves=True)

    t2 = sub.add_parser("train-stage2", help="train T3 + AdaRMSNorm adapters (torchrun for multi-GPU)")
    t2.add_argument("--store", required=True, help="cache store written by build-cache")
    t2.add_argument("--mapper", type=Path, required=True, help="stage-1 run directory (train-stage1 --out)")
    t2.add_argument("--t3", required=True,
                    help="Chatterbox checkpoint dir or T3 file (English t3_cfg.safetensors, multilingual "
                         "t3_mtl23ls_v2.safetensors, each with its tokenizer) or a preset: tiny, small, 520m")
    t2.add_argument("--out", type=Path, required=True, help="run directory (resumed when it holds the same run)")
    t2.add_argument("--device", help="cpu, cuda (default: cuda when available; under torchrun: cuda:LOCAL_RANK)")
    t2.add_argument("--amp", choices=("auto", "bf16", "fp32"))
    g = t2.add_argument_group("training (defaults: tts_core.stage2.Stage2Config)")
    g.add_argument("--instruction-prob", type=float, help="share of instruction-only rows (default 0.5)")
    g.add_argument("--prompt-instruction-prob", type=float,
                   help="share of rows with a reference prompt *and* the instruction ('this voice, but slower'); "
                        "the rest split by --instruction-prob (default 0.0)")
    g.add_argument("--instruction-dropout", type=float,
                   help="share of instruction rows given the null instruction, for --instruction-guidance at "
                        "synthesis (default 0.1)")
    g.add_argument("--batch-size", type=int, help="rows per batch per rank (the cap with --max-tokens)")
    g.add_argument("--max-tokens", type=int, help="token budget per batch (length bucketing)")
    g.add_argument("--grad-accum", type=int, help="batches per rank per step (N ranks x A = same run as 1 x N*A)")
    g.add_argument("--lr", type=float)
    g.add_argument("--adapter-lr", type=float)
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--save-every", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--hold-out", choices=("none", "mapper"),
                   help="mapper: leave out the stage-1 run's held-out clips and report their loss (default none)")
    g.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default log-every x 10)")
    g.add_argument("--text-tokenizer", help="'bytes' or a tokenizer file (default: the --t3 family's)")
    g.add_argument("--language", help=f"multilingual T3: language of rows without a 5th metadata column "
                                      f"({', '.join(sorted(MTL_LANGUAGES))})")
    g.add_argument("--seed", type=int)
    g.add_argument("--compile", action="store_true", help="torch.compile the Llama backbone")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute backbone layers in backward (HF checkpointing, adapters exact): less memory, "
                        "~1/3 more compute, same loss")
    g.add_argument("--restart", action="store_true", help="ignore checkpoints in --out and start over")
    t2.add_argument("--no-prefect", action="store_true", help="run without Prefect (always so under torchrun)")
    t2.set_defaults(func=_cmd_train_stage2, ctrl_c_saves=True)

    sy = sub.add_parser("synthesize", help="text + instruction (and/or a reference clip) -> wav")
    sy.add_argument("--run", type=Path, required=True, help="train-stage2 --out directory")
    sy.add_argument("--text", required=True)
    sy.add_argument("--instruction", help="plain-language voice description")
    sy.add_argument("--reference", type=Path, help="reference clip (Chatterbox-style audio conditioning)")
    sy.add_argument("--out", type=Path, required=True, help="output .wav (tokens beside it as .tokens.npy)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--device", default="cpu")
    sy.add_argument("--text-encoder", type=Path, help="local text-encoder dir the run was trained over")
    sy.add_argument("--chatterbox-dir", type=Path, help="dir with ve/s3gen weights (production runs)")
    sy.add_argument("--language", help="multilingual T3: the text's language (default: the run's --language)")
    sy.add_argument("--mapper-draws", type=int, help="instruction → voice: mapper draws averaged (default: the "
                    "stage-1 run's `draws`; 1 gives the most voice variety across --seed)")
    sp = sy.add_argument_group("sampling (default: each Chatterbox family's own `generate` values)")
    for option, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float),
                         ("repetition_penalty", float), ("cfg_weight", float)):
        sp.add_argument("--" + option.replace("_", "-"), type=kind, help=family_defaults_help(option))
    sp.add_argument("--max-new-tokens", type=int, default=1000)
    sp.add_argument("--instruction-guidance", type=float, metavar="W",
                    help="classifier-free guidance on the instruction: logits + W·(cond − null instruction), "
                         f"on top of --cfg-weight's text CFG ({guidance_default}; 0 = unguided)")
    sy.set_defaults(func=_cmd_synthesize)

    ev = sub.add_parser("evaluate", help="synthesize held-out instructions and measure what they asked for")
    ev.add_argument("--run", type=Path, required=True, help="train-stage2 --out directory")
    ev.add_argument("--store", required=True, help="the cache the run was trained on (held-out instructions)")
    ev.add_argument("--out", type=Path, help="default: RUN/eval")
    ev.add_argument("--n", type=int, default=24, help="held-out instructions to synthesize")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--max-new-tokens", type=int, default=400)
    ev.add_argument("--text-encoder", type=Path)
    ev.add_argument("--chatterbox-dir", type=Path)
    ev.add_argument("--language", default="en", help="multilingual T3: language of the evaluation text")
    ev.add_argument("--repetition-penalty", type=float, help=family_defaults_help("repetition_penalty"))
    ev.add_argument("--instruction-guidance", type=float, metavar="W",
                    help=f"classifier-free guidance on the instruction ({guidance_default}; 0 = unguided)")
    ev.add_argument("--no-prefect", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)

    r = sub.add_parser("report", help="print (and save beside the store) the norm-statistics report")
    r.add_argument("store")
    r.add_argument("--max-rows", type=int, default=200_000, help="seeded sample size for huge stores")
    r.set_defaults(func=_cmd_report)

    s = sub.add_parser("serve", help="serve the Prefect deployments (build-cache/-, ...)")
    s.add_argument("--no-server", action="store_true", help="use PREFECT_API_URL as it is; start no server")
    s.set_defaults(func=_cmd_serve)
    return p


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _ctrl_c_handling(a: argparse.Namespace):
    """Training: the first Ctrl-C stops at the next step boundary with a checkpoint (tts_core.interrupt).
    Not under torchrun, where every rank would have to stop at the same step."""
    if getattr(a, "ctrl_c_saves", False) and not _under_torchrun():
        from tts_core.interrupt import stop_after_step

        return stop_after_step()
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine here reaches a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network: telemetry only logs errors
    a = build_parser().parse_args(argv)
    try:
        if hasattr(a, "no_prefect"):  # a stage that runs through Prefect unless told not to, or unable to
            from instruct_tts.orchestration import use_prefect

            dask = getattr(a, "task_runner", "local") != "local"
            a.use_prefect = use_prefect(not a.no_prefect and not _under_torchrun(),
                                        also="; clip shards encoded in this process, not on Dask" if dask else "")
        with _ctrl_c_handling(a):
            return a.func(a)
    except KeyboardInterrupt as exc:
        from tts_core.interrupt import TrainingInterrupted

        print("instruct-tts: " + (str(exc) if isinstance(exc, TrainingInterrupted) else
                                  "interrupted; rerun the same command to continue from what was saved"),
              file=sys.stderr)
        return 130
    except Exception as exc:
        from cache.store import StoreError
        from tts_core.mapper.pooling import TextEncoderMismatchError
        from tts_core.metadata import MetadataError
        from tts_core.stage1.from_store import Stage1InputError
        from tts_core.checkpoint import ResumeMismatchError
        from tts_core.stage1.train import NonFiniteLossError
        from tts_core.stage2.text_tokenizer import TextTokenizerError
        from tts_core.stage2.train import Stage2NonFiniteError
        from tts_core.stage2.hold_out import HoldOutError
        from tts_core.audio import AudioRejected
        from tts_core.t3.families import T3FamilyError
        from tts_core.t3.loading import CheckpointMismatchError
        from tts_core.synthesis import SamplingOptionError

        if isinstance(exc, (StoreError, FileNotFoundError, MetadataError, Stage1InputError, TextEncoderMismatchError,
                            NonFiniteLossError, ResumeMismatchError, Stage2NonFiniteError, TextTokenizerError, AudioRejected,
                            T3FamilyError, CheckpointMismatchError, SamplingOptionError, HoldOutError)):
            print(f"instruct-tts: error: {exc}", file=sys.stderr)
            return 2
        raise
