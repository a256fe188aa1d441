"""Everything stage 1 trains on, in memory as torch tensors, plus the held-out split rule.

`Stage1Data.from_reader(reader)` loads it from a finished cache store (`cache.reader.CacheReader`);
`Stage1Data(...)` builds it from arrays (tests, synthetic data). Training moves the per-clip tables to
the device once; instruction states are gathered per batch (`tts_core.stage1.states`).

What is kept
------------
* only clips with an instruction (``instruction_id >= 0``) and non-degenerate vectors (raw norm > 0);
  the others are counted in ``dropped``;
* ``spk`` [N, 256] and ``xvec`` [N, 192] are L2-normalised here whatever the store's normalisation
  setting (the flow target is built from unit vectors; normalising twice is a no-op);
* ``states``: a states source over the *unique* instructions (`tts_core.stage1.states`: the ragged
  table in memory, or streamed from the store when it exceeds ``states_in_memory_mb``), so a clip
  reaches its text states through ``instruction_id`` (no per-clip copy) and the padded
  [U, Lmax, H] table never exists. ``lengths`` [U] = ``states.lengths``. A padded tensor is accepted
  (tests, synthetic data) and converted to the ragged form.

Held-out split rule (`split_rows`)
----------------------------------
The instruction describes the voice, so what must not leak between train and held-out is the
*instruction text*, not the clip or the speaker. Each unique instruction text is normalised
(Unicode NFKC, case-folded, whitespace collapsed) and hashed with a salt (blake2b, 64 bits); the text
is held out when ``hash / 2**64 < held_out_frac``. Every clip goes where its instruction text goes, so
no instruction text — nor a trivially re-cased / re-spaced copy of it — is in both splits. The rule is
deterministic, independent of row order and of the other rows (a growing dataset never moves a clip
between splits). For tiny data where the hash puts every text on one side, the one text with the
smallest (resp. largest) hash is moved, so both splits are non-empty whenever there are ≥ 2 texts.

Captions (many instructions per clip)
-------------------------------------
A clip may have several captions (``captions``, a `cache.captions.CaptionTable` over the kept clips:
their instruction ids, each clip's own line's first; `cache.reader.CacheReader.captions`). The split is
made over the (clip, caption) pairs, by the same rule: each *caption* goes where its text goes, so
``split`` returns caption indices (with one caption per clip they are the clip rows). A clip whose
captions fall on both sides trains on its training captions only (its held-out captions are never
trained) and is evaluated on its held-out captions — the question a held-out wording asks, with the
voice itself possibly seen under another wording. ``train_captions`` turns the training captions into
clips + their captions; training draws one caption per clip per epoch (`tts_core.stage1.batches`), so
a clip with five captions is not five times as frequent.

Why by instruction by default: the mapper's job is to read a *description*; a held-out description of
a voice it trained on still tests that. With ``split_by="speaker"`` (needs the metadata's speaker
column) the stricter question — unseen speakers *and* unseen descriptions — is asked instead: speakers
are hashed the same way (salt + "/speaker"), every clip of a held-out speaker is held out, and train
clips whose instruction text also occurs among held-out clips are dropped from both sides, so neither a
speaker nor an instruction text is shared. Sensible with many speakers; with the demo's 8 voices it holds
out one or two whole voices.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cache.captions import CaptionTable
from tts_core.stage1.states import InstructionStates, RaggedStates, load_states

SPK_DIM = 256
XVEC_DIM = 192


def normalise_instruction(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", str(text)).casefold()).strip()


def instruction_hash(text: str, salt: str) -> float:
    """Uniform in [0, 1) — the position of a (normalised) instruction text on the split line."""
    h = hashlib.blake2b(f"{salt}\x00{normalise_instruction(text)}".encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "big") / 2.0 ** 64


def _held_keys(keys: Sequence[str], held_out_frac: float, salt: str) -> set[str]:
    """Keys whose salted hash falls below ``held_out_frac``; both sides non-empty when ≥ 2 keys."""
    keys = sorted(set(keys))
    hashes = {k: instruction_hash(k, salt) for k in keys}
    held = {k for k in keys if hashes[k] < held_out_frac}
    if len(keys) >= 2:
        if not held:
            held = {min(keys, key=hashes.__getitem__)}
        elif len(held) == len(keys):
            held.discard(max(keys, key=hashes.__getitem__))
    return held


def split_rows(instruction_id: np.ndarray, instruction_texts: Sequence[str], held_out_frac: float = 0.05,
               salt: str = "instruct-tts/stage1", speakers: Sequence[str] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Rows (clips) → (train_rows, held_out_rows), sorted int64 (module doc, "Held-out split rule").

    ``speakers`` (one per row, "" when unknown) switches to the speaker rule: held-out = the clips of
    hashed-out speakers, and train rows whose instruction text also occurs in held-out are dropped."""
    instruction_id = np.asarray(instruction_id, dtype=np.int64)
    if held_out_frac <= 0:
        return np.arange(len(instruction_id), dtype=np.int64), np.zeros(0, dtype=np.int64)
    if speakers is not None:
        return _split_by_speaker(instruction_id, instruction_texts, held_out_frac, salt, speakers)
    used = np.unique(instruction_id)
    norm = {int(i): normalise_instruction(instruction_texts[int(i)]) for i in used}
    held = _held_keys(list(norm.values()), held_out_frac, salt)
    held_ids = np.array(sorted(i for i, t in norm.items() if t in held), dtype=np.int64)
    is_held = np.isin(instruction_id, held_ids)
    return np.flatnonzero(~is_held).astype(np.int64), np.flatnonzero(is_held).astype(np.int64)


def _split_by_speaker(instruction_id: np.ndarray, instruction_texts: Sequence[str], held_out_frac: float, salt: str,
                      speakers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    sp = np.asarray([str(x or "") for x in speakers])
    if len(sp) != len(instruction_id):
        raise ValueError(f"{len(sp)} speakers for {len(instruction_id)} rows")
    known = sp != ""
    if not known.any():
        raise ValueError("split by speaker needs a speaker column in the metadata (4th field); none is filled")
    held_sp = _held_keys(sp[known].tolist(), held_out_frac, salt + "/speaker")
    is_held = np.isin(sp, sorted(held_sp)) & known
    norm = np.asarray([normalise_instruction(instruction_texts[int(i)]) for i in instruction_id])
    held_texts = set(norm[is_held])
    leaks = ~is_held & np.isin(norm, sorted(held_texts))  # same text as a held-out clip: used by neither side
    return np.flatnonzero(~is_held & ~leaks).astype(np.int64), np.flatnonzero(is_held).astype(np.int64)


@dataclass
class Stage1Data:
    spk: torch.Tensor  # float32 [N, 256], L2-normalised
    xvec: torch.Tensor  # float32 [N, 192], L2-normalised
    instruction_id: torch.Tensor  # int64 [N], row of states
    states: InstructionStates  # one entry per unique instruction (or a padded [U, Lmax, H] tensor + lengths)
    clip_ids: list[str]
    instruction_texts: list[str]  # [U]
    text_encoder_identity: dict  # ModelIdentity.to_dict() of the encoder that produced `states`
    lengths: torch.Tensor | None = None  # int64 [U]; given only beside a padded tensor (= states.lengths)
    speakers: list[str] | None = None
    cache_identity: dict = field(default_factory=dict)  # where the data came from (store url, digests, models)
    dropped: dict = field(default_factory=dict)  # reason -> count of clips not kept
    captions: CaptionTable | None = None  # each clip's instruction ids, its own first; None: one per clip

    def __post_init__(self):
        self.spk = F.normalize(torch.as_tensor(self.spk, dtype=torch.float32), dim=-1)
        self.xvec = F.normalize(torch.as_tensor(self.xvec, dtype=torch.float32), dim=-1)
        self.instruction_id = torch.as_tensor(self.instruction_id, dtype=torch.long)
        if not isinstance(self.states, InstructionStates):
            if not torch.as_tensor(self.states).is_floating_point():
                raise TypeError("states must be floating point")
            if self.lengths is None:
                raise ValueError("a padded states tensor needs its lengths")
            try:
                self.states = RaggedStates.from_padded(self.states, self.lengths)
            except ValueError as e:
                raise ValueError(f"invalid Stage1Data: {e}") from None
        elif self.lengths is not None and not torch.equal(torch.as_tensor(self.lengths).long(), self.states.lengths):
            raise ValueError("invalid Stage1Data: lengths disagree with the states source")
        self.lengths = self.states.lengths
        if hasattr(self.text_encoder_identity, "to_dict"):
            self.text_encoder_identity = self.text_encoder_identity.to_dict()
        self.clip_ids = [str(c) for c in self.clip_ids]
        self.instruction_texts = [str(t) for t in self.instruction_texts]
        if self.captions is None:
            self.captions = CaptionTable.one_per_clip(self.instruction_id.numpy())
        self.validate()

    def validate(self) -> None:
        N, U = self.n_clips, self.n_instructions
        problems = []
        if self.spk.shape != (N, SPK_DIM):
            problems.append(f"spk is {tuple(self.spk.shape)}, expected [{N}, {SPK_DIM}]")
        if self.xvec.shape != (N, XVEC_DIM):
            problems.append(f"xvec is {tuple(self.xvec.shape)}, expected [{N}, {XVEC_DIM}]")
        if len(self.clip_ids) != N:
            problems.append(f"{len(self.clip_ids)} clip ids for {N} clips")
        if self.speakers is not None and len(self.speakers) != N:
            problems.append(f"{len(self.speakers)} speakers for {N} clips")
        if len(self.instruction_texts) != U:
            problems.append(f"{U} state rows, {len(self.instruction_texts)} texts")
        if N and (int(self.instruction_id.min()) < 0 or int(self.instruction_id.max()) >= U):
            problems.append("instruction_id out of range [0, U)")
        if not (torch.isfinite(self.spk).all() and torch.isfinite(self.xvec).all()):
            problems.append("non-finite speaker vectors")
        try:  # every kept clip has an instruction, so every clip has ≥ 1 caption, its instruction_id first
            self.captions.check_first(self.instruction_id.numpy())
        except ValueError as e:
            problems.append(f"captions: {e}")
        else:
            if self.captions.n_captions and int(self.captions.ids.max()) >= U:
                problems.append("caption ids out of range [0, U)")
        if problems:
            raise ValueError("invalid Stage1Data: " + "; ".join(problems))

    # ---- sizes --------------------------------------------------------------------------------------
    @property
    def n_clips(self) -> int:
        return int(self.instruction_id.shape[0])

    @property
    def n_instructions(self) -> int:
        return self.states.n_instructions

    @property
    def n_captions(self) -> int:
        return self.captions.n_captions

    def train_captions(self, captions: np.ndarray) -> tuple[np.ndarray, CaptionTable]:
        """Caption indices (sorted, e.g. the train side of `split`) → (clip rows [n], their table): each clip
        with at least one of the given captions, once, with those captions only."""
        kept = self.captions.keep(np.asarray(captions, np.int64))
        rows = np.flatnonzero(kept.counts > 0)
        return rows, kept.subset(rows)

    @property
    def hidden_size(self) -> int:
        return self.states.hidden_size

    def fingerprint(self) -> str:
        """Digest of what defines a run's data (clip ids, instruction ids/texts, shapes, text encoder)."""
        h = hashlib.sha256()
        h.update(f"{self.n_clips}/{self.n_instructions}/{tuple(self.states.shape)}".encode())
        h.update("\n".join(self.clip_ids).encode())
        h.update(self.instruction_id.numpy().astype("<i8").tobytes())
        h.update("\n".join(self.instruction_texts).encode())
        h.update(self.lengths.numpy().astype("<i8").tobytes())
        if self.n_captions != self.n_clips:  # one caption per clip digests as before
            h.update(self.captions.digest_bytes())
        ident = self.text_encoder_identity or {}
        h.update(f"{ident.get('name')}/{ident.get('sha256')}".encode())
        return h.hexdigest()

    def split(self, held_out_frac: float = 0.05, salt: str = "instruct-tts/stage1", by: str = "instruction"
              ) -> tuple[np.ndarray, np.ndarray]:
        """(train captions, held-out captions): sorted indices into the caption table (module doc; with one
        caption per clip, clip rows)."""
        if by not in ("instruction", "speaker"):
            raise ValueError(f"split by 'instruction' or 'speaker', not {by!r}")
        if by == "speaker" and not self.speakers:
            raise ValueError("split by speaker needs the cache's manifest to have a speaker column (metadata's "
                             "4th field); this data has none — use split_by='instruction'")
        speakers = [self.speakers[i] for i in self.captions.clip_of] if by == "speaker" else None
        return split_rows(self.captions.ids, self.instruction_texts, held_out_frac, salt, speakers=speakers)

    def split_of_run(self, train_config: dict) -> tuple[np.ndarray, np.ndarray]:
        """The split a stage-1 run made, from the ``train_config`` its mapper.json records (a setting an
        older run does not record takes `split`'s default)."""
        names = {"held_out_frac": "held_out_frac", "split_salt": "salt", "split_by": "by"}
        return self.split(**{arg: train_config[k] for k, arg in names.items() if k in train_config})

    def mean_pooled_states(self, ids: np.ndarray | None = None, chunk: int = 256, device="cpu") -> torch.Tensor:
        """Mean over real tokens of instructions ``ids`` (default all) of the raw states → float32 [n, H]."""
        return self.states.mean_pool(np.arange(self.n_instructions) if ids is None else ids, chunk, device)

    # ---- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_reader(cls, reader: Any, with_states: bool = True, states_in_memory_mb: float = 2048,
                    states_cache_mb: float = 1024) -> "Stage1Data":
        """Load from a `cache.reader.CacheReader` (or anything with its API; module doc).

        States: the ragged table in memory when it is at most ``states_in_memory_mb``, else streamed
        through a ``states_cache_mb`` chunk cache (`tts_core.stage1.states.load_states`).
        ``with_states=False`` reads no states (zero lengths): enough for the split and the vectors."""
        spk = np.asarray(reader.spk_emb(raw=True), dtype=np.float32)  # normalised below, once
        xvec = np.asarray(reader.xvec(raw=True), dtype=np.float32)
        iid = np.asarray(reader.instruction_id(), dtype=np.int64)
        captions: CaptionTable = reader.captions
        man = reader.ok_manifest
        if not (len(spk) == len(xvec) == len(iid) == len(man) == captions.n_clips):
            raise ValueError(f"reader tables disagree: spk {len(spk)}, xvec {len(xvec)}, ids {len(iid)}, "
                             f"manifest {len(man)}, captions {captions.n_clips}")
        states = (load_states(reader, states_in_memory_mb, states_cache_mb) if with_states
                  else RaggedStates.empty(reader.n_instructions, reader.text_hidden_size))
        texts = list(reader.instruction_texts)
        keep = iid >= 0
        dropped = {"no_instruction": int((~keep).sum())}
        degenerate = keep & ((np.linalg.norm(spk, axis=1) <= 1e-12) | (np.linalg.norm(xvec, axis=1) <= 1e-12)
                             | ~np.isfinite(spk).all(1) | ~np.isfinite(xvec).all(1))
        dropped["degenerate_vector"] = int(degenerate.sum())
        keep &= ~degenerate
        speakers = None
        if "speaker" in man.columns:
            sp = man["speaker"].fillna("").astype(str).tolist()
            if any(sp):
                speakers = [s for s, k in zip(sp, keep) if k]
        identities = reader.identities
        te = identities["text_encoder"]
        return cls(
            spk=torch.from_numpy(spk if keep.all() else spk[keep]),
            xvec=torch.from_numpy(xvec if keep.all() else xvec[keep]),
            instruction_id=torch.from_numpy(iid[keep]),
            states=states,
            clip_ids=man["clip_id"].astype(str)[keep].tolist(),
            instruction_texts=texts,
            text_encoder_identity=te.to_dict() if hasattr(te, "to_dict") else dict(te),
            speakers=speakers,
            cache_identity=_cache_identity(reader),
            dropped=dropped,
            captions=captions.subset(np.flatnonzero(keep)),
        )


def _cache_identity(reader: Any) -> dict:
    info = getattr(reader, "info", None)
    out: dict = {"url": str(getattr(reader, "url", ""))}
    for key in ("schema_version", "lines_digest", "n_rows", "n_instructions", "text_hidden_size"):
        if info is not None and hasattr(info, key):
            out[key] = getattr(info, key)
    out["models"] = {k: (v.to_dict() if hasattr(v, "to_dict") else dict(v)) for k, v in reader.identities.items()}
    return out
