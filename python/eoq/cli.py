"""The ``eoq`` command: ``eoq quantize MODEL -o OUT [options]``, ``eoq info DIR``, ``eoq decode DIR -o OUT``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .convert.quant_config import ProtectRule, QuantConfig, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _rule(text: str, regex: bool) -> ProtectRule:
    """NAME (keep as is), NAME=passthrough, or NAME=METHOD[:BITS] (its own setting)."""
    pattern, _, action = text.partition("=")
    if not action or action == "passthrough":
        return ProtectRule(pattern, regex=regex)
    method, _, bits = action.partition(":")
    return ProtectRule(pattern, regex=regex, action="quantize", method=method or None,
                       bits=float(bits) if bits else None)


def quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="convert a model into an eoq folder",
                       description="Convert a Hugging Face model (local folder, hub id, or .gguf file) into an "
                                   "eoq-quantized folder that from_pretrained loads after `import eoq`.")
    p.add_argument("model", help="model folder, hub id, or .gguf file")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--config", help="a QuantConfig JSON file; the options below override it")
    p.add_argument("--method", help="ecsq (default), absmax, polar, turbo")
    p.add_argument("--bits", type=float,
                   help="ecsq: bits per parameter of the whole model, everything stored included (default 4); "
                        "fixed-rate methods: their code width")
    p.add_argument("--target-size", type=_size, help="ecsq: a size for the whole folder's tensors instead of --bits, "
                                                     "e.g. 2.1GB (10^9 bytes) or 2GiB")
    p.add_argument("--block-size", type=int)
    p.add_argument("--allocation", choices=("sensitivity", "proxy", "uniform", "global"),
                   help="how the ecsq budget is spread: sensitivity (default with calibration: by each tensor's "
                        "measured effect on the output), proxy (by each tensor's own relative error; the default "
                        "data-free), uniform (one rate); global = proxy")
    p.add_argument("--allocation-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="bits/weight each tensor may get (default 1.5 10; at most 12)")
    p.add_argument("--sensitivity-sequences", type=int, help="calibration sequences of the Fisher pass (default 8)")
    p.add_argument("--seed", type=int)
    p.add_argument("--codec", choices=("auto", "rans", "packed"))
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. group_rows=64 (repeatable)")
    p.add_argument("--calibration", help="calibration text: a file, a datasets name, or 'self' (default)")
    p.add_argument("--data-free", action="store_true", help="no calibration and no AWQ")
    p.add_argument("--no-awq", action="store_true", help="importance weighting without AWQ scales")
    p.add_argument("--feedback", choices=("gptq", "none"),
                   help="error feedback over the inputs' covariance (GPTQ-style, every method; needs calibration)")
    p.add_argument("--feedback-damp", type=float, help="relative damping of the covariance (default 0.01)")
    p.add_argument("--calib-sequences", type=int)
    p.add_argument("--calib-seq-len", type=int)
    p.add_argument("--keep-embeddings", action="store_true",
                   help="keep the token embedding and the output head in 16 bits (they are quantized by default)")
    p.add_argument("--min-numel", type=int)
    p.add_argument("--protect", action="append", default=[], metavar="NAME[=passthrough|METHOD:BITS]",
                   help="keep a tensor (exact name) as is, or give it its own setting (repeatable)")
    p.add_argument("--protect-re", action="append", default=[], metavar="REGEX[=passthrough|METHOD:BITS]",
                   help="as --protect, for every tensor the regular expression finds")
    p.add_argument("--max-shard-size", type=_size, help="e.g. 2GB (default)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="store unquantized float tensors (and load quantized ones) in this dtype; default: the source's")
    p.add_argument("--gguf-file", help="the GGUF file inside MODEL when MODEL is a folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--threads", type=int, help="torch threads (the output does not depend on it)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where the per-tensor work runs: this process (default) or Ray tasks (pip install eoq[ray]; "
                        "every node must see the input and output folders at the same paths); the output is the "
                        "same bytes either way")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="the Ray cluster to use with --executor ray (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_quantize)


def config_from_args(a) -> QuantConfig:
    d = QuantConfig(calibration=None, awq=False).to_dict() if a.data_free else QuantConfig().to_dict()
    d["allocation"] = None  # resolved by QuantConfig from the method and calibration, unless given
    if a.config:
        with open(a.config) as f:
            d.update(json.load(f))
    for key in ("method", "bits", "target_size", "block_size", "seed", "codec", "calibration", "calib_sequences",
                "calib_seq_len", "sensitivity_sequences", "min_numel", "max_shard_size", "dtype", "allocation",
                "allocation_range", "feedback_damp"):
        if getattr(a, key) is not None:
            d[key] = getattr(a, key)
    if a.data_free:
        d["calibration"], d["awq"] = None, False
    if a.no_awq:
        d["awq"] = False
    if a.feedback is not None:
        d["feedback"] = None if a.feedback == "none" else a.feedback
    if a.keep_embeddings:
        d["quantize_embeddings"] = d["quantize_lm_head"] = False
    for opt in a.option:
        key, sep, value = opt.partition("=")
        if not sep:
            raise SystemExit(f"--option {opt!r}: expected KEY=VALUE")
        d["options"][key] = _value(value)
    d["protect"] = list(d["protect"]) + [_rule(r, False) for r in a.protect] + [_rule(r, True) for r in a.protect_re]
    return QuantConfig(**d)


def run_quantize(a) -> int:
    import torch

    from .convert.pipeline import quantize_model

    if a.threads:
        torch.set_num_threads(a.threads)
    config = config_from_args(a)
    if a.ray_address and a.executor != "ray":
        raise ValueError("--ray-address needs --executor ray")
    manifest = quantize_model(a.model, a.output, config, gguf_file=a.gguf_file, overwrite=a.overwrite,
                              progress=not a.no_progress, executor=a.executor, ray_address=a.ray_address)
    from .convert.summary import summary_table

    print(f"{summary_table(manifest)}\nwrote {a.output}")
    return 0


def info_parser(sub) -> None:
    p = sub.add_parser("info", help="the size table of an eoq folder")
    p.add_argument("folder")
    p.add_argument("--top", type=int, default=5, help="list the N largest quantized tensors (default 5)")
    p.add_argument("--all", action="store_true", help="one row per tensor instead of one per kind and method")
    p.set_defaults(func=run_info)


def run_info(a) -> int:
    from .convert.summary import summary_table
    from .format.repo import read_manifest

    print(summary_table(read_manifest(a.folder), a.top, per_tensor=a.all))
    return 0


def eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, and KL divergence against a base model",
                       description="Perplexity of MODEL (an eoq folder, an HF folder or a .gguf file) on a text, "
                                   "and with --base its KL divergence from the base, window by window.")
    p.add_argument("model")
    p.add_argument("--text", required=True, help="a text file or a datasets name (name[:config[:split]])")
    p.add_argument("--base", help="the base model to compare with")
    p.add_argument("--protocol", choices=("llama.cpp", "sliding"), default="llama.cpp")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--stride", type=int, default=256, help="sliding protocol only")
    p.add_argument("--max-windows", type=int, help="evaluate at most N windows (quick runs)")
    p.add_argument("--out", help="write eval_summary.json and sample_generations.json here")
    p.add_argument("--no-samples", action="store_true", help="skip the sample generations")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: the GPU when there is one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype of both models (float32 keeps the KL divergence exact)")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)


def run_eval(a) -> int:
    import torch

    from .evaluate.compare import evaluate, format_result

    if a.threads:
        torch.set_num_threads(a.threads)
    summary = evaluate(a.model, a.text, base=a.base, protocol=a.protocol, n_ctx=a.n_ctx, stride=a.stride,
                       max_windows=a.max_windows, out_dir=a.out, samples=not a.no_samples,
                       progress=not a.no_progress, device=a.device, dtype=getattr(torch, a.dtype))
    print(format_result(summary))
    import pathlib
    if a.out and pathlib.Path(a.out).resolve() == pathlib.Path(a.model).resolve() and \
            (pathlib.Path(a.model) / "quant_manifest.json").is_file():
        from .convert.card import write_card
        print(f"updated {write_card(a.out)}")  # the card now carries the evaluation
    return 0


def card_parser(sub) -> None:
    p = sub.add_parser("card", help="(re)write an eoq folder's model card README.md",
                       description="Rebuild README.md from quant_manifest.json, eval_summary.json and "
                                   "sample_generations.json.")
    p.add_argument("folder")
    p.add_argument("--base-model", help="hub id of the model this was quantized from (front matter base_model)")

    def run(a) -> int:
        from .convert.card import write_card
        print(f"wrote {write_card(a.folder, a.base_model)}")
        return 0

    p.set_defaults(func=run)


def push_parser(sub) -> None:
    p = sub.add_parser("push", help="verify an eoq folder and upload it to the Hugging Face hub")
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    p.add_argument("--private", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip decoding every tensor before the upload")

    def run(a) -> int:
        from .convert.push import push
        files = push(a.folder, a.repo_id, dry_run=a.dry_run, private=a.private, verify=not a.no_verify)
        for name, size in files:
            print(f"{size:>14,}  {name}")
        verb = "would upload" if a.dry_run else "uploaded"
        print(f"{verb} {len(files)} files, {sum(s for _, s in files):,} bytes to {a.repo_id}")
        return 0

    p.set_defaults(func=run)


def decode_parser(sub) -> None:
    p = sub.add_parser("decode", help="write an eoq folder as a plain 16-bit Hugging Face folder",
                       description="Decode an eoq folder into a plain Hugging Face folder (safetensors, config.json "
                                   "without quantization_config, tokenizer) that loads without eoq: for vLLM, "
                                   "SGLang, or llama.cpp's convert_hf_to_gguf.py.")
    p.add_argument("folder", help="the eoq folder")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="of the floating tensors (default bfloat16)")
    p.add_argument("--max-shard-size", type=_size, help="e.g. 5GB (default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    def run(a) -> int:
        from .load.decode import MAX_SHARD_BYTES, decode_folder
        out = decode_folder(a.folder, a.output, a.dtype, a.max_shard_size or MAX_SHARD_BYTES, overwrite=a.overwrite)
        print(f"wrote {out}: a plain Hugging Face folder in {a.dtype}, which loads without eoq")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eoq", description="entropy-optimal quantization of LLM checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    quantize_parser(sub)
    info_parser(sub)
    eval_parser(sub)
    card_parser(sub)
    push_parser(sub)
    decode_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, ImportError) as e:
        print(f"eoq {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
