"""Stage 2's preparation: `Stage2Data` from a finished cache store, its expensive tables computed once and shared
(module doc of `tts_core.stage2.data`, "What is precomputed").

Rows dropped (counted in ``dropped``): no speech tokens, empty text, text/speech longer than T3's
``max_text_tokens`` / ``max_speech_tokens``, a degenerate (zero / non-finite) speaker embedding.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cache.captions import CaptionTable
from tts_core.seeds import mix_seed
from tts_core.stage2.data import SPK_DIM, Stage2Data

log = logging.getLogger(__name__)

PREPARED_FORMAT = "instruct-tts/stage2-prepared/1"


def _instruction_state_chunks(reader, ids: np.ndarray, chunk: int):
    """Yield (ids of the chunk, float16 [n, Lmax, H], lengths [n]) over ``ids``, in order."""
    for a in range(0, len(ids), chunk):
        sel = ids[a:a + chunk]
        states, lens = reader.instruction_states_batch(sel)
        yield sel, states, lens


@torch.no_grad()
def compute_instruction_tables(reader, encoder, mapper, *, mapper_seed: int = 0, mapper_samples: int = 1,
                               n_steps: int | None = None, chunk: int = 512, ids: np.ndarray | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(style_emb float32 [U, H], mapper_spk float32 [U, K, 256]) for every instruction of the store, or only for
    ``ids`` (the other rows stay 0: an evaluation that needs a few instructions of a large store).

    Frozen encoder (fp32, autocast off — it enforces that itself) and mapper on their own device.
    Noise of sample k is one CPU-seeded [U, dim] draw (seed mix(mapper_seed, k)), so the vectors do
    not depend on ``chunk`` or ``ids`` and sample 0 is the same whatever K.
    """
    U = int(reader.n_instructions)
    H = int(reader.text_hidden_size)
    ids = np.arange(U) if ids is None else np.unique(np.asarray(ids, np.int64))
    style = torch.zeros(U, H)
    for sel, states, lens in _instruction_state_chunks(reader, ids, chunk):
        style[sel] = encoder(torch.from_numpy(states), torch.from_numpy(lens)).float().cpu()
    n_steps = int(n_steps or mapper.config.n_steps)
    out = torch.zeros(U, mapper_samples, SPK_DIM)
    for k in range(mapper_samples if len(ids) else 0):
        g = torch.Generator().manual_seed(mix_seed(mapper_seed, "mapper-sample", k))
        noise = torch.randn((mapper.config.draws, U, mapper.config.dim), generator=g)
        for a in range(0, len(ids), chunk):
            sel = torch.from_numpy(ids[a:a + chunk])
            spk, _ = mapper.inference(style[sel], n_steps=n_steps, noise=noise[:, sel])
            out[sel, k] = spk.float().cpu()
    return style, out


def prepared_fingerprint(reader, tokenizer, mapper_meta: dict, *, mapper_seed: int, mapper_samples: int,
                         n_steps: int, language: str | None = None) -> str:
    info = reader.info
    d = {
        "format": PREPARED_FORMAT,
        "store": {"lines_digest": info.lines_digest, "n_rows": info.n_rows, "n_instructions": info.n_instructions,
                  "n_ok": len(reader), "models": {k: v.to_dict() for k, v in reader.identities.items()}},
        "tokenizer": tokenizer.identity.to_dict(),
        "mapper_weights": mapper_meta.get("weights_sha256"),
        "mapper_seed": mapper_seed, "mapper_samples": mapper_samples, "n_steps": n_steps,
        "mapper_sampling": {k: mapper_meta.get("mapper_config", {}).get(k) for k in ("temperature", "draws")},
    }
    if tokenizer.requires_language:
        d["language"] = language
    d["store"]["models"] = {k: {"name": v["name"], "sha256": v["sha256"]} for k, v in d["store"]["models"].items()}
    d["tokenizer"] = {"name": d["tokenizer"]["name"], "sha256": d["tokenizer"]["sha256"]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def row_languages(manifest, tokenizer, default: str | None) -> list[str | None]:
    """Each OK row's language for the tokenizer (the metadata's column, else ``default``); every row must
    have a supported one when the tokenizer needs it — else one error naming the rows and the fix."""
    from tts_core.languages import MTL_LANGUAGES
    from tts_core.stage2.text_tokenizer import TextTokenizerError, check_language

    col = manifest["language"].fillna("").astype(str).tolist() if "language" in manifest.columns else \
        [""] * len(manifest)
    langs = [c or default for c in col]
    if not tokenizer.requires_language:
        return langs
    bad = [i for i, lang in enumerate(langs) if (lang or "").strip().lower() not in MTL_LANGUAGES]
    if bad:
        try:
            check_language(langs[bad[0]])
        except TextTokenizerError as e:
            raise TextTokenizerError(f"{len(bad)} row(s) without a usable language, e.g. clip "
                                     f"{manifest['clip_id'].iloc[bad[0]]}: {e}") from None
    return [check_language(lang) for lang in langs]


def _tokenize_all(tokenizer, texts: list[str], languages: list[str | None], chunk: int = 4096
                  ) -> tuple[np.ndarray, np.ndarray]:
    ids: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        ids.extend(tokenizer.encode_batch(texts[i:i + chunk], languages[i:i + chunk]))
    lens = np.array([len(x) for x in ids], dtype=np.int64)
    off = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(off[-1]))
    return flat, off


def compute_prepared(reader, tokenizer, encoder, mapper, *, mapper_seed: int, mapper_samples: int,
                     n_steps: int, language: str | None = None, instruction_ids: np.ndarray | None = None
                     ) -> dict[str, torch.Tensor]:
    """The expensive, shareable part: text ids of every OK row + the instruction tables (of every instruction,
    or of ``instruction_ids`` only: `compute_instruction_tables`; such tensors are never saved as prepared)."""
    man = reader.ok_manifest
    texts = man["transcript"].fillna("").astype(str).tolist()
    flat, off = _tokenize_all(tokenizer, texts, row_languages(man, tokenizer, language))
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** 15):
        raise ValueError("text ids outside int16")
    style, mspk = compute_instruction_tables(reader, encoder, mapper, mapper_seed=mapper_seed,
                                             mapper_samples=mapper_samples, n_steps=n_steps, ids=instruction_ids)
    return {"text_flat": torch.from_numpy(flat.astype(np.int16)), "text_off": torch.from_numpy(off),
            "style_emb": style.contiguous(), "mapper_spk": mspk.contiguous()}


def save_prepared(path: str | Path, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
    from tts_core.checkpoint import save_state_dict_safetensors

    save_state_dict_safetensors(tensors, path, metadata={"format": PREPARED_FORMAT, "fingerprint": fingerprint})


def load_prepared(path: str | Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The prepared tensors at ``path`` when they were made from the same inputs, else None."""
    from tts_core.checkpoint import read_state_dict_safetensors

    path = Path(path)
    if not path.is_file():
        return None
    try:
        tensors, meta = read_state_dict_safetensors(path)
    except Exception as e:  # a foreign or damaged file is recomputed, not trusted
        log.warning("ignoring unreadable prepared file %s: %s", path, e)
        return None
    if meta.get("fingerprint") != fingerprint:
        log.info("prepared file %s was made from other inputs; recomputing", path)
        return None
    return tensors


def prepare_stage2_data(reader, tokenizer, encoder=None, mapper=None, *, mapper_meta: dict | None = None,
                        mapper_seed: int = 0, mapper_samples: int = 1, n_steps: int | None = None,
                        max_text_tokens: int = 2048, max_speech_tokens: int = 4096,
                        prepared: dict[str, torch.Tensor] | None = None,
                        prepared_path: str | Path | None = None, write_prepared: bool = True,
                        language: str | None = None, prompt_seconds: float = 6.0) -> Stage2Data:
    """Build `Stage2Data` from a finished cache store (module doc).

    ``prompt_seconds``: which stored prompt audio rows get — the T3 family's reference cut
    (`tts_core.t3.families.FamilySpec.prompt_seconds`: 6 s, Turbo 15 s; `cache.schema.PROMPTS`).

    ``prepared``: tensors from `compute_prepared` / `load_prepared` (DDP ranks pass what rank 0 wrote).
    Otherwise ``prepared_path`` is reused when its fingerprint matches, else computed with
    ``encoder`` + ``mapper`` and (``write_prepared``) saved there.
    """
    from cache import schema

    if n_steps is None:
        if mapper is None:
            raise ValueError("n_steps is required without a mapper")
        n_steps = int(mapper.config.n_steps)
    fp = prepared_fingerprint(reader, tokenizer, mapper_meta or {}, mapper_seed=mapper_seed,
                              mapper_samples=mapper_samples, n_steps=n_steps, language=language)
    if prepared is None and prepared_path is not None:
        prepared = load_prepared(prepared_path, fp)
    if prepared is None:
        if encoder is None or mapper is None:
            raise ValueError("no prepared tensors and no encoder/mapper to compute them")
        prepared = compute_prepared(reader, tokenizer, encoder, mapper, mapper_seed=mapper_seed,
                                    mapper_samples=mapper_samples, n_steps=n_steps, language=language)
        if prepared_path is not None and write_prepared:
            save_prepared(prepared_path, prepared, fp)

    man = reader.ok_manifest
    n_ok = len(reader)
    text_off = prepared["text_off"].numpy().astype(np.int64)
    if len(text_off) != n_ok + 1:
        raise ValueError(f"prepared text ids cover {len(text_off) - 1} rows, the store has {n_ok}")
    # speech tokens: the store's flat array, addressed through its offsets (no per-clip copies)
    speech_flat, s_start, s_len = _ragged(reader, schema.TOKEN_OFFSETS, schema.TOKENS)
    stored_prompt = schema.prompt_arrays(prompt_seconds)
    prompt_flat, p_start, p_len = _ragged(reader, stored_prompt.offsets, stored_prompt.flat)
    t_start, t_len = text_off[:-1], np.diff(text_off)
    spk_raw = np.asarray(reader.spk_emb(raw=True), dtype=np.float32)
    captions, no_text = _captions(reader, n_ok)
    iid = captions.first
    rows, dropped = _kept_rows(s_len, t_len, spk_raw, max_text_tokens, max_speech_tokens)
    data = Stage2Data(
        clip_ids=man["clip_id"].astype(str).to_numpy()[rows].tolist(),
        text_flat=prepared["text_flat"], text_start=t_start[rows], text_len=t_len[rows],
        speech_flat=speech_flat, speech_start=s_start[rows], speech_len=s_len[rows],
        prompt_flat=prompt_flat, prompt_start=p_start[rows], prompt_len=p_len[rows],
        spk=F.normalize(torch.from_numpy(spk_raw[rows]), dim=-1), instruction_id=iid[rows],
        captions=captions.subset(rows),
        style_emb=prepared["style_emb"].float(), mapper_spk=prepared["mapper_spk"].float(),
        speaker_code=_speaker_codes(man, rows), dropped=dropped,
        meta={"fingerprint": fp, "store_rows": rows, "n_ok": n_ok, "empty_instruction_rows": int(no_text[rows].sum()),
              "mapper_seed": mapper_seed,
              "mapper_samples": mapper_samples, "n_steps": n_steps, "prompt_seconds": stored_prompt.seconds},
    )
    if data.text_flat.numel() and int(data.text_flat.max()) >= tokenizer.vocab_size:
        raise ValueError("prepared text ids exceed the tokenizer's vocabulary (stale prepared file?)")
    n_drop = sum(dropped.values())
    if n_drop:
        log.info("stage2 data: kept %d of %d rows; dropped %s", len(rows), n_ok,
                 {k: v for k, v in dropped.items() if v})
    return data


def _ragged(reader, offsets: str, flat: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(the store's flat int16 array, start and length of each OK row) of one ragged array."""
    ok = np.asarray(reader.ok_index, np.int64)
    off = np.asarray(reader.group[offsets][:], dtype=np.int64)
    values = torch.from_numpy(np.asarray(reader.group[flat][:]).astype(np.int16))
    return values, off[ok], off[ok + 1] - off[ok]


def _captions(reader, n_ok: int) -> tuple[CaptionTable, np.ndarray]:
    """(each OK row's captions, [n_ok] bool: its own instruction has no text states). An instruction with no text
    states (empty text) pools to a zero vector: its captions are dropped, so a row left without any has none."""
    from cache import schema

    iid = np.asarray(reader.instruction_id(), np.int64)
    inst_off = np.asarray(reader.group[schema.INSTRUCTION_OFFSETS][:], dtype=np.int64)
    empty_inst = np.diff(inst_off) == 0
    no_text = (iid >= 0) & empty_inst[np.clip(iid, 0, None)] if len(empty_inst) else np.zeros(n_ok, bool)
    # a clip's instructions (one per clip in a store without more), less those without text states
    captions = reader.captions
    return captions.keep(~empty_inst[captions.ids] if len(empty_inst) else np.ones(captions.n_captions, bool)), no_text


def _kept_rows(s_len: np.ndarray, t_len: np.ndarray, spk_raw: np.ndarray, max_text_tokens: int,
               max_speech_tokens: int) -> tuple[np.ndarray, dict[str, int]]:
    """(rows kept, rows dropped per reason — each counted under its first failing check; module doc)."""
    norms = np.linalg.norm(spk_raw, axis=1)
    checks = {
        "no_speech_tokens": s_len == 0,
        "empty_text": t_len == 0,
        "text_too_long": t_len > max_text_tokens,
        "speech_too_long": s_len > max_speech_tokens,
        "degenerate_spk_emb": ~np.isfinite(spk_raw).all(1) | (norms <= 1e-12),
    }
    keep = np.ones(len(s_len), bool)
    dropped = {}
    for reason, bad in checks.items():
        dropped[reason] = int((bad & keep).sum())
        keep &= ~bad
    return np.flatnonzero(keep), dropped


def _speaker_codes(manifest, rows: np.ndarray) -> np.ndarray:
    """[len(rows)] speaker index of each kept row (manifest ``speaker``), −1 where empty or absent."""
    speakers = (manifest["speaker"].fillna("").astype(str).to_numpy() if "speaker" in manifest.columns
                else np.array([""] * len(manifest), dtype=object))
    sp = speakers[rows]
    code = np.full(len(rows), -1, np.int64)
    known = sp != ""
    if known.any():
        _, inv = np.unique(sp[known], return_inverse=True)
        code[known] = inv
    return code
