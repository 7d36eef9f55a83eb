"""Keep torch's Triton out of napari's process when no CUDA driver is installed.

Linux builds of torch ship Triton, and ``import torchvision`` (which
segment-anything needs) makes torch import Triton. Triton's LLVM clashes with
the LLVM that Mesa's OpenGL drivers have already loaded into napari's process:
the import dies with a segmentation fault (seen with napari 0.9 under Xvfb and
Mesa llvmpipe, torch 2.14.1, triton 3.8). Triton only compiles CUDA kernels, so
when the CUDA driver library is absent it is useless: we mark it unavailable
before anything imports it (``import triton`` then raises ImportError, which
torch handles). Machines with an NVIDIA driver keep Triton (their OpenGL is
NVIDIA's, without Mesa's LLVM). ``NAPARI_CELLSEG_ALLOW_TRITON=1`` disables this.
"""

from __future__ import annotations

import ctypes.util
import os
import sys


def block_triton_without_cuda() -> bool:
    """Make ``import triton`` fail when no CUDA driver exists; True if it was blocked."""
    if "triton" in sys.modules or os.environ.get("NAPARI_CELLSEG_ALLOW_TRITON") == "1":
        return False
    if ctypes.util.find_library("cuda") is not None:
        return False
    sys.modules["triton"] = None
    return True
