"""Checkpoint files named by ``--ckpt_path``: is one damaged, and which intact ones lie beside it.

The ``lightning-mtl`` command (:mod:`lightning_mtl.cli`) checks the checkpoint it was given before anything runs:
a truncated or damaged file stops the command with a ``ValueError`` naming the file and the intact checkpoints in
its folder, newest first (:func:`damaged_message`). It never falls back to another checkpoint by itself: that
would resume from a different step without saying so.
"""

from __future__ import annotations

import os
import zipfile
from typing import Optional

from lightning.fabric.utilities.cloud_io import get_filesystem


def checkpoint_damage(path: str) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be loaded (truncated or corrupt zip archive), or None if it looks whole.

    ``torch.save`` writes a zip archive whose central directory comes last, so a truncated file lacks it (reading
    the directory is cheap; the members are not read). A missing file or one in torch's legacy (non-zip) format is
    left to ``torch.load``.
    """
    fs = get_filesystem(path)
    if not fs.isfile(path):
        return None
    with fs.open(path, "rb") as file:
        if file.read(4) != b"PK\x03\x04":
            return None
        file.seek(0)
        try:
            with zipfile.ZipFile(file):
                pass
        except (zipfile.BadZipFile, EOFError, OSError) as error:
            return f"it starts as a zip archive but is incomplete ({error}); probably cut short while written or copied"
    # Member CRCs are not checked: torch.serialization.set_crc32_options(False) writes intact files without them.
    return None


def _intact_siblings(path: str, limit: int = 3) -> list[str]:
    """Up to ``limit`` intact ``.ckpt`` files in ``path``'s folder other than ``path``, newest first."""
    folder = os.path.dirname(path)
    fs = get_filesystem(folder)
    name = os.path.basename(path)
    others = [p for p in fs.ls(folder, detail=False) if p.endswith(".ckpt") and os.path.basename(p) != name]
    intact = []
    for other in sorted(others, key=fs.modified, reverse=True):
        candidate = os.path.join(folder, os.path.basename(other))
        if checkpoint_damage(candidate) is None:
            intact.append(candidate)
            if len(intact) == limit:
                break
    return intact


def damaged_message(given: str, path: str, damage: str) -> str:
    """The error for ``--ckpt_path given`` (resolved to ``path``) whose file is damaged as ``damage`` says."""
    intact = _intact_siblings(path)
    source = f"--ckpt_path {given!r} resolves to {path}" if given != path else f"--ckpt_path {path}"
    advice = (
        f"Intact checkpoints in {os.path.dirname(path)}, newest first: {', '.join(intact)}. Pass one with --ckpt_path."
        if intact
        else f"No intact checkpoint was found in {os.path.dirname(path)}."
    )
    return (
        f"{source}, which cannot be loaded: {damage}. {advice} (The CLI does not pick another checkpoint by itself: "
        "resuming from a different step without saying so would be wrong.)"
    )
