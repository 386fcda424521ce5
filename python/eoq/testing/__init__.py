"""Test models from PyPI packages: SmolLM2-135M (a Q4_1 GGUF), its continuous-weight
dithered copy, and all-MiniLM-L6-v2 (``models``; ``dithered`` builds the copy). Used by the
tests, the benchmarks and ``make demo``; nothing else in eoq imports them.
"""
