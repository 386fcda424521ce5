"""The files: an eoq folder's manifest, entries and checksums (``repo``), their validation
(``validate``), the verified reader (``folder``), the fused decoder of one ecsq entry
(``fused``), and the model sources a conversion reads (``sources``: HF folders, hub ids,
GGUFs, models in memory; ``gguf_weights``).

Imports: kernels (``eoq.ops``), ``eoq.errors``, ``eoq.methods`` and the stand-alone loader only.
"""
