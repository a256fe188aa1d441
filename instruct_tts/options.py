"""Each stage command's options, shared by the command line and the Prefect deployment of the same name.

A deployment takes what its command takes, under the flag's own name (the argparse dest: ``--audio-root`` is
``audio_root``), with the same default. Most defaults are ``None``: "the config dataclass's default", read from the
dataclass when the config is built here and shown by ``--help`` from the same field (`DefaultsHelpFormatter`), so no
default is typed twice. The CLI passes `command_options` to the stage's flow (``flow(**options)``) or, without
Prefect, to the same converter below that the flow calls; ``tests/test_deployments.py`` holds the two to the parser.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

# argparse dests that are not options of the work: the subcommand's bookkeeping, and switches of the CLI process
NOT_OPTIONS = ("cmd", "func", "ctrl_c_saves", "use_prefect")
# --no-prefect says whether *this process* runs the work through Prefect; a deployment run always is Prefect
CLI_ONLY = ("no_prefect",)

TASK_RUNNERS = ("local", "dask")
DASK_LOCAL_WORKERS = 2  # worker processes of the local Dask cluster (build-cache --task-runner dask)
LAB_DEFAULT_PRESET = "default"


def command_options(a: argparse.Namespace) -> dict:
    """The parsed options of a command, by dest, as a deployment takes them (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
            if k not in NOT_OPTIONS and k not in CLI_ONLY}


def subcommand(parser: argparse.ArgumentParser, cmd: str) -> argparse.ArgumentParser:
    """The subparser of ``cmd`` in the `instruct-tts` parser."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subs.choices[cmd]


def option_defaults(cmd: str) -> dict:
    """Every option of ``cmd`` (by dest) with its command-line default."""
    from instruct_tts.cli import build_parser

    return {a.dest: (str(a.default) if isinstance(a.default, Path) else a.default)
            for a in subcommand(build_parser(), cmd)._actions
            if a.dest != "help" and a.dest not in NOT_OPTIONS and a.dest not in CLI_ONLY}


def option_help(cmd: str) -> dict[str, str]:
    """Every option of ``cmd`` (by dest) with its ``--help`` text, the default filled in."""
    from instruct_tts.cli import build_parser

    sub = subcommand(build_parser(), cmd)
    fmt = sub._get_formatter()
    return {a.dest: " ".join(fmt._expand_help(a).split()) for a in sub._actions
            if a.help and a.dest != "help" and a.dest not in NOT_OPTIONS and a.dest not in CLI_ONLY}


def stage_options(cmd: str, **given) -> dict:
    """``cmd``'s options as its command line would give them: ``given`` (dest names), the rest at their defaults."""
    options = option_defaults(cmd)
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise TypeError(f"instruct-tts {cmd} has no option {', '.join(unknown)}")
    return {**options, **{k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()}}


def _given(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _path(v) -> Path | None:
    return None if v in (None, "") else Path(v)


# ---- options -> the stage's config (the one conversion, for the CLI and the flow) ----------------------------------
def build_config(o: dict):
    """build-cache options -> `BuildConfig` (task_runner / cluster / workers are the flow's: where shards run)."""
    from cache.schema import Normalisation
    from tts_core.audio import AudioPolicy
    from tts_core.cachebuild.build import BuildConfig
    from tts_core.frozen import FrozenModelsConfig

    models = FrozenModelsConfig(**_given(chatterbox_dir=_path(o["chatterbox_dir"]), text_encoder=_path(o["text_encoder"]),
                                         device=o["device"], speech_tokenizer=o["speech_tokenizer"]))
    return BuildConfig(metadata=Path(o["metadata"]), audio_root=Path(o["audio_root"]), store=o["store"], models=models,
                       normalisation=Normalisation(spk_emb=not o["raw_spk"], xvec=not o["raw_xvec"]),
                       audio=AudioPolicy(allow_outside_root=bool(o["allow_outside_root"])),
                       **_given(loader_threads=o["loader_threads"], chunk_rows=o["chunk_rows"]))


def stage1_configs(o: dict, progress: bool = False):
    """train-stage1 options -> (`Stage1TrainConfig`, `MapperConfig`)."""
    from tts_core.mapper.flow import MapperConfig
    from tts_core.stage1.train import Stage1TrainConfig

    train = _given(phase=None if o["phase"] is None else str(o["phase"]),  # `-p phase=1` arrives as JSON 1
                   init_from=o["init_from"] or None, device=o["device"], amp_dtype=o["amp"],
                   epochs=o["epochs"], batch_size=o["batch_size"], lr_phase1=o["lr"], lr_phase2=o["lr_phase2"],
                   patience=o["patience"], eval_every=o["eval_every"], max_steps=o["max_steps"],
                   min_phase_steps=o["min_phase_steps"], warmup_steps=o["warmup_steps"],
                   held_out_frac=o["held_out_frac"], split_by=o["split_by"], seed=o["seed"],
                   resume=False if o["restart"] else None, states_in_memory_mb=o["states_in_memory_mb"],
                   states_cache_mb=o["states_cache_mb"])
    mapper = _given(hidden_dim=o["hidden_dim"], n_blocks=o["n_blocks"], n_steps=o["n_steps"],
                    temperature=o["temperature"], draws=o["draws"])
    return (Stage1TrainConfig(**train, out_dir=str(o["out"]), progress=progress), MapperConfig.from_dict(mapper))


def stage2_config(o: dict, progress: bool = False):
    """train-stage2 options -> `Stage2Config`."""
    from tts_core.stage2.config import Stage2Config

    train = _given(
        instruction_prob=o["instruction_prob"], prompt_instruction_prob=o["prompt_instruction_prob"],
        instruction_dropout=o["instruction_dropout"], batch_size=o["batch_size"], max_tokens=o["max_tokens"],
        grad_accum=o["grad_accum"], lr=o["lr"], adapter_lr=o["adapter_lr"], epochs=o["epochs"],
        max_steps=o["max_steps"], warmup_steps=o["warmup_steps"], device=o["device"], amp_dtype=o["amp"],
        compile=o["compile"] or None, activation_checkpointing=o["activation_checkpointing"] or None,
        save_every=o["save_every"], log_every=o["log_every"], text_tokenizer=o["text_tokenizer"], seed=o["seed"],
        language=o["language"], hold_out=o["hold_out"], eval_every=o["eval_every"],
        resume=False if o["restart"] else None)
    return Stage2Config.from_dict({**train, "store": o["store"], "mapper_dir": str(o["mapper"]), "t3": o["t3"],
                                   "out_dir": str(o["out"]), "progress": progress})


def eval_config(o: dict):
    """evaluate options -> `EvalConfig`."""
    from tts_core.evaluation.run import EvalConfig

    return EvalConfig(run_dir=str(o["run"]), store=o["store"], **_given(
        out_dir=o["out"], n_instructions=o["n"], text=o["text"], seed=o["seed"], device=o["device"],
        max_new_tokens=o["max_new_tokens"], text_encoder=o["text_encoder"], chatterbox_dir=o["chatterbox_dir"],
        language=o["language"], repetition_penalty=o["repetition_penalty"],
        instruction_guidance=o["instruction_guidance"]))


LAB_OPTIONS = ("n_clips", "seed", "device", "speech_tokenizer", "stage1_steps", "stage2_steps", "eval_clips", "t3",
               "text_encoder", "repetition_penalty", "instruction_guidance", "repetition_sweep", "guidance_sweep",
               "sweep_clips", "instruction_dropout", "prompt_instruction_prob", "mapper_draws", "captions_per_clip",
               "compare_to")


def lab_config(o: dict):
    """lab options -> `LabConfig` (the preset's values, overridden by the options given)."""
    from instruct_tts.lab import LabConfig

    sweeps = {k: tuple(o[k]) for k in ("repetition_sweep", "guidance_sweep") if o[k] is not None}
    return LabConfig.preset(o["preset"], **_given(out=_path(o["out"])),
                            **{**{k: o[k] for k in LAB_OPTIONS}, **sweeps})


# ---- --help: every default, read from the config dataclasses ---------------------------------------------------------
def field_default(cls, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default")


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(show(v) for v in value) if value else "'' (none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_default(where: str, none: str | None = None, fmt: Callable[[Any], str] = show) -> Callable[[], str]:
    """``"tts_core.stage1.train:Stage1TrainConfig.epochs"`` -> a thunk giving that field's default as help text
    (``none``: what a None default means). Resolved only when help is printed (no imports at parse time)."""
    module, attr = where.split(":")
    cls_name, name = attr.split(".")

    def thunk() -> str:
        value = field_default(getattr(importlib.import_module(module), cls_name), name)
        if value is None:
            return none if none is not None else "none"
        return fmt(value)

    return thunk


def lab_default(name: str, none: str | Callable[[], str] | None = None) -> Callable[[], str]:
    """The default preset's value of a LabConfig field, and the other presets' where they differ (``none``: what
    None means, or a thunk giving it)."""
    def thunk() -> str:
        from instruct_tts.lab import PRESETS, LabConfig

        def one(preset: str) -> str:
            value = getattr(LabConfig.preset(preset), name)
            if value is None:
                return (none() if callable(none) else none) or "none"
            return show(value)

        base = one(LAB_DEFAULT_PRESET)
        others = [f"{p}: {one(p)}" for p in PRESETS if p != LAB_DEFAULT_PRESET and one(p) != base]
        return base + (f"; preset {', '.join(others)}" if others else "")

    return thunk


class _Lazy:
    """A default read only when --help is printed (argparse substitutes it for ``%(default_from)s``)."""

    def __init__(self, thunk: Callable[[], str]):
        self.thunk = thunk

    def __str__(self) -> str:
        return self.thunk()


def add(group, *flags: str, default_from: Callable[[], str] | None = None, **kw) -> argparse.Action:
    """``group.add_argument`` whose help ends with "(default: X)", X from ``default_from`` (a `config_default` /
    `lab_default` thunk) — resolved when help is printed, so parsing imports nothing."""
    if default_from is not None:
        kw["help"] = (f"{kw['help']} " if kw.get("help") else "") + "(default: %(default_from)s)"
    action = group.add_argument(*flags, **kw)
    action.default_from = None if default_from is None else _Lazy(default_from)
    return action


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Also shows the argparse default of an option that has one (not None / off) and does not name its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (text and "default" not in text and action.option_strings and not action.required
                and action.default not in (None, False, argparse.SUPPRESS)):
            return f"{text} (default: %(default)s)"
        return text
