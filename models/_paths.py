"""Writes that stay inside the data dir, whatever names peers send.

Names from the network are checked against strict patterns at the wire boundary; this
is the second lock, at the point of writing: the final path must resolve inside its
root, so neither a pattern with a hole, nor ``..``, an absolute part, or a symlink
planted in the data dir can send a write elsewhere.
"""

from pathlib import Path

from ._errors import PathEscapeError


def inside(root: Path, *parts: str) -> Path:
    """``root/parts...``, or PathEscapeError if that does not resolve inside ``root``."""
    path = root.joinpath(*parts)
    resolved_root = root.resolve()
    resolved = path.resolve()
    if resolved == resolved_root or not resolved.is_relative_to(resolved_root):
        raise PathEscapeError(f"{'/'.join(parts)!r} would be written outside {root}")
    return path
