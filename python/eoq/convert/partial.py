"""The partial folder ``.<out>.eoq-partial``: what an interrupted conversion resumes from
(the layout is in eoq.convert.pipeline's docstring). Every file is written under a temporary
name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Optional

import torch


class Partial:
    def __init__(self, out: pathlib.Path, state: dict):
        self.root = out.parent / f".{out.name}.eoq-partial"
        self.parts = self.root / "parts"
        self.state = state
        state_file = self.root / "state.json"
        if state_file.is_file():
            old = json.loads(state_file.read_text())
            if old != state:
                raise ValueError(f"{self.root} holds an interrupted conversion with a different config or source; "
                                 f"run it with the same settings to resume, or delete that folder")
        else:
            if self.root.exists():
                shutil.rmtree(self.root)
            self.parts.mkdir(parents=True)
            atomic_write(state_file, json.dumps(state, indent=2, sort_keys=True))

    def part_path(self, name: str) -> pathlib.Path:
        return self.parts / (hashlib.sha1(name.encode()).hexdigest()[:20] + ".safetensors")

    def load(self, name: str) -> Optional[dict]:
        path = self.part_path(name)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        if meta.get("name") != name:
            raise ValueError(f"{path}: part file of {meta.get('name')!r}, expected {name!r}")
        return json.loads(meta["entry"])

    def save(self, name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.part_path(name)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"name": name, "entry": json.dumps(entry, sort_keys=True)})
        os.replace(tmp, path)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.part_path(name)))


def atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
