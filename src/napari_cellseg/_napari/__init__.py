"""napari widgets, workers and sample data of napari-cellseg (a thin layer over the core)."""

from napari_cellseg._napari._torch_guard import block_triton_without_cuda

block_triton_without_cuda()
