"""Calibration: what the float model tells the quantizer before any weight is coded.

``statistics`` (activation statistics, covariances for error feedback), ``sensitivity`` (the
Fisher pass: each tensor's KL coefficient; ``fisher_blockwise``: the same, block by block),
``blockwise`` (running a folder's model one decoder block at a time), ``sampling_blockwise``
(self-generated calibration text), ``stored_inputs`` / ``covariance_store`` / ``streamed_vocab``
(bounded memory) and the two resume checkpoints.

Imports: kernels, methods and format only.
"""
