"""Seeds derived from names: one generator per (run seed, purpose, epoch, batch, ...), independent of the
process, the device, the rank and Python's per-process str hash — so a resumed or distributed run draws the same."""
from __future__ import annotations

import hashlib
from typing import Any


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "big") >> 1
