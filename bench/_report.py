"""The benchmarks' ``--json PATH``: every figure of a run written as JSON, its folder made if
needed, under a temporary name renamed into place (a run killed mid-write leaves the last
complete file). One writer for every script in bench/."""

from __future__ import annotations

import json
import os
import pathlib


def write_json(path, obj, indent: int = 1) -> pathlib.Path:
    """Write ``obj`` to ``path`` (values JSON cannot hold are written as their str())."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    os.replace(tmp, path)
    return path
