"""Writes the seed corpora of the fuzz harnesses (nothing binary is committed):

    python tests/fuzz/make_corpus.py OUT_DIR      # OUT_DIR/rans, OUT_DIR/folder

rans: every valid seed stream of fuzz_rans.py as a raw input (first byte 0, then the stream),
and a few structured and unpack_bits inputs; folder: a few mutation programs of fuzz_folder.py
(any bytes are one). Deterministic: the same files every time.
"""

from __future__ import annotations

import hashlib
import pathlib
import random
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def write(folder: pathlib.Path, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


def main(out: str) -> None:
    import torch

    import eoq  # noqa: F401
    from eoq import ops
    from fuzz_rans import seed_streams

    root = pathlib.Path(out)
    rng = random.Random(1)
    for _, _, stream in seed_streams(ops, torch):
        write(root / "rans", b"\x00" + stream)
    for mode in range(2, 8):
        for _ in range(4):
            write(root / "rans", bytes([mode]) + rng.randbytes(rng.randint(8, 64)))
    for _ in range(16):
        write(root / "folder", rng.randbytes(rng.randint(4, 64)))
    print(f"{sum(1 for _ in root.rglob('*') if _.is_file())} seed inputs in {root}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/fuzz/corpus")
