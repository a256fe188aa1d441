"""Open a cache store (local path or any fsspec URL) and check what it was built with.

Both the writer and the reader go through here, so the compatibility rules live in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import zarr
from zarr.codecs import BloscCodec

from cache import schema
from tts_core.identity import ModelIdentity


class StoreError(Exception):
    """A store that cannot be used as asked; the message says why and what to do instead."""


def compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


def open_group(url: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(store=url, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        raise StoreError(f"no cache store at {url}; build one with `instruct-tts build-cache`") from None


def store_exists(url: str) -> bool:
    try:
        open_group(url, "r")
        return True
    except StoreError:
        return False


@dataclass(frozen=True)
class StoreInfo:
    """The store-level attributes, typed."""

    schema_version: int
    models: dict[str, ModelIdentity]
    normalisation: schema.Normalisation
    text_hidden_size: int
    chunk_rows: int
    n_rows: int
    n_instructions: int
    lines_digest: str
    committed_rows: int
    committed_instructions: int
    complete: bool
    extra: Mapping[str, Any]

    @classmethod
    def from_attrs(cls, url: str, attrs: Mapping[str, Any]) -> "StoreInfo":
        version = attrs.get("schema_version")
        if version != schema.SCHEMA_VERSION:
            raise StoreError(f"{url} has cache schema {version}; this code reads schema {schema.SCHEMA_VERSION}. "
                             "Rebuild the store with this version.")
        return cls(
            schema_version=version,
            models={k: ModelIdentity.from_dict(v) for k, v in attrs["models"].items()},
            normalisation=schema.Normalisation.from_dict(attrs["normalisation"]),
            text_hidden_size=int(attrs["text_hidden_size"]),
            chunk_rows=int(attrs["chunk_rows"]),
            n_rows=int(attrs["n_rows"]),
            n_instructions=int(attrs["n_instructions"]),
            lines_digest=attrs["lines_digest"],
            committed_rows=int(attrs["committed_rows"]),
            committed_instructions=int(attrs["committed_instructions"]),
            complete=bool(attrs["complete"]),
            extra=dict(attrs.get("extra", {})),
        )


def check_identities(url: str, recorded: Mapping[str, ModelIdentity], loaded: Mapping[str, ModelIdentity]) -> None:
    """Refuse to mix outputs of different weights in one store."""
    problems = []
    for role in schema.MODEL_ROLES:
        a, b = recorded.get(role), loaded.get(role)
        if a is None or b is None or not a.same_model(b):
            problems.append(
                f"  {role}: store has {a.name if a else None} (sha256 {a.sha256[:12] if a else '-'}), "
                f"this run loads {b.name if b else None} (sha256 {b.sha256[:12] if b else '-'})")
    if problems:
        raise StoreError(
            f"{url} was built with other frozen-model weights:\n" + "\n".join(problems)
            + "\nUse a new --store, or point the model options at the weights the store was built with.")
