"""What a finished conversion says about itself, in a table that fits one screen: one row per
kind x method (tensors, parameters, sizes, bits per weight as mean and range), the whole
model's line, the budget's, and the largest tensors; or, asked for, one row per tensor
(``eoq info OUT --all``).
"""

from __future__ import annotations

import resource

from ..format import repo


def _bits(e: dict) -> float:
    """An entry's stored bits per weight (quantized: the manifest's; plain: its dtype's)."""
    if repo.is_quantized(e):
        return float(e["bits_per_weight"])
    return 8.0 * e["stored_bytes"] / max(repo.entry_numel(e), 1)


def summary_table(manifest: dict, top: int = 5, per_tensor: bool = False) -> str:
    """Counts and sizes by kind and method, the totals and the budget; with ``top`` > 0 the
    largest quantized tensors; with ``per_tensor`` every tensor's row instead of the groups."""
    tensors = manifest["tensors"]
    lines = per_tensor_rows(tensors) if per_tensor else group_rows(tensors)
    t = manifest["totals"]
    lines.append(f"whole model: {t['bits_per_weight_all']:.3f} bits per parameter ({t['all_params']:,} parameters), "
                 f"{t['original_bytes'] / 1e6:.2f} MB -> {t['stored_bytes'] / 1e6:.2f} MB (x{t['ratio']:.2f}); "
                 f"{t['bits_per_weight_quantized']:.3f} bits/weight over the quantized weights")
    alloc = manifest.get("allocation")
    if alloc and alloc.get("budget_bits"):
        kl = alloc.get("predicted_kl")
        lines.append(f"budget: {alloc['budget_bits'] / 8 / 1e6:.2f} MB "
                     f"({alloc['budget_bits'] / max(t['all_params'], 1):.3f} bits per parameter), "
                     f"{alloc['mode']} allocation" + (f", predicted KL {kl:.4g}" if kl is not None else ""))
    if top and not per_tensor:
        big = sorted(((e["stored_bytes"], n) for n, e in tensors.items() if repo.is_quantized(e)), reverse=True)[:top]
        lines.append(f"largest quantized tensors ({len(big)} of {sum(map(repo.is_quantized, tensors.values()))}):")
        for size, n in big:
            e = tensors[n]
            lines.append(f"  {n:<48} {str(e['shape']):>14} {e['method']:<6} {e['bits_per_weight']:6.3f} bits/w "
                         f"{size / 1e6:8.2f} MB")
    return "\n".join(lines)


def group_rows(tensors: dict) -> list[str]:
    rows: dict[tuple, list] = {}
    for e in tensors.values():
        n = repo.entry_numel(e)
        acc = rows.setdefault((e["kind"], e.get("method", "-")), [0, 0, 0, 0, []])
        acc[0] += 1
        if e["kind"] == "tied":  # stored under the parameter it is tied to
            continue
        acc[1] += n
        acc[2] += n * repo.entry_itemsize(e)
        acc[3] += e["stored_bytes"]
        acc[4].append(_bits(e))
    lines = [f"{'kind':<12} {'method':<7} {'tensors':>7} {'params':>13} {'original MB':>11} {'stored MB':>10} "
             f"{'bits/w':>7} {'range':>13}"]
    for (kind, method), (k, n, orig, stored, bits) in sorted(rows.items()):
        if not bits:
            lines.append(f"{kind:<12} {method:<7} {k:>7} {'(stored with what they are tied to)':>57}")
            continue
        span = f"{min(bits):.2f}-{max(bits):.2f}" if max(bits) - min(bits) > 5e-3 else ""
        lines.append(f"{kind:<12} {method:<7} {k:>7} {n:>13,} {orig / 1e6:>11.2f} {stored / 1e6:>10.2f} "
                     f"{8 * stored / max(n, 1):>7.3f} {span:>13}")
    return lines


def per_tensor_rows(tensors: dict) -> list[str]:
    lines = [f"{'tensor':<52} {'shape':>14} {'kind':<11} {'method':<7} {'bits/w':>7} {'stored MB':>10}"]
    for name, e in sorted(tensors.items()):
        if e["kind"] == "tied":
            lines.append(f"{name:<52} {str(e['shape']):>14} {'tied':<11} {'-':<7} {'':>7} {'-> ' + e['tied_to']}")
            continue
        lines.append(f"{name:<52} {str(e['shape']):>14} {e['kind']:<11} {e.get('method', '-'):<7} {_bits(e):>7.3f} "
                     f"{e['stored_bytes'] / 1e6:>10.3f}")
    return lines


def run_line(seconds: float) -> str:
    """Wall time and this process's peak memory (ru_maxrss: KiB on Linux; Ray workers' not included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"wall time {seconds:.1f} s, peak memory {peak / 2 ** 20:.2f} GiB (this process)"
