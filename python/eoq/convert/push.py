"""Uploading an eoq folder to the Hugging Face hub (huggingface_hub), after checking it."""

from __future__ import annotations

import pathlib
from typing import Optional

from ..format import repo


def folder_files(folder) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file that would be uploaded: all but hidden ones."""
    folder = pathlib.Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and not p.name.endswith(".tmp"):
            out.append((rel.as_posix(), p.stat().st_size))
    return out


def push(folder, repo_id: str, dry_run: bool = False, private: bool = False, token: Optional[str] = None,
         verify: bool = True, commit_message: Optional[str] = None) -> list[tuple[str, int]]:
    """Verify the folder (manifest, every checksum and code stream) and upload it; with
    dry_run, only return what would be uploaded."""
    folder = pathlib.Path(folder)
    manifest = repo.read_manifest(folder)
    for required in ("config.json", "README.md", "load_quantized.py"):
        if not (folder / required).is_file():
            raise repo.FormatError(f"{folder}: {required} is missing; not a complete eoq folder")
    if verify:
        from ..load.loader import read_state_dict
        read_state_dict(folder)  # raises on any damaged tensor
    files = folder_files(folder)
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    qc = manifest["config"]
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=[".*", "*.tmp"],
                      commit_message=commit_message or f"eoq {qc['method']} {qc['bits']} bits")
    return files
