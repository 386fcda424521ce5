"""Random-weight Llama-shaped HF folders for speed and memory benchmarks at real sizes.

Their quality numbers mean nothing; their times and memory do. N(0, 0.02) Linear and
embedding weights, ones for the norms, bf16 safetensors in 1 GiB shards with an index, and
config.json. Shapes:
  LLAMA1B: hidden 2048, 16 layers, intermediate 8192, 32 heads, 8 KV heads, vocabulary
           32000, untied head: 1.10 B parameters (2.1 GB).
  LLAMA8B: Llama-3-8B's: hidden 4096, 32 layers, intermediate 14336, 32 heads, 8 KV heads,
           vocabulary 128256, untied head: 8.03 B parameters (16.1 GB).
"""

from __future__ import annotations

import json
import pathlib

GIB = 1 << 30
LLAMA1B = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
               rms_norm_eps=1e-5, torch_dtype="bfloat16")
LLAMA8B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
               rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16")
SHAPES = {"llama1b": LLAMA1B, "llama8b": LLAMA8B}


def make_llama(dest: pathlib.Path, shape: dict) -> pathlib.Path:
    """A Llama folder of the given shape with random weights (bf16 safetensors, 1 GiB shards),
    written once (under a temporary name, then renamed)."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    import transformers
    from safetensors.torch import save_file

    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**shape)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shards, cur, size = [], {}, 0

    def flush():
        nonlocal cur, size
        if cur:
            shards.append(cur)
            cur, size = {}, 0

    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > GIB:
            flush()
        cur[name] = t
        size += t.numel() * 2
    flush()
    index = {"metadata": {"total_size": sum(t.numel() * 2 for s in shards for t in s.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        index["weight_map"].update({n: fname for n in shard})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(str(tmp))
    tmp.rename(dest)
    return dest
