"""Damaged and hostile copies of a converted folder, and a runner that loads each one.

``make_cases(base, root)`` writes one mutated copy of the folder `base` per case under
`root`: bytes flipped in every kind of stored tensor and in the safetensors header,
truncations, manifest fields changed with the checksums left as they were (damage) and
with the checksums recomputed (a folder written to deceive: validation must stop it before
anything is allocated), bad types, crafted rANS headers, non-finite side tensors, shard
indexes pointing outside the folder. Every case must fail with a clear FormatError on every
loader.

``python adversarial.py LOADER ROOT OUT.json`` loads every case under ROOT with one loader
(``read_state_dict``, ``load_quantized``, ``from_pretrained``, ``standalone``) in this process,
under an address-space cap (RLIMIT_AS = what the process holds after a first load + 1.5 GiB),
so a memory bomb fails as a finding instead of taking the machine; it writes
{case: [exception type, message]} ("ok" when the load succeeded).
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import struct
import sys

import torch

MANIFEST = "quant_manifest.json"
WEIGHTS = "model.safetensors"


# ---- editing a folder ------------------------------------------------------------------------


def manifest(folder: pathlib.Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def write_manifest(folder: pathlib.Path, m: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(m, indent=1))


def header_span(folder: pathlib.Path, key: str, file: str = WEIGHTS) -> tuple[int, int]:
    """Absolute byte range [begin, end) of tensor `key` in a safetensors file."""
    raw = (folder / file).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    b, e = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + b, 8 + n + e


def flip(folder: pathlib.Path, pos: int, file: str = WEIGHTS, mask: int = 0x10) -> None:
    path = folder / file
    raw = bytearray(path.read_bytes())
    raw[pos] ^= mask
    path.write_bytes(bytes(raw))


def reseal(folder: pathlib.Path) -> None:
    """Recompute every checksum from the bytes and fields now in the folder (a forger's step)."""
    from safetensors import safe_open

    from eoq.format import repo

    m = manifest(folder)
    handles = {}
    for name, e in m["tensors"].items():
        crc = 0
        if e.get("kind") != "tied":
            f = handles.setdefault(e["file"], safe_open(str(folder / e["file"]), "pt"))
            keys = repo.stored_keys(name, e)
            order = repo.part_order(keys) if repo.is_quantized(e) else ["tensor"]
            crc = repo.data_crc([f.get_tensor(keys[p]) for p in order])
        e["checksum"] = repo.entry_checksum(name, e, crc)
    m["checksum"] = repo.manifest_checksum(m)
    write_manifest(folder, m)


def rewrite_tensors(folder: pathlib.Path, edit) -> None:
    """Load the single weights file, let edit(tensors, manifest) change both, save, reseal."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS))
    m = manifest(folder)
    edit(tensors, m)
    for name, e in m["tensors"].items():  # keep the parts' specs true to the new tensors
        if "parts" in e:
            for part, spec in e["parts"].items():
                t = tensors.get(f"{name}.{part}")
                if t is not None:
                    spec["shape"] = list(t.shape)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    write_manifest(folder, m)
    reseal(folder)


def rans_header(n_symbols: int, chunk: int = 1 << 20) -> bytes:
    """A well-formed EOQR stream (header CRC valid, payloads of zeros) declaring n_symbols
    of one symbol: what a hostile folder would use as a decompression bomb."""
    from eoq import ops

    n_chunks = -(-n_symbols // chunk)
    head = b"EOQR" + bytes([1, 12, 32, 0]) + struct.pack("<QII", n_symbols, chunk, n_chunks)
    head += struct.pack("<H", 1) + struct.pack("<H", 1 << 12)
    head += struct.pack("<II", 128, 0) * n_chunks
    head += struct.pack("<I", ops.crc32c(torch.frombuffer(bytearray(head), dtype=torch.uint8)))
    return head + bytes(128 * n_chunks)


# ---- the cases -------------------------------------------------------------------------------


def make_cases(base: pathlib.Path, root: pathlib.Path) -> list[str]:
    """One mutated copy of `base` per case under root/<case>; returns the case names."""
    m0 = manifest(base)
    t0 = m0["tensors"]
    ecsq = next(n for n, e in t0.items() if e.get("method") == "ecsq" and "awq_scales" in e["parts"] and "layers" in n)
    plain_ecsq = next(n for n, e in t0.items() if e.get("method") == "ecsq")
    wide = next(n for n, e in t0.items() if e.get("meta", {}).get("low_bits", 0) > 0)  # ecsq codes past 8 bits
    absmax = next(n for n, e in t0.items() if e.get("method") == "absmax")
    polar = next(n for n, e in t0.items() if e.get("method") == "polar")
    passthrough = next(n for n, e in t0.items() if e["kind"] == "passthrough")
    tied = next(n for n, e in t0.items() if e["kind"] == "tied")
    marker = m0["marker"]
    cases = {}

    def case(name):
        def register(fn):
            cases[name] = fn
            return fn
        return register

    # bytes flipped in every kind of stored tensor (first, middle and last byte)
    for label, key in [("ecsq_codes", f"{ecsq}.codes"), ("ecsq_steps", f"{ecsq}.steps"),
                       ("awq_scales", f"{ecsq}.awq_scales"), ("ecsq_low", f"{wide}.low"),
                       ("absmax_codes", f"{absmax}.codes"),
                       ("absmax_scales", f"{absmax}.scales"), ("polar_codes", f"{polar}.codes"),
                       ("polar_codebook", f"{polar}.codebook"), ("passthrough", passthrough),
                       ("marker", marker)]:
        for where in ("first", "middle", "last"):
            @case(f"flip_{label}_{where}")
            def _(f, key=key, where=where):
                b, e = header_span(f, key)
                flip(f, {"first": b, "middle": (b + e) // 2, "last": e - 1}[where])

    # the safetensors header
    @case("header_key_renamed")
    def _(f):
        raw = (f / WEIGHTS).read_bytes()
        i = raw.index(f'"{plain_ecsq}.codes"'.encode()) + 3
        flip(f, i, mask=0x01)

    @case("header_dtype_changed")
    def _(f):
        raw = (f / WEIGHTS).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        i = raw.index(b'"F32"', 0, 8 + n)
        (f / WEIGHTS).write_bytes(raw[:i] + b'"I32"' + raw[i + 5:])

    @case("header_offset_digit")
    def _(f):
        raw = (f / WEIGHTS).read_bytes()
        i = raw.index(b'"data_offsets":[') + len(b'"data_offsets":[') + 1
        flip(f, i, mask=0x01)

    @case("header_length_plus_one")
    def _(f):
        raw = bytearray((f / WEIGHTS).read_bytes())
        raw[0] += 1
        (f / WEIGHTS).write_bytes(bytes(raw))

    @case("header_length_huge")
    def _(f):
        raw = (f / WEIGHTS).read_bytes()
        (f / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])

    # truncation
    for cut in (1, 1000, "half", "header"):
        @case(f"truncated_{cut}")
        def _(f, cut=cut):
            raw = (f / WEIGHTS).read_bytes()
            keep = {"half": len(raw) // 2, "header": 100}.get(cut, len(raw) - (cut if isinstance(cut, int) else 0))
            (f / WEIGHTS).write_bytes(raw[:keep])

    @case("weights_empty")
    def _(f):
        (f / WEIGHTS).write_bytes(b"")

    # manifest fields changed, checksums left as they were (damage)
    def field(name, path, value, entry_name):
        @case(f"lie_{name}")
        def _(f):
            m = manifest(f)
            d = m["tensors"][entry_name]
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value(d[path[-1]]) if callable(value) else value
            write_manifest(f, m)

    field("offset", ("meta", "offset"), lambda v: v + 1, plain_ecsq)
    field("seed", ("seed",), lambda v: v + 1, plain_ecsq)
    field("low_bits", ("meta", "low_bits"), lambda v: v + 1, wide)
    field("rotation_block", ("meta", "rotation_block"), lambda v: v // 2, plain_ecsq)
    field("transposed", ("transposed",), True, plain_ecsq)
    field("steps_shape", ("parts", "steps", "shape"), [2], plain_ecsq)
    field("group_rows_huge", ("meta", "group_rows"), 1 << 29, plain_ecsq)
    field("qshape_huge", ("qshape",), [1 << 28, 64], plain_ecsq)
    field("absmax_block", ("block_size",), 64, absmax)
    field("polar_signs", ("meta", "random_signs"), False, polar)
    field("passthrough_shape", ("shape",), [64, 2], passthrough)
    field("passthrough_dtype", ("dtype",), "float16", passthrough)
    field("tied_to", ("tied_to",), ecsq, tied)
    field("checksum_changed", ("checksum",), "crc32c:00000000", passthrough)
    # bad types
    field("offset_string", ("meta", "offset"), "3", plain_ecsq)
    field("shape_null", ("shape",), None, plain_ecsq)
    field("kind_number", ("kind",), 7, plain_ecsq)
    field("code_shape_string", ("code_shape",), "x", plain_ecsq)
    field("parts_null", ("parts",), None, plain_ecsq)
    field("meta_list", ("meta",), [1, 2], plain_ecsq)
    field("seed_negative", ("seed",), -1, plain_ecsq)
    field("seed_2_64", ("seed",), 1 << 64, plain_ecsq)
    field("bits_nan", ("bits",), float("nan"), plain_ecsq)
    field("codec_unknown", ("codec",), "zip", plain_ecsq)
    field("method_unknown", ("method",), "gptq", plain_ecsq)
    field("file_traversal", ("file",), "../model.safetensors", passthrough)

    @case("checksum_deleted")
    def _(f):
        m = manifest(f)
        del m["tensors"][plain_ecsq]["checksum"]
        write_manifest(f, m)

    @case("manifest_checksum_deleted")
    def _(f):
        m = manifest(f)
        del m["checksum"]
        write_manifest(f, m)

    @case("entry_deleted")
    def _(f):
        m = manifest(f)
        del m["tensors"][passthrough]
        write_manifest(f, m)

    @case("marker_renamed")
    def _(f):
        m = manifest(f)
        m["marker"] = plain_ecsq if plain_ecsq != marker else absmax
        write_manifest(f, m)

    @case("manifest_not_json")
    def _(f):
        (f / MANIFEST).write_text("{ not json")

    @case("manifest_deeply_nested")
    def _(f):
        (f / MANIFEST).write_text("[" * 200000 + "]" * 200000)

    @case("manifest_huge")
    def _(f):
        with open(f / MANIFEST, "r+b") as fh:
            fh.truncate(300 << 20)  # sparse: nothing is written, the size is what counts

    @case("manifest_old_version")
    def _(f):
        m = manifest(f)
        m["format_version"] = 1
        write_manifest(f, m)

    # forged: fields or tensors changed and every checksum recomputed; validation must stop
    # what cannot be right, before anything is allocated from it
    def forged(name, edit):
        @case(f"forged_{name}")
        def _(f):
            m = manifest(f)
            edit(m["tensors"])
            write_manifest(f, m)
            reseal(f)

    forged("group_rows_huge", lambda t: t[plain_ecsq]["meta"].update(group_rows=1 << 29))
    forged("qshape_huge", lambda t: t[plain_ecsq].update(qshape=[1 << 28, 64], shape=[1 << 28, 64]))
    forged("rotation_block_huge", lambda t: t[plain_ecsq]["meta"].update(rotation_block=1 << 29))
    forged("padded_cols_huge", lambda t: t[plain_ecsq]["meta"].update(padded_cols=1 << 30))
    forged("code_shape_huge", lambda t: t[plain_ecsq].update(code_shape=[1 << 20, 1 << 16]))
    forged("offset_huge", lambda t: t[plain_ecsq]["meta"].update(offset=1 << 40))
    forged("low_bits_9", lambda t: t[wide]["meta"].update(low_bits=9))
    forged("low_bits_0_with_low_part", lambda t: t[wide]["meta"].update(low_bits=0))
    forged("low_bits_without_low_part", lambda t: t[plain_ecsq]["meta"].update(low_bits=2))
    forged("offset_top_with_low_bits", lambda t: t[wide]["meta"].update(offset=(1 << 31) - 256))

    @case("forged_low_part_truncated")
    def _(f):
        def edit(tensors, m):
            tensors[f"{wide}.low"] = tensors[f"{wide}.low"][:-1].clone()
            m["tensors"][wide]["parts"]["low"]["shape"] = [tensors[f"{wide}.low"].numel()]
        rewrite_tensors(f, edit)

    def side(name, key, value):
        @case(f"forged_{name}")
        def _(f):
            def edit(tensors, m):
                tensors[key] = tensors[key].clone()
                tensors[key].view(-1)[0] = value
            rewrite_tensors(f, edit)

    def shared_part(t):
        t[f"{plain_ecsq}.steps"] = {"kind": "passthrough", "shape": [1], "dtype": "float32", "file": WEIGHTS,
                                   "stored_bytes": 4, "reason": "non-2d"}

    forged("shared_part", shared_part)

    @case("forged_marker_removed")
    def _(f):
        m = manifest(f)
        m["marker"] = None
        write_manifest(f, m)
        reseal(f)

    side("steps_nan", f"{plain_ecsq}.steps", float("nan"))
    side("steps_inf", f"{plain_ecsq}.steps", float("inf"))
    side("steps_huge", f"{plain_ecsq}.steps", 1e38)
    side("steps_negative", f"{plain_ecsq}.steps", -0.01)
    side("awq_scales_inf", f"{ecsq}.awq_scales", float("inf"))
    side("awq_scales_zero", f"{ecsq}.awq_scales", 0.0)
    side("absmax_scales_nan", f"{absmax}.scales", float("nan"))
    side("polar_codebook_nan", f"{polar}.codebook", float("nan"))
    side("polar_codebook_huge", f"{polar}.codebook", 1e38)

    for n_symbols in (1 << 31, 1 << 36):
        @case(f"forged_rans_declares_2^{int(math.log2(n_symbols))}")
        def _(f, n_symbols=n_symbols):
            def edit(tensors, m):
                tensors[f"{plain_ecsq}.codes"] = torch.frombuffer(bytearray(rans_header(n_symbols)), dtype=torch.uint8)
            rewrite_tensors(f, edit)

    @case("forged_extra_tensor")
    def _(f):
        def edit(tensors, m):
            tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(4)
        rewrite_tensors(f, edit)

    # shard indexes pointing outside the folder (the outside file is a faithful copy, so a
    # reader that followed the path would load it without noticing)
    for label, target in (("dotdot", "../outside.safetensors"), ("absolute", None)):
        @case(f"index_{label}")
        def _(f, target=target):
            outside = f.parent / f"{f.name}-outside.safetensors"
            shutil.copy(f / WEIGHTS, outside)
            from safetensors import safe_open
            with safe_open(str(f / WEIGHTS), "pt") as h:
                keys = list(h.keys())
            name = target.replace("outside", f"{f.name}-outside") if target else str(outside)
            weight_map = {k: (name if k.startswith(passthrough) else WEIGHTS) for k in keys}
            (f / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    @case("index_names_missing_file")
    def _(f):
        from safetensors import safe_open
        with safe_open(str(f / WEIGHTS), "pt") as h:
            weight_map = {k: WEIGHTS for k in h.keys()}
        weight_map["ghost.weight"] = WEIGHTS
        (f / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    root.mkdir(parents=True, exist_ok=True)
    for name, fn in cases.items():
        dest = root / name
        shutil.copytree(base, dest)
        fn(dest)
    return list(cases)


# ---- the runner ------------------------------------------------------------------------------


def loader(kind: str):
    import eoq

    if kind == "read_state_dict":
        return lambda p: eoq.read_state_dict(p), eoq.FormatError
    if kind == "load_quantized":
        return lambda p: eoq.load_quantized(p), eoq.FormatError
    if kind == "from_pretrained":
        from transformers import AutoModelForCausalLM
        return lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16), eoq.FormatError
    if kind == "standalone":
        import importlib.util
        path = pathlib.Path(__file__).parents[1] / "python" / "eoq" / "standalone" / "load_quantized.py"
        spec = importlib.util.spec_from_file_location("eoq_standalone_loader", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return lambda p: mod.load(p, use_eoq=False), mod.FormatError
    raise ValueError(kind)


def cap_memory(extra: int) -> None:
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, vm + extra))


def main(kind: str, root: str, out: str, base: str) -> None:
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    load, error = loader(kind)
    load(base)  # warm up: what a load holds is in the baseline of the cap
    cap_memory(3 << 29)
    results = {}
    for case in sorted(p.name for p in pathlib.Path(root).iterdir() if p.is_dir()):
        try:
            load(str(pathlib.Path(root) / case))
            results[case] = ["ok", ""]
        except error as e:
            results[case] = ["FormatError", str(e)]
        except BaseException as e:  # noqa: BLE001  (a finding, reported as such)
            results[case] = [type(e).__name__, str(e)[:2000]]
    pathlib.Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:5])
