"""Where the real data lives: ``$TORCH_NVDLA_DATA``, else ``../shared/data`` beside the project."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV", "data_root"]

DATA_ENV = "TORCH_NVDLA_DATA"


def data_root(required: bool = False) -> Path | None:
    """Return the shared data folder, or ``None`` when it is absent.

    Looks at ``$TORCH_NVDLA_DATA`` first, then ``../shared/data`` relative to the
    project root (the folder holding ``setup.py``) and to the working directory.

    Args:
        required: raise ``FileNotFoundError`` naming every place tried instead of
            returning ``None``.
    """
    env = os.environ.get(DATA_ENV)
    if env:  # an explicit choice is never silently replaced by a default
        if Path(env).is_dir():
            return Path(env)
        if required:
            raise FileNotFoundError(f"${DATA_ENV} points to {env}, which is not a folder")
        return None
    tried = []
    project = Path(__file__).resolve().parents[2]  # torch_nvdla/utils/paths.py -> the project
    tried += [project.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in tried:
        if candidate.is_dir():
            return candidate
    if required:
        raise FileNotFoundError(
            "real data folder not found; set $%s (tried: %s)" % (DATA_ENV, ", ".join(map(str, tried)))
        )
    return None
