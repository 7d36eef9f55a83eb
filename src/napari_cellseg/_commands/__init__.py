"""Sub-commands of the ``napari-cellseg`` command line (see :mod:`napari_cellseg.cli`)."""
