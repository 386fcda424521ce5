"""The model card (the folder's README.md), built from the manifest with huggingface_hub's
ModelCard: front matter for the hub, then what was done and how to load it."""

from __future__ import annotations

import json
import pathlib

from . import repo


def card_text(manifest: dict, config: dict) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    src, t, qc = manifest["source"], manifest["totals"], manifest["config"]
    base = src["name"] if src["kind"] == "hub" else None
    data = ModelCardData(library_name="transformers", tags=["eoq", "quantized", qc["method"]],
                         base_model=base, base_model_relation="quantized" if base else None)
    calib = manifest.get("calibration")
    if calib and calib.get("source"):
        calib_line = (f"activation statistics from `{calib['source']}` ({calib['tokens']} tokens)"
                      + (", AWQ scales" if qc["awq"] else ""))
    elif calib:
        calib_line = f"none: `{calib['requested']}` was asked for but {calib['reason']}"
    else:
        calib_line = "none (data-free)"
    body = f"""
# {src['name'].rstrip('/').split('/')[-1]} — eoq {qc['method']} {qc['bits']} bits

Quantized with [eoq](https://pypi.org/project/eoq/) {manifest['eoq_version']} from `{src['name']}`
({src['architecture']}).

| | |
|---|---|
| method | `{qc['method']}`, bits {qc['bits']}, codec `{qc['codec']}` |
| calibration | {calib_line} |
| bits/weight (quantized weights) | {t['bits_per_weight_quantized']:.3f} |
| bits/weight (all parameters) | {t['bits_per_weight_all']:.3f} |
| size | {t['original_bytes'] / 1e6:.1f} MB → {t['stored_bytes'] / 1e6:.1f} MB (×{t['ratio']:.2f}) |
| tensors | {', '.join(f'{k}: {v}' for k, v in sorted(t['counts'].items()))} |

## How to load

```python
import eoq  # registers the "eoq" quantizer with transformers
from transformers import AutoModelForCausalLM  # AutoModel for encoders
model = AutoModelForCausalLM.from_pretrained("PATH")
```

or, with the folder alone (no eoq needed; a slower pure-torch decoder is used without it):

```python
import sys; sys.path.insert(0, "PATH")
from load_quantized import load
model = load()
```

Without `import eoq`, transformers refuses the folder (a size mismatch on
`{manifest.get('marker')}`) instead of loading random weights.

## Reproduce

```json
{json.dumps(qc, indent=2, sort_keys=True)}
```
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body).content


def write_card(folder) -> pathlib.Path:
    folder = pathlib.Path(folder)
    manifest = repo.read_manifest(folder)
    config = json.loads((folder / "config.json").read_text())
    path = folder / "README.md"
    path.write_text(card_text(manifest, config))
    return path
