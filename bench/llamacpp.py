#!/usr/bin/env python3
"""llama.cpp as a benchmark baseline: build its quantization tools, convert, imatrix, quantize.

    python bench/llamacpp.py [--cache-dir DIR] build
    python bench/llamacpp.py [--cache-dir DIR] convert HF_FOLDER OUT.gguf [--outtype f16]
    python bench/llamacpp.py [--cache-dir DIR] imatrix GGUF TEXT OUT [--ctx 512] [--chunks N] [--threads N]
    python bench/llamacpp.py [--cache-dir DIR] quantize SRC OUT TYPE [--imatrix F]
                                              [--tensor-type NAME=TYPE ...] [--pure] [--threads N]
    python bench/llamacpp.py [--cache-dir DIR] perplexity GGUF TEXT [--ctx 512] [--chunks N] [--threads N]

Benchmarks only: nothing here is used by the eoq package or its tests, and nothing is
installed into the environment.

Sources. The llama.cpp tree vendored in the PyPI sdist of llama-cpp-python, pinned to
LLAMA_CPP_PYTHON_VERSION (it lives in ``vendor/llama.cpp`` of the sdist; its gguf-py is
version 0.19.0), fetched with the ordinary pip client (``pip download --no-binary :all:
--no-deps``, which goes through whatever index pip is configured with) into
``<cache>/llamacpp/sdist``, unpacked into ``<cache>/llamacpp/src``, and built with CMake into
``<cache>/llamacpp/build``: Release, CPU only, static libraries, -march=native
(GGML_NATIVE=ON: the binaries are for this machine only), only the targets llama-quantize,
llama-perplexity and llama-imatrix. ``<cache>`` is eoq.testing.models.resolve_cache_dir() (the
argument, else $EOQ_CACHE, else ~/.cache/eoq).

Notes on this llama.cpp version (the one vendored in llama-cpp-python 0.3.36):
  * LLAMA_CURL no longer exists (a deprecated no-op that only warns when ON); downloads go
    through the vendored cpp-httplib, whose HTTPS support is LLAMA_OPENSSL (default ON):
    it is turned OFF here. LLAMA_BUILD_APP (the unified ``llama`` binary) is turned OFF.
  * llama-imatrix writes a GGUF file by default (``--output-format dat`` for the legacy
    format); it warns when the output name does not end in .gguf. llama-quantize reads both.
  * llama-quantize's ``--tensor-type NAME=TYPE`` exists: NAME is a regular expression
    (std::regex_search, lower-cased) over tensor names such as ``blk.3.ffn_down.weight``;
    the first matching pattern wins. BUT the overrides only apply when the base type is a
    quantized type: with base F16/BF16/F32 they are silently ignored (llama-quant.cpp only
    looks at them under ``if (ggml_is_quantized(default_type))``). See quantize() for the
    recipe that quantizes only some tensors and keeps the rest F16.
  * K-quants and IQ*_XS/S types have 256-wide blocks; a tensor whose row length (ne[0], the
    input dimension) is not a multiple of 256 is quantized with a fallback type and a
    warning: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0, IQ4_XS/IQ3/IQ2/IQ1->IQ4_NL.
    On SmolLM2-135M (hidden 576 = 2.25*256) that is every tensor except ffn_down (1536).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
TARGETS = ("llama-quantize", "llama-perplexity", "llama-imatrix")
BUILD_JOBS = 2

CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_CCACHE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_RPC=OFF",
    "-DLLAMA_OPENSSL=OFF",  # replaces LLAMA_CURL=OFF (deprecated no-op in this version)
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
)

# llama-quantize's ftype names (QUANT_OPTIONS in tools/quantize/quantize.cpp of this version)
FTYPES = (
    "Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S",
    "IQ2_M", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M",
    "Q3_K", "IQ3_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S",
    "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32", "COPY",
)
UNQUANTIZED = ("F16", "BF16", "F32")

_WARNING_RE = re.compile(r"warn|falling back|fallback|must use", re.IGNORECASE)


class LlamaCppError(RuntimeError):
    pass


# --------------------------------------------------------------------------- locations

def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """``<cache>/llamacpp``, <cache> from eoq.testing.models.resolve_cache_dir (arg, $EOQ_CACHE, ~/.cache/eoq)."""
    try:
        from eoq.testing.models import resolve_cache_dir
        base = resolve_cache_dir(cache_dir)
    except ImportError:  # eoq not importable: same rule, inlined
        if cache_dir is not None:
            base = Path(cache_dir).expanduser()
        elif os.environ.get("EOQ_CACHE"):
            base = Path(os.environ["EOQ_CACHE"]).expanduser()
        else:
            base = Path.home() / ".cache" / "eoq"
    return Path(base) / "llamacpp"


def source_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """The vendored llama.cpp tree (may not exist yet)."""
    return cache_root(cache_dir) / "src" / SDIST_NAME / "vendor" / "llama.cpp"


def build_dir(cache_dir: Optional[PathLike] = None) -> Path:
    return cache_root(cache_dir) / "build"


@contextlib.contextmanager
def _locked(root: Path):
    """Serialise fetch/build between processes sharing a cache."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no locking
            pass
        yield


# --------------------------------------------------------------------------- fetch + build

def fetch_sources(cache_dir: Optional[PathLike] = None) -> Path:
    """Download the pinned sdist (if absent) and unpack it (if absent); returns the llama.cpp tree."""
    root = cache_root(cache_dir)
    src = source_dir(cache_dir)
    if (src / "CMakeLists.txt").is_file() and (src / "convert_hf_to_gguf.py").is_file():
        return src
    sdist_dir = root / "sdist"
    sdist = sdist_dir / f"{SDIST_NAME}.tar.gz"
    if not sdist.is_file():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(sdist_dir)]
        _run(cmd, what="pip download of the llama-cpp-python sdist")
        if not sdist.is_file():
            raise LlamaCppError(f"pip download did not produce {sdist}: {sorted(p.name for p in sdist_dir.iterdir())}")
    dest = root / "src"
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tarfile.open(sdist) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # pragma: no cover - Python without PEP 706
                tf.extractall(tmp)
        top = tmp / SDIST_NAME
        if not (top / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise LlamaCppError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
        if (dest / SDIST_NAME).exists():
            shutil.rmtree(dest / SDIST_NAME)
        top.rename(dest / SDIST_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src


def _tool_paths(cache_dir: Optional[PathLike] = None) -> dict[str, Path]:
    src = source_dir(cache_dir)
    bin_dir = build_dir(cache_dir) / "bin"
    paths = {t: bin_dir / t for t in TARGETS}
    paths["convert_hf_to_gguf"] = src / "convert_hf_to_gguf.py"
    paths["gguf-py"] = src / "gguf-py"
    paths["llama.cpp"] = src
    return paths


def _stamp() -> dict:
    return {"llama-cpp-python": LLAMA_CPP_PYTHON_VERSION, "cmake": list(CMAKE_OPTIONS), "targets": list(TARGETS)}


def ensure_tools(cache_dir: Optional[PathLike] = None, rebuild: bool = False, verbose: bool = False) -> dict[str, Path]:
    """Fetch the pinned llama.cpp sources and build llama-quantize/-perplexity/-imatrix, once.

    Returns {"llama-quantize", "llama-perplexity", "llama-imatrix": the binaries,
    "convert_hf_to_gguf": the vendored converter script, "gguf-py": the vendored gguf
    package's folder, "llama.cpp": the source tree}. An existing build is reused when all
    three binaries exist and the build stamp (version, CMake options, targets) matches;
    otherwise CMake configures (again) and builds with -j2 (6 min 15 s on this project's 2-core box).
    The build log is <cache>/llamacpp/build/build.log (streamed to stderr with verbose).
    """
    root = cache_root(cache_dir)
    with _locked(root):
        src = fetch_sources(cache_dir)
        paths = _tool_paths(cache_dir)
        bdir = build_dir(cache_dir)
        stamp_file = bdir / "eoq-build-stamp.json"
        built = all(os.access(paths[t], os.X_OK) for t in TARGETS)
        if not rebuild and built and stamp_file.is_file():
            try:
                if json.loads(stamp_file.read_text()) == _stamp():
                    return paths
            except ValueError:
                pass
        for tool in ("cmake",):
            if shutil.which(tool) is None:
                raise LlamaCppError(f"{tool} not found on PATH")
        bdir.mkdir(parents=True, exist_ok=True)
        stamp_file.unlink(missing_ok=True)
        gen = []
        if not (bdir / "CMakeCache.txt").exists() and shutil.which("ninja"):
            gen = ["-G", "Ninja"]
        log = bdir / "build.log"
        with open(log, "a") as lf:
            lf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} configure+build\n")
            lf.flush()
            _run(["cmake", "-S", str(src), "-B", str(bdir), *gen, *CMAKE_OPTIONS],
                 what="cmake configure", log=lf, verbose=verbose)
            _run(["cmake", "--build", str(bdir), "--config", "Release", "-j", str(BUILD_JOBS),
                  "--target", *TARGETS], what="cmake build", log=lf, verbose=verbose)
        missing = [t for t in TARGETS if not os.access(paths[t], os.X_OK)]
        if missing:
            raise LlamaCppError(f"build finished but {missing} are not in {bdir / 'bin'} (see {log})")
        stamp_file.write_text(json.dumps(_stamp(), indent=1))
        return paths


# --------------------------------------------------------------------------- running

def _run(cmd: Sequence[str], what: str, env: Optional[Mapping[str, str]] = None, log=None,
         verbose: bool = False) -> subprocess.CompletedProcess:
    """Run cmd; capture (or append to log / stream) its output; raise LlamaCppError with the tail on failure."""
    cmd = [str(c) for c in cmd]
    if log is not None:
        if verbose:
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace")
            tail: list[str] = []
            for line in p.stdout:
                log.write(line)
                sys.stderr.write(line)
                tail = (tail + [line])[-40:]
            rc = p.wait()
            out = "".join(tail)
        else:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            out = ""
        log.flush()
        if rc != 0:
            if not out:
                with open(log.name, errors="replace") as f:
                    out = "".join(f.readlines()[-40:])
            raise LlamaCppError(f"{what} failed (exit {rc}): {' '.join(cmd)}\n{out}")
        return subprocess.CompletedProcess(cmd, rc, out, "")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace")
    if r.returncode != 0:
        tail = "\n".join((r.stdout + "\n" + r.stderr).strip().splitlines()[-40:])
        raise LlamaCppError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{tail}")
    return r


# the converter's Llama path imports sentencepiece before it looks for tokenizer.model, so it
# fails with ModuleNotFoundError even for BPE (tokenizer.json) models unless it is importable;
# its requirements file pins this range
SENTENCEPIECE_SPEC = "sentencepiece>=0.1.98,<0.3.0"


def _converter_pydeps(cache_dir: Optional[PathLike] = None) -> list[Path]:
    """Private site dir(s) for converter-only dependencies missing from sys.executable's env.

    sentencepiece, when sys.executable cannot import it, is installed with pip
    ``--target <cache>/llamacpp/pydeps`` (binary wheel, no deps): the environment itself
    is left untouched.
    """
    probe = subprocess.run([sys.executable, "-c", "import sentencepiece"], capture_output=True)
    if probe.returncode == 0:
        return []
    target = cache_root(cache_dir) / "pydeps"
    if not (target / "sentencepiece").is_dir():
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary", ":all:",
              "--target", str(target), SENTENCEPIECE_SPEC], what="pip install --target of sentencepiece")
    return [target]


def _converter_env(src: Path, extra: Sequence[Path] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter then puts its own gguf-py first on sys.path too
    env["PYTHONPATH"] = os.pathsep.join([str(src / "gguf-py"), str(src), *map(str, extra)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def convert_hf_to_gguf(hf_folder: PathLike, out_gguf: PathLike, outtype: str = "f16",
                       cache_dir: Optional[PathLike] = None, extra_args: Iterable[str] = ()) -> Path:
    """HF folder -> GGUF with the vendored convert_hf_to_gguf.py, run by sys.executable.

    PYTHONPATH puts the vendored gguf-py (0.19.0, the version the converter was written
    against) ahead of any installed gguf; the converter itself also inserts it unless
    NO_LOCAL_GGUF is set (it is removed from the environment here). The converter needs
    torch, numpy, transformers (tokenizer/config), pyyaml, tqdm, requests, and (trap) for
    every Llama-architecture model sentencepiece, even with a BPE tokenizer.json: when the
    environment lacks it, it is pip-installed into <cache>/llamacpp/pydeps and put on the
    converter's PYTHONPATH only (see _converter_pydeps). outtype: f32, f16, bf16, q8_0,
    tq1_0, tq2_0, auto. Only the sources are needed (no build).
    """
    with _locked(cache_root(cache_dir)):
        src = fetch_sources(cache_dir)
        extra = _converter_pydeps(cache_dir)
    out = Path(out_gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, src / "convert_hf_to_gguf.py", Path(hf_folder), "--outfile", out,
           "--outtype", outtype, *extra_args]
    _run(cmd, what="convert_hf_to_gguf.py", env=_converter_env(src, extra))
    if not out.is_file():
        raise LlamaCppError(f"convert_hf_to_gguf.py exited 0 but wrote no {out}")
    return out


def imatrix(gguf: PathLike, text_file: PathLike, out: PathLike, n_ctx: int = 512,
            chunks: Optional[int] = None, threads: Optional[int] = None,
            cache_dir: Optional[PathLike] = None, extra_args: Iterable[str] = ()) -> Path:
    """Importance matrix of gguf over text_file with llama-imatrix; returns out.

    The output is a GGUF imatrix (the default of this version; name it *.gguf, else the
    tool warns; pass extra_args=("--output-format", "dat") for the legacy format).
    chunks: number of n_ctx-token chunks to process (None: the whole text; it needs at
    least 2*n_ctx tokens). threads: -t (None: llama.cpp's default, the physical cores).
    The tool's log (including its running perplexity estimate) is written to out + ".log".
    Use calibration text here, never the evaluation text. SmolLM2-135M F16, 100 chunks
    of 512 on 2 busy cores: 9 min 50 s (about 1.2 s/chunk when the cores are free).
    """
    tools = ensure_tools(cache_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [tools["llama-imatrix"], "-m", gguf, "-f", text_file, "-o", out, "-c", str(n_ctx)]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    if threads is not None:
        cmd += ["-t", str(threads)]
    cmd += list(extra_args)
    r = _run(cmd, what="llama-imatrix")
    Path(str(out) + ".log").write_text(r.stdout + r.stderr)
    if not out.is_file():
        raise LlamaCppError(f"llama-imatrix exited 0 but wrote no {out}")
    return out


def quantize(src_gguf: PathLike, out_gguf: PathLike, qtype: str, imatrix: Optional[PathLike] = None,
             tensor_types: Optional[Mapping[str, str]] = None, threads: Optional[int] = None,
             pure: bool = False, cache_dir: Optional[PathLike] = None,
             extra_args: Iterable[str] = ()) -> list[str]:
    """llama-quantize src_gguf -> out_gguf as qtype; returns the warnings it printed.

    qtype: an ftype name of llama-quantize (Q4_K_M, Q2_K, IQ4_XS, Q8_0, F16, ...).
    imatrix: an importance matrix (GGUF or legacy .dat), e.g. from imatrix(); some IQ
    types refuse to run without one. tensor_types: {regex: ggml type}, e.g.
    {"ffn_down": "Q4_K"}, each passed as ``--tensor-type ffn_down=Q4_K``; the regex is
    searched in tensor names like ``blk.7.ffn_down.weight``, first match wins; the types
    are ggml type names (q4_K, q8_0, iq4_xs, f16, ...; case-insensitive).

    Quantizing ONLY some tensors, the rest F16: llama-quantize ignores --tensor-type when
    the base type is unquantized (F16/BF16/F32), so ``F16 + --tensor-type ffn_down=q4_K``
    would silently give an all-F16 file. When qtype is F16/BF16/F32 and tensor_types is
    given, this function therefore runs the working recipe instead: base ftype = the
    first override's type (so general.file_type reads e.g. Q4_K_M; Q8_0 if that name is
    not an ftype), the given overrides first, then a catch-all ``--tensor-type .*=<qtype>``
    (catch-all last, since the first matching pattern wins). Tensors llama.cpp never
    quantizes (norms, 1-D tensors) keep their type (F32) as in any llama.cpp quant. E.g.
    down-projections only at Q4_K, everything else F16:
    ``quantize(f16, out, "F16", tensor_types={"ffn_down": "Q4_K"})``, which runs
    ``llama-quantize --tensor-type ffn_down=Q4_K --tensor-type .*=F16 f16.gguf out.gguf Q4_K``.

    Returned warnings: the output lines mentioning warn/fallback, chiefly the
    "ncols N not divisible by 256 (required for type q4_K) -> falling back to q5_0"
    lines of tensors whose row length is not a multiple of the 256-wide K/IQ block.
    "applying manual override" lines (one per overridden tensor) are left out. The whole
    log is written to out_gguf + ".log".
    """
    tools = ensure_tools(cache_dir)
    out = Path(out_gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = qtype.upper()
    overrides = list((tensor_types or {}).items())
    if base in UNQUANTIZED and overrides:
        first = overrides[0][1].upper()
        overrides.append((".*", base))
        base = first if first in FTYPES and first not in UNQUANTIZED else "Q8_0"
    cmd: list = [tools["llama-quantize"]]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix]
    if pure:
        cmd += ["--pure"]
    for name, t in overrides:
        cmd += ["--tensor-type", f"{name}={t}"]
    cmd += list(extra_args)
    cmd += [src_gguf, out, base]
    if threads is not None:
        cmd += [str(threads)]
    r = _run(cmd, what="llama-quantize")
    text = r.stdout + r.stderr
    Path(str(out) + ".log").write_text(" ".join(str(c) for c in cmd) + "\n" + text)
    if not out.is_file():
        raise LlamaCppError(f"llama-quantize exited 0 but wrote no {out}")
    return [ln.strip() for ln in text.splitlines()
            if _WARNING_RE.search(ln) and "applying manual override" not in ln]


def perplexity(gguf: PathLike, text_file: PathLike, n_ctx: int = 512, chunks: Optional[int] = None,
               threads: Optional[int] = None, cache_dir: Optional[PathLike] = None,
               extra_args: Iterable[str] = ()) -> float:
    """llama-perplexity's final estimate ("Final estimate: PPL = x +/- y") of gguf on text_file.

    Scores the second half of each n_ctx-token chunk (llama.cpp's convention), so the
    value is not comparable with a sliding-window perplexity computed otherwise.
    """
    tools = ensure_tools(cache_dir)
    cmd = [tools["llama-perplexity"], "-m", gguf, "-f", text_file, "-c", str(n_ctx)]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    if threads is not None:
        cmd += ["-t", str(threads)]
    cmd += list(extra_args)
    r = _run(cmd, what="llama-perplexity")
    m = re.search(r"Final estimate: PPL = ([0-9.eE+-]+)", r.stdout + r.stderr)
    if not m:
        raise LlamaCppError("llama-perplexity printed no final estimate:\n" + (r.stdout + r.stderr)[-3000:])
    return float(m.group(1))


# --------------------------------------------------------------------------- CLI

def _parse_kv(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--tensor-type wants NAME=TYPE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=None, help="cache root (default: $EOQ_CACHE, else ~/.cache/eoq)")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch + build the tools (idempotent), print their paths")
    b.add_argument("--rebuild", action="store_true")
    b.add_argument("--verbose", action="store_true", help="stream the build log")
    c = sub.add_parser("convert", help="HF folder -> GGUF with the vendored converter")
    c.add_argument("hf_folder")
    c.add_argument("out")
    c.add_argument("--outtype", default="f16")
    i = sub.add_parser("imatrix", help="importance matrix (GGUF format)")
    i.add_argument("gguf")
    i.add_argument("text")
    i.add_argument("out")
    i.add_argument("--ctx", type=int, default=512)
    i.add_argument("--chunks", type=int, default=None)
    i.add_argument("--threads", type=int, default=None)
    q = sub.add_parser("quantize", help="llama-quantize")
    q.add_argument("src")
    q.add_argument("out")
    q.add_argument("type")
    q.add_argument("--imatrix", default=None)
    q.add_argument("--tensor-type", action="append", default=[], metavar="NAME=TYPE")
    q.add_argument("--pure", action="store_true")
    q.add_argument("--threads", type=int, default=None)
    pp = sub.add_parser("perplexity", help="llama-perplexity final estimate")
    pp.add_argument("gguf")
    pp.add_argument("text")
    pp.add_argument("--ctx", type=int, default=512)
    pp.add_argument("--chunks", type=int, default=None)
    pp.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    try:
        if a.cmd == "build":
            paths = ensure_tools(a.cache_dir, rebuild=a.rebuild, verbose=a.verbose)
            for k, v in paths.items():
                print(f"{k}\t{v}")
        elif a.cmd == "convert":
            print(convert_hf_to_gguf(a.hf_folder, a.out, outtype=a.outtype, cache_dir=a.cache_dir))
        elif a.cmd == "imatrix":
            print(imatrix(a.gguf, a.text, a.out, n_ctx=a.ctx, chunks=a.chunks, threads=a.threads,
                          cache_dir=a.cache_dir))
        elif a.cmd == "quantize":
            warnings = quantize(a.src, a.out, a.type, imatrix=a.imatrix, tensor_types=_parse_kv(a.tensor_type),
                                threads=a.threads, pure=a.pure, cache_dir=a.cache_dir)
            for w in warnings:
                print(w if w.lower().startswith("warning") else f"warning: {w}", file=sys.stderr)
            size = Path(a.out).stat().st_size
            print(f"{a.out}\t{size} bytes\t{len(warnings)} warning line(s)")
        elif a.cmd == "perplexity":
            print(perplexity(a.gguf, a.text, n_ctx=a.ctx, chunks=a.chunks, threads=a.threads,
                             cache_dir=a.cache_dir))
    except LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
