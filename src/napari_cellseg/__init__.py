"""napari-cellseg: cell segmentation in napari with Segment Anything.

Importing this package is cheap: it loads neither torch nor Qt. The compute
core lives in :mod:`napari_cellseg.core`, the napari widgets in
:mod:`napari_cellseg._napari` and the command line in :mod:`napari_cellseg.cli`.
"""

__version__ = "0.1.0"
