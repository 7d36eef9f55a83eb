"""Qt-free compute core of napari-cellseg.

Nothing here imports Qt, napari or magicgui, and torch is imported only inside
the functions that need it, so the core serves the widgets, the command line
and batch scripts alike.
"""
