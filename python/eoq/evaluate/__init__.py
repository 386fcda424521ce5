"""Evaluation against the 16-bit base: KL divergence, top-1 agreement and perplexity on text
windows, or embedding similarity for encoders (``compare``; ``embeddings``).

Imports: kernels, methods, format and load only.
"""

from .compare import evaluate, evaluate_tokens, format_result

__all__ = ["evaluate", "evaluate_tokens", "format_result"]
