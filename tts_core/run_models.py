"""A run remembers its frozen models (issue #31): what `train-stage1` / `train-stage2` record, and how synthesis and
evaluation load the same models again without options.

Record (``frozen_models`` in ``mapper.json`` and ``stage2.json``), built from the cache store's identities::

    {"models": {"text_encoder": {name, sha256, source, embedded}, "voice_encoder": ..., "xvector": ...,
                "speech_tokenizer": ...},
     "chatterbox": {"dir": ..., "ve": ..., "s3gen": ...} | None}      # production Chatterbox files, when used

``embedded`` models (weights inside an installed package, or the embedded tokenizer whose codebook travels with the
store and the run) load as they always did. The others load from their recorded ``source``; a recorded path that is
gone, or whose weights now hash differently, is refused (`RunModelMissing`, `RunModelMismatch`) naming the model, the
path and the option that overrides it. An override (``--text-encoder``, ``--chatterbox-dir``) is checked against the
record too: the same name and sha256 (`ModelIdentity.same_model`). A run written before records behaves as before.
"""
from __future__ import annotations

import site
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tts_core.identity import ModelIdentity
from tts_core.mapper.pooling import TextEncoderMismatchError

ROLES = ("text_encoder", "voice_encoder", "xvector", "speech_tokenizer")
TEXT_ENCODER_FLAG = "--text-encoder"
CHATTERBOX_FLAG = "--chatterbox-dir"
FLAG = {"text_encoder": TEXT_ENCODER_FLAG, "voice_encoder": CHATTERBOX_FLAG, "xvector": CHATTERBOX_FLAG,
        "speech_tokenizer": CHATTERBOX_FLAG}
WHAT = {"text_encoder": "text encoder", "voice_encoder": "voice encoder", "xvector": "x-vector model",
        "speech_tokenizer": "speech tokenizer"}


class RunModelError(Exception):
    """A frozen model a run recorded cannot be used as recorded; the message names the model, path and option."""


class RunModelMissing(RunModelError, FileNotFoundError):
    """A recorded model path (text-encoder directory, Chatterbox file) is not there any more."""


class RunModelMismatch(RunModelError, TextEncoderMismatchError):
    """The model loaded (from the recorded path, or from an override) is not the one the run was trained with."""


# ---- the record --------------------------------------------------------------------------------------------------
def _chatterbox_names() -> dict[str, str]:
    """role → the identity name of its production (Chatterbox) weights."""
    from tts_core.encoders.campplus import CAMPPLUS_NAME
    from tts_core.encoders.s3_tokenizer import IDENTITY_NAME
    from tts_core.encoders.voice_encoder import CHATTERBOX_NAME

    return {"voice_encoder": CHATTERBOX_NAME, "xvector": CAMPPLUS_NAME, "speech_tokenizer": IDENTITY_NAME}


def _package_roots() -> list[Path]:
    roots = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib")}
    try:
        roots |= set(site.getsitepackages())
    except AttributeError:  # some virtualenv site modules lack it
        pass
    return [Path(r).resolve() for r in roots if r]


def _inside_package(source: str) -> bool:
    if not source:
        return True
    p = Path(source)
    if any(part in ("site-packages", "dist-packages") for part in p.parts):
        return True
    try:
        rp = p.resolve()
    except OSError:
        return False
    return any(rp.is_relative_to(root) for root in _package_roots())


def is_embedded(role: str, ident: ModelIdentity) -> bool:
    """Whether ``ident`` is one of the embedded defaults (loaded from an installed package / the store), not a file
    the user supplied."""
    if role in ("voice_encoder", "xvector", "speech_tokenizer"):
        return ident.name != _chatterbox_names()[role]
    return _inside_package(ident.source)


def _absolute(source: str) -> str:
    """A relative source path that exists from here (the training command's directory) made absolute."""
    if source and not Path(source).is_absolute() and Path(source).exists():
        return str(Path(source).resolve())
    return source


def frozen_models_record(identities: Mapping[str, Any] | None) -> dict | None:
    """The ``frozen_models`` record of a run from its store's model identities (`CacheReader.identities`: role →
    `ModelIdentity` or its dict); None when there are none (e.g. synthetic stage-1 data)."""
    if not identities:
        return None
    models = {}
    for role, ident in identities.items():
        ident = ident if isinstance(ident, ModelIdentity) else ModelIdentity.from_dict(ident)
        emb = is_embedded(role, ident)
        models[role] = {"name": ident.name, "sha256": ident.sha256,
                        "source": ident.source if emb else _absolute(ident.source), "embedded": emb}
    files = {k: models[r]["source"] for k, r in (("ve", "voice_encoder"), ("s3gen", "speech_tokenizer"))
             if r in models and not models[r]["embedded"] and models[r]["source"]}
    if "s3gen" not in files and "xvector" in models and not models["xvector"]["embedded"]:
        files["s3gen"] = models["xvector"]["source"]
    chatterbox = None
    if files:
        dirs = {str(Path(p).parent) for p in files.values()}
        chatterbox = {"dir": dirs.pop() if len(dirs) == 1 else None, **files}
    return {"models": models, "chatterbox": chatterbox}


# ---- loading what was recorded --------------------------------------------------------------------------------------
@dataclass
class RunModels:
    """Where synthesis loads each frozen model from: the override, else the record, else (no record) as before."""

    record: dict | None
    text_encoder: Path | None  # None: the embedded default
    ve: Path | None
    s3gen: Path | None
    chatterbox_dir: Path | None  # only without a record (the old behaviour: files looked up in it)
    overridden: frozenset  # roles whose location was given explicitly

    def frozen_config(self, device: str = "cpu"):
        from tts_core.frozen import FrozenModelsConfig

        return FrozenModelsConfig(chatterbox_dir=self.chatterbox_dir, ve=self.ve, s3gen=self.s3gen,
                                  text_encoder=self.text_encoder, device=device)

    def recorded(self, role: str) -> ModelIdentity | None:
        rec = ((self.record or {}).get("models") or {}).get(role)
        return ModelIdentity.from_dict(rec) if rec else None

    def check(self, role: str, loaded: Any, run: str) -> None:
        """Refuse ``loaded`` (a model with ``.identity``, or a `ModelIdentity`) unless it is the recorded one.
        Embedded recorded models are not checked unless overridden (they load as they always did)."""
        rec = ((self.record or {}).get("models") or {}).get(role)
        if not rec or loaded is None:
            return
        if rec.get("embedded") and role not in self.overridden:
            return
        got = loaded if isinstance(loaded, ModelIdentity) else getattr(loaded, "identity", None)
        if got is None:
            return
        want = ModelIdentity.from_dict(rec)
        if want.same_model(got):
            return
        flag = FLAG[role]
        where = (f"the embedded default ({want.source or 'installed package'})" if rec.get("embedded")
                 else f"from {want.source}")
        if role in self.overridden:
            hint = (f"the {flag} given loads {got.name!r} (sha256 {got.sha256[:12]}) from {got.source}: pass the "
                    f"same model" + (f", or omit {flag}" if rec.get("embedded") or want.source else ""))
        else:
            hint = (f"{want.source} now holds {got.name!r} (sha256 {got.sha256[:12]}): put the original weights "
                    f"back, or pass {flag} with a copy of them")
        raise RunModelMismatch(
            f"{run} was trained with {WHAT[role]} {want.name!r} (sha256 {want.sha256[:12]}) {where}; {hint} "
            "(name and weight hash must match)")


def resolve_run_models(record: dict | None, text_encoder: str | Path | None = None,
                       chatterbox_dir: str | Path | None = None, run: str = "this run") -> RunModels:
    """Where each frozen model of a run loads from (module doc). Refuses a recorded path that is gone."""
    overridden = set()
    if text_encoder is not None:
        overridden.add("text_encoder")
    if chatterbox_dir is not None:
        overridden |= {"voice_encoder", "xvector", "speech_tokenizer"}
    if not record:  # a run from before records: exactly the old behaviour
        return RunModels(None, Path(text_encoder) if text_encoder else None, None, None,
                         Path(chatterbox_dir) if chatterbox_dir else None, frozenset(overridden))
    models = record.get("models") or {}

    def production(role: str) -> dict | None:
        rec = models.get(role)
        return rec if rec and not rec.get("embedded") else None

    # text encoder: the override, else the recorded directory (embedded: None, the default)
    te_path = None
    if text_encoder is not None:
        te_path = Path(text_encoder)
    elif (rec := production("text_encoder")) is not None:
        te_path = Path(rec["source"])
        if not te_path.is_dir():
            raise RunModelMissing(
                f"{run} was trained with text encoder {rec['name']!r} (sha256 {rec['sha256'][:12]}) from "
                f"{rec['source']}, which is not there any more: pass {TEXT_ENCODER_FLAG} DIR with a copy of the same "
                "model (same directory name and weights)")
    # Chatterbox files: for the roles recorded as production, from the override directory, else the recorded files
    ve_rec, s3_rec = production("voice_encoder"), production("speech_tokenizer") or production("xvector")
    ve = s3gen = None
    if chatterbox_dir is not None:
        from tts_core.frozen import FrozenModelsConfig

        d = Path(chatterbox_dir)
        if ve_rec is None and s3_rec is None:
            raise RunModelMismatch(
                f"{run} was trained with the embedded default models, no Chatterbox files "
                f"({', '.join(models[r]['name'] for r in ('voice_encoder', 'speech_tokenizer') if r in models)}): "
                f"omit {CHATTERBOX_FLAG}")
        probe = FrozenModelsConfig(chatterbox_dir=d)
        ve = probe.ve_path() if ve_rec is not None else None  # WeightsNotFound (a FileNotFoundError) names the file
        s3gen = probe.s3gen_path() if s3_rec is not None else None
    else:
        for rec, kind in ((ve_rec, "ve"), (s3_rec, "s3gen")):
            if rec is None:
                continue
            path = Path(rec["source"])
            if not path.is_file():
                raise RunModelMissing(
                    f"{run} was trained with {rec['name']!r} (sha256 {rec['sha256'][:12]}) from {rec['source']}, which "
                    f"is not there any more: pass {CHATTERBOX_FLAG} DIR with Chatterbox's files (the same weights)")
            if kind == "ve":
                ve = path
            else:
                s3gen = path
    return RunModels(record, te_path, ve, s3gen, None, frozenset(overridden))
