"""The model card (the folder's README.md), built with huggingface_hub's ModelCard from the
manifest and, when the folder has one, eval_summary.json and sample_generations.json.

``write_card(folder)`` is what conversion calls and what ``eoq card DIR`` re-runs after an
evaluation; nothing in the card is typed by hand, so it stays true to the folder.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from ..format import repo


def _load_json(path: pathlib.Path) -> Optional[object]:
    return json.loads(path.read_text()) if path.is_file() else None


def _front_matter(manifest: dict, config: dict, base_model: Optional[str]):
    from huggingface_hub import ModelCardData

    src, qc = manifest["source"], manifest["config"]
    base = base_model or src.get("base_model") or (src["name"] if src["kind"] == "hub" else None)
    archs = config.get("architectures") or []
    generative = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return ModelCardData(
        library_name="transformers", license=src.get("license"), base_model=base,
        base_model_relation="quantized" if base else None,
        pipeline_tag="text-generation" if generative else "feature-extraction",
        tags=["eoq", "quantized", f"eoq-{qc['method']}", f"{qc['bits']}-bit"])


def _snapshot(manifest: dict) -> str:
    t, qc, calib = manifest["totals"], manifest["config"], manifest.get("calibration")
    if calib and calib.get("source"):
        calib_line = (f"activation statistics from `{calib['source']}` ({calib['tokens']} tokens)"
                      + (", AWQ scales" if qc["awq"] else ""))
    elif calib:
        calib_line = f"none: `{calib['requested']}` was asked for but {calib['reason']}"
    else:
        calib_line = "none (data-free)"
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(t["counts"].items()))
    alloc = manifest.get("allocation") or {}
    if alloc.get("budget_bits"):
        budget = f"{qc['target_size'] / 1e6:.1f} MB" if qc.get("target_size") else f"{qc['bits']} bits per parameter"
    else:
        budget = f"{qc['bits']} bits"
    return f"""| | |
|---|---|
| bits per parameter, whole model | {t['bits_per_weight_all']:.3f} ({t['all_params']:,} parameters, everything stored) |
| method | `{qc['method']}`, budget {budget}, codec `{qc['codec']}` |
| allocation | {_allocation_line(alloc)} |
| calibration | {calib_line} |
| bits/weight, quantized weights | {t['bits_per_weight_quantized']:.3f} ({t['quantized_params']:,} weights) |
| size | {t['original_bytes'] / 1e6:.1f} MB → {t['stored_bytes'] / 1e6:.1f} MB stored (×{t['ratio']:.2f}) |
| tensors | {counts} |"""


def _allocation_line(alloc: dict) -> str:
    if not alloc:
        return "uniform"
    what = {"sensitivity": "by measured end-to-end sensitivity (Fisher), equal slope of the predicted KL",
            "proxy": "by equal slope of each tensor's relative output error",
            "uniform": "one rate for every quantized tensor"}.get(alloc["mode"], alloc["mode"])
    line = f"{alloc['mode']}: {what}"
    if alloc.get("min_bits") is not None:
        line += f", {alloc['min_bits']:.2f}-{alloc['max_bits']:.2f} bits/weight over {alloc['tensors']} tensors"
    if alloc.get("predicted_kl") is not None:
        line += f", predicted KL {alloc['predicted_kl']:.4g}"
    if alloc.get("note"):
        line += f" ({alloc['requested']} asked for: {alloc['note']})"
    return line


def _storage(manifest: dict, top: int = 8) -> str:
    rows: dict[tuple, list] = {}
    for e in manifest["tensors"].values():
        if e["kind"] == "tied":
            continue
        key = (e["kind"], e.get("method", "-"), e.get("reason") or e.get("rule") or "")
        n = repo.entry_numel(e)
        acc = rows.setdefault(key, [0, 0, 0])
        acc[0] += 1
        acc[1] += n
        acc[2] += e["stored_bytes"]
    lines = ["| kind | method | reason / rule | tensors | parameters | stored MB | bits/param |", "|---|---|---|---:|---:|---:|---:|"]
    for (kind, method, why), (k, n, b) in sorted(rows.items()):
        lines.append(f"| {kind} | {method} | {why} | {k} | {n:,} | {b / 1e6:.2f} | {8 * b / max(n, 1):.3f} |")
    big = sorted(((e["stored_bytes"], name) for name, e in manifest["tensors"].items() if repo.is_quantized(e)),
                 reverse=True)[:top]
    lines += ["", "Largest quantized tensors:", "",
              "| tensor | shape | method | bits/weight | code entropy | AWQ α |", "|---|---|---|---:|---:|---:|"]
    for _, name in big:
        e = manifest["tensors"][name]
        lines.append(f"| `{name}` | {e['shape']} | {e['method']} | {e['bits_per_weight']:.3f} | "
                     f"{e['code_entropy']:.3f} | {_alpha(e['meta'])} |")
    rules = manifest["config"].get("protect") or []
    if rules:
        lines += ["", "Protection rules (first match wins):", ""]
        for r in rules:
            what = "kept as is" if r["action"] == "passthrough" else \
                f"quantized with {r.get('method') or manifest['config']['method']} {r.get('bits') or ''}"
            lines.append(f"- {'regex' if r['regex'] else 'name'} `{r['pattern']}`: {what}")
    return "\n".join(lines)


def _evaluation(summary: Optional[dict]) -> str:
    if not summary:
        return "Not evaluated yet: `eoq eval DIR --text TEXT --base BASE --out DIR`, then `eoq card DIR`."
    r, text = summary["result"], summary["text"]
    if r["protocol"] == "embedding-cosine":
        c = r["cosine"]
        return (f"Sentence embeddings (mean pooling) of {r['sentences']} sentences of `{text['source']}` "
                f"(sha256 {text['sha256_16']}…), cosine similarity to the base model's: mean {c['mean']:.5f}, "
                f"1st percentile {c['p1']:.5f}, min {c['min']:.5f}.")
    proto = f"`{r['protocol']}` protocol, n_ctx {r['n_ctx']}" + (f", stride {r['stride']}" if r.get("stride") else "")
    out = [f"On `{text['source']}` (sha256 {text['sha256_16']}…, {text['tokens']:,} tokens): {proto}, "
           f"{r['windows']} windows, {r['tokens']:,} scored tokens.", ""]
    if "kld" in r:
        b, k = r["base"], r["kld"]
        out += ["| | base | this model |", "|---|---:|---:|",
                f"| perplexity | {b['ppl']:.4f} ± {b['ppl_stderr']:.4f} | {r['ppl']:.4f} ± {r['ppl_stderr']:.4f} |",
                f"| PPL ratio | | {r['ppl_ratio']:.4f} |",
                f"| KL divergence to base: mean / median / p99 / max | | {k['mean']:.5f} / {k['median']:.5f} / "
                f"{k['p99']:.4f} / {k['max']:.3f} |",
                f"| same top-1 token as base | | {100 * r['same_top1']:.2f} % |",
                f"| RMS Δp of the correct token | | {100 * r['rms_dp']:.3f} % |"]
    else:
        out.append(f"Perplexity {r['ppl']:.4f} ± {r['ppl_stderr']:.4f}.")
    return "\n".join(out)


def degenerate(text: str) -> Optional[str]:
    """Why a generation is not worth showing, or None."""
    words = text.split()
    if not words:
        return "empty output"
    if len(words) >= 8 and len(set(words)) / len(words) < 0.3:
        return "repetitive output"
    return None


def _samples(rows: Optional[list]) -> str:
    if not rows:
        return "None recorded (run `eoq eval` with `--out DIR`)."
    bad = [(r["prompt"], degenerate(r["model"])) for r in rows if degenerate(r["model"])]
    if bad:
        return ("Left out: the quantized model's greedy output is degenerate for "
                + "; ".join(f"“{p}” ({why})" for p, why in bad) + ". See `sample_generations.json`.")
    out = []
    for r in rows:
        out += [f"**{r['prompt']}**", "", "this model: " + r["model"].strip().replace("\n", " ")]
        if "base" in r:
            out += ["", "base: " + r["base"].strip().replace("\n", " ")]
        out.append("")
    return "\n".join(out)


def card_text(folder: pathlib.Path, base_model: Optional[str] = None) -> str:
    from huggingface_hub import ModelCard

    manifest = repo.read_manifest(folder)
    config = json.loads((folder / "config.json").read_text())
    summary = _load_json(folder / "eval_summary.json")
    samples = _load_json(folder / "sample_generations.json")
    src, qc = manifest["source"], manifest["config"]
    auto = "AutoModelForCausalLM" if _front_matter(manifest, config, base_model).pipeline_tag == "text-generation" \
        else "AutoModel"
    title = src["name"].rstrip("/").split("/")[-1]
    body = f"""
# {title} — eoq {qc['method']} {qc['bits']} bits

Quantized with eoq {manifest['eoq_version']} (entropy-optimal quantization) from `{src['name']}`
({src['architecture']}). Weights are stored as {qc['method']} codes ({'rANS entropy-coded' if qc['codec'] != 'packed' else 'bit-packed'})
and dequantized to dense weights when the model loads.

## Snapshot

{_snapshot(manifest)}

## Storage

{_storage(manifest)}

## Evaluation

{_evaluation(summary)}

## How to load

```python
import eoq  # registers the "eoq" quantization method with transformers
from transformers import {auto}
model = {auto}.from_pretrained("PATH_OR_REPO")
```

Without eoq installed, the folder's own loader rebuilds the model (pure numpy/torch decoder,
bit-identical, slower):

```python
import sys; sys.path.insert(0, "PATH")
from load_quantized import load
model = load()
```

Without `import eoq`, transformers refuses the folder (a size mismatch on the marker tensor
`{manifest.get('marker')}`) rather than loading random weights.

## Sample generations (greedy)

{_samples(samples)}

## Reproduce

```json
{json.dumps(qc, indent=2, sort_keys=True)}
```

`eoq quantize SOURCE -o OUT --config config.json` with this saved as `config.json`.

## Limitations

- The weights are dequantized on load: memory and speed at inference are those of the
  dense model in the loading dtype; the savings are on disk and in transfer.
- Unquantized tensors ({', '.join(sorted({e.get('reason', 'protected') for e in manifest['tensors'].values() if e['kind'] in ('passthrough', 'protected') and 'method' not in e})) or 'none'}) keep their dtype.
- Quality numbers above hold for the text and protocol stated; other domains may differ.
"""
    data = _front_matter(manifest, config, base_model)
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body).content


def write_card(folder, base_model: Optional[str] = None) -> pathlib.Path:
    folder = pathlib.Path(folder)
    path = folder / "README.md"
    tmp = path.with_name("README.md.tmp")
    tmp.write_text(card_text(folder, base_model))
    tmp.replace(path)
    return path


def _alpha(meta: dict) -> str:
    """AWQ's alpha of an entry: '–' without calibration, 'none' when no scales won the search."""
    if "awq_alpha" not in meta:
        return "–"
    return "none" if meta["awq_alpha"] is None else str(meta["awq_alpha"])
