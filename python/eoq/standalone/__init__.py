"""The stand-alone loader eoq copies into every folder (load_quantized.py); eoq reuses its checks."""
