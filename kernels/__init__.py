"""Hot-path operators of the engine.

Each op is written here as its torch reference, which is what runs on CPU. Fused GPU kernels (Triton)
slot in behind the same functions once a GPU build is tested on a device; none ships untested.
"""

# Bumped whenever an operator's implementation changes what a forward step costs, so that cached
# SPS(R, W) profiles (engine/sps.py) measured with the old operators are not reused.
KERNELS_VERSION = 4
