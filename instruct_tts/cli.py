"""`instruct-tts`: one command per stage. Each stage command passes its options, by their flag names, to the
stage's Prefect flow — whose parameters are exactly those options — or, with --no-prefect or when no Prefect API
can be had (instruct_tts/orchestration.py), to the same conversion into the stage's config that the flow calls
(instruct_tts/options.py)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path


from instruct_tts.options import (DASK_LOCAL_WORKERS, LAB_DEFAULT_PRESET, TASK_RUNNERS, DefaultsHelpFormatter,
                                  SettingAction, add, command_options, config_default, lab_default, lab_defaults,
                                  lab_settings, show)

STAGE1 = "tts_core.stage1.train:Stage1TrainConfig."
MAPPER = "tts_core.mapper.flow:MapperConfig."
STAGE2 = "tts_core.stage2.config:Stage2Config."
ROW_MIX = "tts_core.stage2.row_mix:RowMix."  # Stage2Config.row_mix: its flat keys are the flags
EVAL = "tts_core.evaluation.run:EvalConfig."
FROZEN = "tts_core.frozen:FrozenModelsConfig."
BUILD = "tts_core.cachebuild.build:BuildConfig."
SYNTH = "tts_core.synthesis_batch:SynthesisRun."
SAMPLING = "tts_core.synthesis:SamplingConfig."
DEVICE_HELP = "cpu, cuda, cuda:1, ..."
AUTO_DEVICE_HELP = "cpu, cuda, cuda:1, ... or auto: cuda when available"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _cmd_build_cache(a: argparse.Namespace) -> int:
    o = command_options(a)
    if a.no_prefect and o["task_runner"] != "local":
        print("instruct-tts: error: --task-runner dask runs through Prefect (prefect-dask); drop --no-prefect",
              file=sys.stderr)
        return 2
    if not a.use_prefect:  # dask needs Prefect: without an API this process encodes (the same store)
        from instruct_tts.options import build_config
        from tts_core.cachebuild.build import build_cache

        for line in build_cache(build_config(o), _print_progress).lines():
            print(line)
        return 0
    from flows.build_cache import build_cache_flow

    build_cache_flow(**o)
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


def _cmd_train_stage1(a: argparse.Namespace) -> int:
    o = command_options(a)
    if not a.use_prefect:
        from instruct_tts.options import stage1_configs
        from tts_core.stage1.from_store import train_stage1_from_store

        cfg, mcfg = stage1_configs(o, progress=sys.stderr.isatty())
        train_stage1_from_store(o["store"], cfg, mcfg, on_epoch=_print_stage1_row)
    else:
        from flows.train_stage1 import train_stage1_flow

        train_stage1_flow(**o)
    print(Path(a.out, "report.md").read_text())
    return 0


def _print_stage1_row(r: dict) -> None:
    print(f"  phase {r['phase']} epoch {r['epoch']:.2f} step {r['step']}: SpkCos {r['spk_cos']:.4f} "
          f"XVecCos {r['xvec_cos']:.4f} AvgCos {r['avg_cos']:.4f}{' *' if r['improved'] else ''} "
          f"(mean {r['mean_avg_cos']:.4f}, NN {r['nn_avg_cos']:.4f})", file=sys.stderr, flush=True)


def _cmd_train_stage2(a: argparse.Namespace) -> int:
    o = command_options(a)
    if not a.use_prefect:  # also under torchrun: a flow run is one process; ranks run the library directly
        from instruct_tts.options import stage2_config
        from tts_core.stage2.train import train_stage2
        from tts_core.training.tb import logged

        cfg = stage2_config(o, progress=sys.stderr.isatty())
        with logged(a.out / "tb", "stage2", _print_stage2_row) as hook:
            res = train_stage2(cfg, on_log=hook)
        if res.checkpoint is None:  # not rank 0
            return 0
    else:
        from flows.train_stage2 import train_stage2_flow

        train_stage2_flow(**o)
    print(Path(a.out, "report.md").read_text())
    return 0


def _print_stage2_row(r: dict) -> None:
    held = (f"; held-out speech {r['val_speech_loss']:.4f}, text {r['val_text_loss']:.4f}"
            if "val_speech_loss" in r else "")
    print(f"  step {r['step']}/{r.get('total_steps')}: loss {r['loss']:.4f} (text {r['loss_text']:.4f}, speech "
          f"{r['loss_speech']:.4f}) {r['tokens_per_s']:.0f} tok/s{held}", file=sys.stderr, flush=True)


def _cmd_synthesize(a: argparse.Namespace) -> int:
    """No Prefect here: the `synthesize/-` deployment runs the same `synthesize_command` with the same options."""
    from tts_core.synthesis_batch import synthesize_command

    for r in synthesize_command(**command_options(a)):
        if r["wav"]:
            print(f"{r['wav']}: {r['seconds']:.2f} s, {r['tokens']} speech tokens")
        else:
            print(f"{r['tokens_file']}: {r['tokens']} speech tokens (no wav: S3 tokens need --chatterbox-dir and the "
                  "`vocoder` extra)")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from tts_core.evaluation.run import evaluate_run, to_markdown

    o = command_options(a)
    if not a.use_prefect:
        from instruct_tts.options import eval_config

        summary = evaluate_run(eval_config(o),
                               on_item=lambda k, n, r: print(f"  {k}/{n} {r['instruction']}", file=sys.stderr))
    else:
        from flows.evaluate import evaluate_flow

        summary = evaluate_flow(**o)
    print(to_markdown(summary))
    print(f"wavs, eval.json, eval.png: {summary['out_dir']}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from instruct_tts.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(out=a.out, n_clips=a.n_clips, seed=a.seed, device=a.device,
                               use_prefect=a.use_prefect))


def _cmd_lab(a: argparse.Namespace) -> int:
    from instruct_tts.lab import run_lab
    from instruct_tts.options import lab_config

    o = command_options(a)
    cfg = lab_config(o)
    if a.use_prefect:
        from flows.lab import lab_flow

        report = lab_flow(**o)
    else:
        report = run_lab(cfg)
    print(Path(cfg.out, "report.md").read_text())
    return 0 if report else 1


def _cmd_serve(a: argparse.Namespace) -> int:
    from flows.serve import ServeError, serve_all

    try:
        serve_all(start_server=not a.no_server)
    except ServeError as exc:
        print(f"instruct-tts: error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every stage command's options. Their dests are the parameters of the stage's Prefect deployment
    (tests/test_deployments.py); --help shows each default, read from the config dataclass it comes from."""
    from tts_core.encoders.embedded import KINDS
    from tts_core.languages import MTL_LANGUAGES
    from tts_core.sampling_defaults import INSTRUCTION_GUIDANCE, REFERENCE_INSTRUCTION_GUIDANCE, family_defaults_help

    guidance_default = (f"{INSTRUCTION_GUIDANCE:g} ({REFERENCE_INSTRUCTION_GUIDANCE:g} with a reference clip) for a run "
                        "whose stage 2 trained the null instruction (--instruction-dropout > 0), else 0; 0 = unguided")
    p = argparse.ArgumentParser(prog="instruct-tts", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=DefaultsHelpFormatter)

    d = command("demo", "generate the embedded corpus and run the pipeline on it")
    d.add_argument("--out", type=Path, default=Path("demo"))
    d.add_argument("--n-clips", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu", help=DEVICE_HELP)
    d.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect")
    d.set_defaults(func=_cmd_demo)

    _lab_command(command)

    b = command("build-cache", "validate clips, run frozen models once, write a Zarr cache")
    b.add_argument("--metadata", type=Path, required=True,
                   help="audio_path|transcript|instruction[|speaker[|language]] per line")
    b.add_argument("--audio-root", type=Path, required=True, help="directory the audio paths are relative to")
    b.add_argument("--store", required=True, help="output store: a path (cache/NAME.zarr) or any fsspec URL")
    g = b.add_argument_group("frozen models (local paths; omit all for the embedded default)")
    add(g, "--chatterbox-dir", type=Path, default_from=config_default(FROZEN + "chatterbox_dir", none="embedded"),
        help="dir with Chatterbox ve.safetensors / ve.pt and s3gen.safetensors / s3gen.pt")
    add(g, "--text-encoder", type=Path, default_from=config_default(FROZEN + "text_encoder", none="embedded"),
        help="local flan-t5-large (or other HF encoder) directory")
    add(g, "--device", default_from=config_default(FROZEN + "device"), help=DEVICE_HELP)
    b.add_argument("--raw-spk", action="store_true", help="reader does not L2-normalise speaker embeddings")
    b.add_argument("--raw-xvec", action="store_true", help="reader does not L2-normalise x-vectors")
    add(b, "--loader-threads", type=_positive_int, default_from=config_default(BUILD + "loader_threads"),
        help="threads decoding and resampling audio ahead of the models")
    add(b, "--chunk-rows", type=_positive_int, default_from=config_default(BUILD + "chunk_rows"),
        help="rows per Zarr chunk and per batch (new stores; an existing store keeps its own)")
    b.add_argument("--allow-outside-root", action="store_true",
                   help="read relative audio paths whose '..' leaves --audio-root (refused by default)")
    add(b, "--speech-tokenizer", choices=KINDS, default_from=config_default(FROZEN + "speech_tokenizer"),
        help="embedded tokenizer + decoder fitted on the corpus when no --chatterbox-dir is given: "
             "mel-vq (log-mel k-means, Griffin-Lim) or world-vq (WORLD envelope codes x log-F0 levels, "
             "keeps pitch; docs/benchmarks.md 'Vocoder ceiling')")
    b.add_argument("--task-runner", choices=TASK_RUNNERS, default="local",
                   help="where clip shards are encoded: this process, or Dask workers (prefect-dask)")
    b.add_argument("--cluster", help="Dask scheduler address, e.g. tcp://scheduler:8786 (default: a local cluster)")
    b.add_argument("--workers", type=int, default=DASK_LOCAL_WORKERS, help="worker processes of the local Dask cluster")
    b.add_argument("--no-prefect", action="store_true", help="run without Prefect (no artifacts)")
    b.set_defaults(func=_cmd_build_cache)

    t1 = command("train-stage1", "train the instruction mapper (pooling + flow matching) on a cache")
    t1.add_argument("--store", required=True, help="cache store written by build-cache")
    t1.add_argument("--out", type=Path, required=True, help="run directory (resumed when it holds the same run)")
    add(t1, "--phase", choices=("1", "2", "both"), default_from=config_default(STAGE1 + "phase"),
        help="1: fit ground-truth vectors; 2: fit the predicted reconstruction; both: 1 then 2")
    add(t1, "--init-from", type=Path, default_from=config_default(STAGE1 + "init_from"),
        help="--phase 2 alone: the stage-1 run to start from")
    add(t1, "--device", default_from=config_default(STAGE1 + "device"), help=AUTO_DEVICE_HELP)
    add(t1, "--amp", choices=("auto", "bf16", "fp32"), default_from=config_default(STAGE1 + "amp_dtype"),
        help="mapper autocast, auto = bf16 on CUDA (pooling is always fp32)")
    g = t1.add_argument_group("training (tts_core.stage1.train.Stage1TrainConfig)")
    add(g, "--epochs", type=int, default_from=config_default(STAGE1 + "epochs"), help="max epochs per phase")
    add(g, "--batch-size", type=int, default_from=config_default(STAGE1 + "batch_size"), help="clips per step")
    add(g, "--lr", type=float, default_from=config_default(STAGE1 + "lr_phase1"), help="phase-1 learning rate")
    add(g, "--lr-phase2", type=float, default_from=config_default(STAGE1 + "lr_phase2"), help="phase-2 learning rate")
    add(g, "--warmup-steps", type=int, default_from=config_default(STAGE1 + "warmup_steps"),
        help="linear warm-up steps at the start of each phase")
    add(g, "--min-phase-steps", type=int, default_from=config_default(STAGE1 + "min_phase_steps"),
        help="a phase runs at least this many steps before --epochs can end it (small caches)")
    add(g, "--patience", type=int, default_from=config_default(STAGE1 + "patience"),
        help="evaluations without AvgCos improvement before a phase stops")
    add(g, "--eval-every", type=int, default_from=config_default(STAGE1 + "eval_every"),
        help="steps between held-out evaluations (0: every epoch, at least 100 steps)")
    add(g, "--max-steps", type=int, default_from=config_default(STAGE1 + "max_steps", none="no limit"),
        help="stop the whole run after this many steps")
    add(g, "--held-out-frac", type=float, default_from=config_default(STAGE1 + "held_out_frac"),
        help="share of instructions held out for early stopping")
    add(g, "--split-by", choices=("instruction", "speaker"), default_from=config_default(STAGE1 + "split_by"),
        help="held-out unit: instruction texts, or speakers + their texts (needs a speaker column)")
    add(g, "--seed", type=int, default_from=config_default(STAGE1 + "seed"), help="split, init and batch order")
    g.add_argument("--restart", action="store_true", help="ignore out/last and start over")
    add(g, "--states-in-memory-mb", type=float, default_from=config_default(STAGE1 + "states_in_memory_mb"),
        help="instruction states up to this size (ragged) are held in memory / on the device")
    add(g, "--states-cache-mb", type=float, default_from=config_default(STAGE1 + "states_cache_mb"),
        help="bigger ones are streamed from the store through a chunk cache of this size")
    m = t1.add_argument_group("mapper (tts_core.mapper.flow.MapperConfig)")
    add(m, "--hidden-dim", type=int, default_from=config_default(MAPPER + "hidden_dim"), help="flow network width")
    add(m, "--n-blocks", type=int, default_from=config_default(MAPPER + "n_blocks"), help="AdaLN blocks")
    add(m, "--n-steps", type=int, default_from=config_default(MAPPER + "n_steps"), help="Euler steps at inference")
    add(m, "--temperature", type=float, default_from=config_default(MAPPER + "temperature"),
        help="sampling temperature of the flow's start noise")
    add(m, "--mapper-draws", hidden=("--draws",), type=int, default_from=config_default(MAPPER + "draws"),
        help="mapper draws averaged per vector that stage 2 and synthesis get (1: one draw, most voice variety; "
             "recorded in mapper.json)")
    t1.add_argument("--no-prefect", action="store_true", help="run without Prefect (no artifacts)")
    t1.set_defaults(func=_cmd_train_stage1, ctrl_c_saves=True)

    t2 = command("train-stage2", "train T3 + AdaRMSNorm adapters (torchrun for multi-GPU)")
    t2.add_argument("--store", required=True, help="cache store written by build-cache")
    t2.add_argument("--mapper", type=Path, required=True, help="stage-1 run directory (train-stage1 --out)")
    t2.add_argument("--t3", required=True,
                    help="Chatterbox T3 file (English t3_cfg.safetensors, multilingual t3_mtl23ls_v2.safetensors, "
                         "Turbo t3_turbo_v1.safetensors; tokenizer, ve and s3gen found beside it), a directory "
                         "holding exactly one (the full ResembleAI/chatterbox snapshot holds two: pass the file), "
                         "or a preset: tiny, small, 520m")
    t2.add_argument("--out", type=Path, required=True, help="run directory (resumed when it holds the same run)")
    add(t2, "--device", default_from=config_default(STAGE2 + "device"),
        help=AUTO_DEVICE_HELP + "; under torchrun: cuda:LOCAL_RANK")
    add(t2, "--amp", choices=("auto", "bf16", "fp32"), default_from=config_default(STAGE2 + "amp_dtype"),
        help="autocast, auto = bf16 on CUDA, fp32 on CPU")
    g = t2.add_argument_group("training (tts_core.stage2.config.Stage2Config)")
    add(g, "--instruction-prob", type=float, default_from=config_default(ROW_MIX + "instruction_prob"),
        help="share of instruction-only rows (of the rows that are not prompt + instruction)")
    add(g, "--prompt-instruction-prob", type=float, default_from=config_default(ROW_MIX + "prompt_instruction_prob"),
        help="share of rows with a reference prompt *and* the instruction ('this voice, but slower'); the rest "
             "split by --instruction-prob")
    add(g, "--instruction-dropout", type=float, default_from=config_default(ROW_MIX + "instruction_dropout"),
        help="share of instruction rows given the null instruction, for --instruction-guidance at synthesis")
    add(g, "--batch-size", type=int, default_from=config_default(STAGE2 + "batch_size"),
        help="rows per batch per rank (the cap with --max-tokens)")
    add(g, "--max-tokens", type=int, default_from=config_default(STAGE2 + "max_tokens"),
        help="token budget per batch (length bucketing; 0 = fixed --batch-size)")
    add(g, "--grad-accum", type=int, default_from=config_default(STAGE2 + "grad_accum"),
        help="batches per rank per step (N ranks x A = same run as 1 x N*A)")
    add(g, "--lr", type=float, default_from=config_default(STAGE2 + "lr"), help="peak learning rate (cosine decay)")
    add(g, "--adapter-lr", type=float, default_from=config_default(STAGE2 + "adapter_lr", none="--lr"),
        help="learning rate of the AdaRMSNorm adapters")
    add(g, "--epochs", type=int, default_from=config_default(STAGE2 + "epochs"), help="passes over the store")
    add(g, "--max-steps", type=int, default_from=config_default(STAGE2 + "max_steps", none="no limit"),
        help="stop after this many optimizer steps")
    add(g, "--warmup-steps", type=int, default_from=config_default(STAGE2 + "warmup_steps"), help="linear warm-up steps")
    add(g, "--save-every", type=int, default_from=config_default(STAGE2 + "save_every"),
        help="steps between checkpoints (0: only at the end)")
    add(g, "--log-every", type=int, default_from=config_default(STAGE2 + "log_every"), help="steps per logged metrics row")
    add(g, "--hold-out", choices=("none", "mapper"), default_from=config_default(STAGE2 + "hold_out"),
        help="mapper: leave out the stage-1 run's held-out clips and report their loss")
    add(g, "--eval-every", type=int, default_from=config_default(STAGE2 + "eval_every"),
        help="steps between held-out evaluations (0: --log-every x 10)")
    add(g, "--text-tokenizer", default_from=config_default(STAGE2 + "text_tokenizer", none="the --t3 family's"),
        help="'bytes' or a tokenizer file")
    add(g, "--language", default_from=config_default(STAGE2 + "language", none="the metadata's 5th column"),
        help=f"multilingual T3: language of rows without a 5th metadata column ({', '.join(sorted(MTL_LANGUAGES))})")
    add(g, "--seed", type=int, default_from=config_default(STAGE2 + "seed"), help="row mixing, dropout and batch order")
    g.add_argument("--compile", action="store_true", help="torch.compile the Llama backbone")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute backbone layers in backward (HF checkpointing, adapters exact): less memory, "
                        "~1/3 more compute, same loss")
    g.add_argument("--restart", action="store_true", help="ignore checkpoints in --out and start over")
    t2.add_argument("--no-prefect", action="store_true", help="run without Prefect (always so under torchrun)")
    t2.set_defaults(func=_cmd_train_stage2, ctrl_c_saves=True)

    sy = command("synthesize", "text + instruction (and/or a reference clip) -> wav; or a batch file of them")
    sy.add_argument("--run", type=Path, required=True, help="train-stage2 --out directory")
    one = sy.add_argument_group("one clip")
    one.add_argument("--text", help="the text to speak")
    one.add_argument("--instruction", help="plain-language voice description")
    one.add_argument("--reference", type=Path, help="reference clip (Chatterbox-style audio conditioning)")
    one.add_argument("--out", type=Path, help="output .wav (tokens beside it as .tokens.npy)")
    many = sy.add_argument_group("a batch file (docs/deployments.md)")
    many.add_argument("--batch", type=Path, help="one clip a line: text|instruction[|reference.wav] (instruction may "
                                                 "be empty with a reference; blank lines and # comments skipped)")
    many.add_argument("--out-dir", type=Path, help="where the batch's wavs go: NNNN.wav, NNNN = the line number")
    add(sy, "--seed", type=int, default_from=config_default(SYNTH + "seed"), help="sampling seed (the same seed, the same clip)")
    add(sy, "--device", default_from=config_default(SYNTH + "device"), help=DEVICE_HELP)
    add(sy, "--text-encoder", type=Path, default_from=config_default(SYNTH + "text_encoder", none="the run's"),
        help="local text-encoder dir the run was trained over")
    add(sy, "--chatterbox-dir", type=Path, default_from=config_default(SYNTH + "chatterbox_dir", none="the run's"),
        help="dir with ve/s3gen weights (production runs)")
    add(sy, "--language", default_from=config_default(SYNTH + "language", none="the run's --language"),
        help="multilingual T3: the text's language")
    add(sy, "--mapper-draws", type=int, default_from=config_default(SYNTH + "mapper_draws",
                                                                   none="the stage-1 run's `draws`"),
        help="instruction -> voice: mapper draws averaged (1 gives the most voice variety across --seed)")
    sp = sy.add_argument_group("sampling (tts_core.synthesis.SamplingConfig; default: each Chatterbox family's own "
                               "`generate` values)")
    for option, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float),
                         ("repetition_penalty", float), ("cfg_weight", float)):
        sp.add_argument("--" + option.replace("_", "-"), type=kind, help=family_defaults_help(option))
    add(sp, "--max-new-tokens", type=int, default_from=config_default(SAMPLING + "max_new_tokens"),
        help="speech tokens at most per clip")
    add(sp, "--instruction-guidance", type=float, metavar="W",
        default_from=config_default(SAMPLING + "instruction_guidance", none=guidance_default),
        help="classifier-free guidance on the instruction: logits + W·(cond − null instruction), on top of "
             "--cfg-weight's text CFG")
    sy.set_defaults(func=_cmd_synthesize)

    ev = command("evaluate", "synthesize held-out instructions and measure what they asked for")
    ev.add_argument("--run", type=Path, required=True, help="train-stage2 --out directory")
    ev.add_argument("--store", required=True, help="the cache the run was trained on (held-out instructions)")
    add(ev, "--out", type=Path, default_from=config_default(EVAL + "out_dir", none="RUN/eval"),
        help="where the wavs and the report go")
    add(ev, "--n", type=int, default_from=config_default(EVAL + "n_instructions"),
        help="held-out instructions to synthesize")
    add(ev, "--text", default_from=config_default(EVAL + "text", fmt=repr), help="the sentence every clip speaks")
    add(ev, "--seed", type=int, default_from=config_default(EVAL + "seed"), help="which clips, and the sampling seed")
    add(ev, "--device", default_from=config_default(EVAL + "device"), help=DEVICE_HELP)
    add(ev, "--max-new-tokens", type=int, default_from=config_default(EVAL + "max_new_tokens"),
        help="speech tokens at most per clip")
    add(ev, "--text-encoder", type=Path, default_from=config_default(EVAL + "text_encoder", none="the run's"),
        help="override the instruction encoder the run recorded")
    add(ev, "--chatterbox-dir", type=Path, default_from=config_default(EVAL + "chatterbox_dir", none="the run's"),
        help="override the Chatterbox directory the run recorded")
    add(ev, "--language", default_from=config_default(EVAL + "language"),
        help="multilingual T3: language of the evaluation text")
    add(ev, "--repetition-penalty", type=float, help=family_defaults_help("repetition_penalty"))
    add(ev, "--instruction-guidance", type=float, metavar="W",
        default_from=config_default(EVAL + "instruction_guidance", none=guidance_default),
        help="classifier-free guidance on the instruction")
    ev.add_argument("--no-prefect", action="store_true", help="run without Prefect (no artifacts)")
    ev.set_defaults(func=_cmd_evaluate)

    r = command("report", "print the norm-statistics report and rewrite it inside the store "
                "(STORE/norm_report.json, .md, .png)")
    r.add_argument("store")
    r.add_argument("--max-rows", type=int, default=200_000, help="seeded sample size for huge stores")
    r.set_defaults(func=_cmd_report)

    s = command("serve", "serve the Prefect deployments (build-cache/-, ...; docs/deployments.md)")
    s.add_argument("--no-server", action="store_true",
                   help="start no server, even when no PREFECT_API_URL is set (env or profile)")
    s.set_defaults(func=_cmd_serve)
    return p


# the lab's fields that had a flag before --set (docs and benchmarks cite them): each still sets its field, hidden
LAB_OLD_FLAGS = ("repetition_penalty", "instruction_guidance", "repetition_sweep", "guidance_sweep", "sweep_clips",
                 "instruction_dropout", "prompt_instruction_prob")


def _lab_command(command) -> None:
    """`instruct-tts lab`: flags for the common LabConfig fields, ``--set FIELD=VALUE`` for every other one."""
    from dataclasses import fields

    from instruct_tts.lab.config import ABLATIONS, PRESETS, LabConfig
    from tts_core.sampling_defaults import INSTRUCTION_GUIDANCE, REFERENCE_INSTRUCTION_GUIDANCE

    lab = command("lab", "the instruction-following lab: bigger corpus, held-out splits, report")
    add(lab, "--out", type=Path, default_from=config_default("instruct_tts.lab.config:LabConfig.out"),
        help="output directory (report.md, report.json, plots, caches, runs)")
    lab.add_argument("--preset", default=LAB_DEFAULT_PRESET, choices=sorted(PRESETS),
                     help="default: the lab's full run (docs/lab.md); medium: a smaller corpus and fewer steps, to "
                          "check that the lab works; tiny: the whole pipeline on a toy corpus (CI). Each option "
                          "below overrides the preset's value")
    add(lab, "--ablation", action="append", choices=sorted(ABLATIONS), default_from=lambda: "none",
        help="take an ingredient out, over the preset (repeatable): " + "; ".join(
            f"{name}: {', '.join(f'{k}={show(v)}' for k, v in values.items())}" for name, values in ABLATIONS.items()))
    add(lab, "--n-clips", type=int, default_from=lab_default("n_clips"), help="lab corpus size")
    add(lab, "--stage1-steps", type=int, default_from=lab_default("stage1_steps"),
        help="stage-1 steps (both phases; each also early-stops)")
    add(lab, "--stage2-steps", type=int, default_from=lab_default("stage2_steps"), help="stage-2 steps")
    add(lab, "--text-encoder", default_from=lab_default("text_encoder", none="the embedded MiniLM"),
        help="local HF encoder directory for instructions (e.g. flan-t5-large)")
    add(lab, "--t3", choices=("tiny", "small"), default_from=lab_default("t3"), help="T3 preset trained in stage 2")
    add(lab, "--eval-clips", type=int, default_from=lab_default("eval_clips"),
        help="held-out clips synthesized per split")
    add(lab, "--mapper-draws", type=int, default_from=lab_default("mapper_draws"),
        help="mapper draws averaged per voice vector for stage 2 and synthesis (the report's stage-1 sampling curve "
             "measures the choice)")
    add(lab, "--captions-per-clip", type=int, default_from=lab_default("captions_per_clip"),
        help="training-wording captions per training clip (1 = one per clip, the run to compare against)")
    add(lab, "--compare-to", default_from=lab_default("compare_to"),
        help="another lab run's --out: the report shows its held-out-instruction results beside this run's (e.g. "
             "the --captions-per-clip 1 run: same clips, same steps)")
    add(lab, "--speech-tokenizer", choices=("mel-vq", "world-vq"), default_from=lab_default("speech_tokenizer"),
        help="embedded tokenizer + vocoder (world-vq's tokens keep F0)")
    add(lab, "--seed", type=int, default_from=lab_default("seed"), help="corpus, split and training seed")
    add(lab, "--device", default_from=lab_default("device"), help=DEVICE_HELP)
    flagged = {a.dest for a in lab._actions}
    settable = [f.name for f in fields(LabConfig) if f.name not in flagged]
    none = {"repetition_penalty": "none (the T3 family's official value)",
            "instruction_guidance": f"none (the run's: {INSTRUCTION_GUIDANCE:g}, {REFERENCE_INSTRUCTION_GUIDANCE:g} with a "
                                    "reference clip, if stage 2 trained the null instruction, else 0)"}
    add(lab, "--set", hidden=tuple(f"--{f.replace('_', '-')}" for f in LAB_OLD_FLAGS), dest="settings",
        metavar="FIELD=VALUE", action=SettingAction, check=lab_settings, default_from=lab_defaults(settable, none),
        help="any other LabConfig field (instruct_tts/lab/config.py), typed as the field: a number, 'none' where "
             "the field may be none, comma-separated numbers for a sweep ('' = none); repeatable")
    lab.add_argument("--no-prefect", action="store_true", help="run without Prefect (no artifacts)")
    lab.set_defaults(func=_cmd_lab, ctrl_c_saves=True)


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
        from tts_core.synthesis_batch import SynthesizeRequestError

        if isinstance(exc, (StoreError, FileNotFoundError, MetadataError, Stage1InputError, TextEncoderMismatchError,
                            NonFiniteLossError, ResumeMismatchError, Stage2NonFiniteError, TextTokenizerError, AudioRejected,
                            T3FamilyError, CheckpointMismatchError, SamplingOptionError, HoldOutError,
                            SynthesizeRequestError)):
            print(f"instruct-tts: error: {exc}", file=sys.stderr)
            return 2
        raise
