"""Hot-path operators of the engine.

Each op is written here as its torch reference, which is what runs on CPU. Fused GPU kernels (Triton)
slot in behind the same functions once a GPU build is tested on a device; none ships untested.
"""
