"""What a reader checks in a manifest before it trusts any field (docs/FORMAT.md).

A folder may come from a stranger or a damaged disk, so nothing read from it is used before
it is checked: every entry's kind, shapes, dtypes, method parameters and stored parts are
validated against each other and against fixed ranges *before* anything is allocated from
them (a ``qshape`` of [2^28, 64] must fail here, not after a 64 GB allocation), every
entry's checksum must be present (eoq.format.folder compares it with the stored bytes), no stored
tensor may be claimed twice, and the marker must name a quantized entry. Each problem raises
FormatError naming the file, the tensor and the field.

The checks themselves live in the stand-alone loader (python/eoq/standalone/
load_quantized.py), which every folder carries and which must run without eoq: eoq uses
that very code, so the two readers cannot drift apart. Its FormatError is eoq.FormatError.
"""

from __future__ import annotations

from ..standalone import load_quantized as _reader

FILE_NAME = _reader.FILE_NAME
validate_entry = _reader.validate_entry
validate_manifest = _reader.validate_manifest
