"""Pictures in Prefect markdown artifacts: embedded as ``data:`` URIs, since the UI cannot load a local file.

A markdown artifact is rendered by the browser of whoever opens Prefect's UI — usually not on the machine that wrote
the picture — so ``![loss curves](loss_curves.png)`` or a ``file://`` path is a broken image there (issue #23).
`embed_pictures` rewrites every image link of a report to a ``data:image/png;base64,…`` URI, which the UI's markdown
renderer keeps (checked in a headless browser: docs/img/prefect-artifact-picture.png); a picture that is missing or
over ``MAX_BYTES`` is named as text instead. `publish_markdown` is the one way the flows publish a report.
"""
from __future__ import annotations

import base64
import re
from pathlib import Path, PurePosixPath

IMAGE = re.compile(r"!\[([^\]]*)\]\(\s*<?([^)\s>]+)>?\s*\)")
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".svg": "image/svg+xml"}
MAX_BYTES = 2_000_000  # per picture, before base64: a report's plots are 20-200 kB; the UI stays responsive
_REMOTE = ("data:", "http://", "https://")


def local_image_links(markdown: str) -> list[str]:
    """The image targets of ``markdown`` that a browser elsewhere cannot load (not data: / http(s): URIs)."""
    return [m.group(2) for m in IMAGE.finditer(markdown) if not m.group(2).startswith(_REMOTE)]


def picture(path: str | Path, alt: str) -> str:
    """A markdown image line for a local picture (`embed_pictures` turns it into a data URI)."""
    return f"![{alt}]({path})"


def _read(target: str, base: str | Path | None) -> bytes | None:
    import fsspec

    path = target.removeprefix("file://")
    if base is not None and "://" not in path and not PurePosixPath(path).is_absolute():
        path = f"{str(base).rstrip('/')}/{path}"
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def embed_pictures(markdown: str, base: str | Path | None = None, max_bytes: int = MAX_BYTES) -> str:
    """Every local image link (relative to ``base``, a directory path or fsspec URL) → a data URI, or, for a
    picture that cannot be read, is not an image type or is over ``max_bytes``, its name as text."""
    def sub(m: re.Match) -> str:
        alt, target = m.group(1), m.group(2)
        if target.startswith(_REMOTE):
            return m.group(0)
        mime = MIME.get(Path(target).suffix.lower())
        data = _read(target, base) if mime else None
        if data is None or len(data) > max_bytes:
            why = "not embedded: missing" if data is None else f"not embedded: {len(data) / 1e3:.0f} kB over {max_bytes / 1e3:.0f} kB"
            return f"*{alt or 'picture'}*: `{target}` ({why})"
        return f"![{alt}](data:{mime};base64,{base64.b64encode(data).decode('ascii')})"

    return IMAGE.sub(sub, markdown)


def publish_markdown(markdown: str, *, key: str, description: str, base: str | Path | None = None) -> str:
    """`create_markdown_artifact` with the pictures embedded; returns what was published."""
    from prefect.artifacts import create_markdown_artifact

    text = embed_pictures(markdown, base)
    create_markdown_artifact(text, key=key, description=description)
    return text
