"""``napari-cellseg predict``: segment prompted objects, one object per box and one per point.

The engine is the annotation widget's (:class:`~napari_cellseg.core.interactive.InteractiveSegmenter`):

* every ``--box`` is one object, every ``--point`` (a click) is one object;
* every ``--neg-point`` is a negative click given to *every* object (to keep a
  neighbour or the background out), as in the widget's "one object per point" mode;
* a lone click is ambiguous: the best of SAM's three candidate masks (by predicted
  IoU) is kept;
* masks are cut at the model's default logit threshold (the widget's; ``--mask-threshold``
  overrides it);
* the whole image is embedded once (``--zoom``: the widget's prompt-centred zoom,
  one embedding per region, slower but better for small cells with small-input models);
* where objects overlap, the pixel goes to the object with the higher predicted IoU;
  ids are 1, 2, ... in the order boxes, then points; an object with an empty mask
  leaves its id unused.

Examples::

    napari-cellseg predict cells.tif --point 120 340 --point 200 415 --out clicks.tif
    napari-cellseg predict cells.tif --box 100 320 150 380 --neg-point 140 372 --out box.tif
    napari-cellseg predict --sample cells --gt-boxes --out cells_labels.tif
"""

from __future__ import annotations

import argparse

from napari_cellseg._commands import add_precision_argument, zoom_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from napari_cellseg.core.preprocess import VIEW_COUNTS

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("image", nargs="?", help="image file (TIFF, PNG, JPEG)")
    src.add_argument("--sample", choices=["cells", "nuclei"], help="use a sample image shipped with the plugin")
    parser.add_argument("--box", nargs=4, type=float, action="append", default=[], metavar=("R0", "C0", "R1", "C1"),
                        help="a box prompt (row/col of two corners, end exclusive); one object per box; repeat")
    parser.add_argument("--point", nargs=2, type=float, action="append", default=[], metavar=("R", "C"),
                        help="a click on an object (row, col); one object per point; repeat for more")
    parser.add_argument("--neg-point", nargs=2, type=float, action="append", default=[], metavar=("R", "C"),
                        help="a negative click (row, col) given to every object: keeps that place out of all "
                             "masks; repeat for more")
    parser.add_argument("--gt-boxes", action="store_true",
                        help="with --sample: prompt with a box around every annotated cell (a demo)")
    parser.add_argument("--model", default=None,
                        help="catalogue name or checkpoint file (default: the catalogue's default model)")
    parser.add_argument("--mask-threshold", type=float, default=None,
                        help="mask logit threshold (default: the model's own, as in the annotation widget)")
    parser.add_argument("--zoom", action="store_true",
                        help="segment each prompt in an embedding of a window around it (the widget's "
                             "prompt-centred zoom) instead of one embedding of the whole image")
    parser.add_argument("--views", type=int, choices=list(VIEW_COUNTS), default=None,
                        help="orientations of each embedding whose mask logits are averaged (test-time "
                             "augmentation; default: 8 for LiteMedSAM-sized models on a GPU, else 1, as in the widget)")
    parser.add_argument("--invert", choices=["auto", "on", "off"], default="auto",
                        help="also embed each window with inverted intensities and average the mask logits "
                             "(test-time augmentation; auto: on for LiteMedSAM-sized models on single-channel "
                             "images, as in the widget)")
    parser.add_argument("--no-map-clicks", action="store_true",
                        help="give clicks to SAM as points even when the model predicts a cell map (by default "
                             "such a model answers a click with its map cell's box, as the widget does)")
    parser.add_argument("--click-answer", choices=["sam", "map"], default="sam",
                        help="a click the cell map finds a cell for: SAM's drawing from the cell's box (default, as "
                             "in the widget) or the map cell itself (faster; clicks with --neg-point still go to SAM)")
    parser.add_argument("--map-scale", type=zoom_argument, default="auto", metavar="ZOOM",
                        help="zoom of a click's map window before the model sees it (0.25-4; 1: as it is): below 1 "
                             "for cells much larger than the model's training cells, above 1 for tiny ones, as "
                             "segment --scale; 'auto' (the default): measured once around the first click, for "
                             "models that record their training cells' sizes (else 1)")
    parser.add_argument("--map-zoom-views", type=float, nargs="+", default=(), metavar="Z",
                        help="test-time augmentation of the click maps over zoom: also map each click's window at "
                             "its zoom times each Z (0.5-2) and average, e.g. --map-zoom-views 1.25 (phase "
                             "contrast: click IoU 0.43 -> 0.50; more map time per click)")
    parser.add_argument("--missed-click", choices=["box", "point"], default="box",
                        help="a click on which the cell map sees no cell: a box of the typical cell size centred on "
                             "it (default, as in the widget) or the click as a point")
    parser.add_argument("--merged-ratio", type=merged_ratio_argument, default=1.5, metavar="R",
                        help="a click on a map cell more than R times the area of the window's median map cell "
                             "(the map merged it with its neighbours) gets a box of the typical cell size centred "
                             "on it instead of the merged cell's box (default 1.5, as in the widget; 'none': "
                             "always the map cell's box)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    add_precision_argument(parser)
    parser.add_argument("--channel", type=int, default=None, help="channel of a multichannel image")
    parser.add_argument("--plane", type=int, default=None, help="plane of a 3D or time stack (first axis)")
    parser.add_argument("--out", required=True, help="output label image (TIFF)")


def merged_ratio_argument(text: str):
    """``--merged-ratio``: a number above 1, or 'none'."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 1.0:
        raise argparse.ArgumentTypeError(f"expected a number above 1 or 'none', got {text!r}")
    return value


def _check_inside(name: str, coords, shape) -> None:
    from napari_cellseg.cli import UserError

    rows, cols = shape
    for r, c in coords:
        if not (-0.5 <= r <= rows - 0.5 and -0.5 <= c <= cols - 0.5):
            raise UserError(f"{name} {r:g} {c:g} lies outside the image of shape ({rows}, {cols}); "
                            "coordinates are (row, col) in pixels")


def paint_by_score(objects, shape, dtype=None):
    """Label image of objects (ids 1, 2, ... in order); on overlaps the higher score wins (earlier on ties)."""
    import numpy as np

    out = np.zeros(tuple(shape[:2]), dtype or (np.uint16 if len(objects) < 2**16 else np.uint32))
    order = sorted(range(len(objects)), key=lambda k: (-objects[k].score, k))
    for k in reversed(order):  # worst first, so the best ends on top
        obj = objects[k]
        if obj.area:
            r0, c0, r1, c1 = obj.bbox
            out[r0:r1, c0:c1][obj.mask] = k + 1
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_cellseg.cli import UserError
    from napari_cellseg.core import models
    from napari_cellseg.core.interactive import AnnotationConfig, InteractiveSegmenter, ObjectPrompt
    from napari_cellseg.core.io import load_sample, read_image, write_labels
    from napari_cellseg.core.predictor import clip_boxes
    from napari_cellseg.core.preprocess import as_plane

    if args.sample:
        sample = load_sample(args.sample)
        image = sample.image
        if args.gt_boxes:
            from skimage.measure import regionprops

            args.box = args.box + [list(r.bbox) for r in regionprops(sample.labels)]
    else:
        image = read_image(args.image)
        if args.gt_boxes:
            raise UserError("--gt-boxes needs --sample")
    if image.ndim >= 3 and args.plane is not None:
        if not 0 <= args.plane < image.shape[0]:
            raise UserError(f"--plane {args.plane} is out of range for a stack of {image.shape[0]} planes")
        image = image[args.plane]
    elif image.ndim == 3 and image.shape[-1] not in (3, 4) and args.channel is None:
        raise UserError(f"image has shape {image.shape}: pass --plane N for a stack or --channel N for channels")
    if not args.box and not args.point:
        raise UserError("give at least one --box R0 C0 R1 C1 or --point R C (--neg-point alone makes no object)")
    shape = as_plane(image, args.channel).shape[:2]
    _check_inside("--point", args.point, shape)
    _check_inside("--neg-point", args.neg_point, shape)
    boxes = clip_boxes(np.array(args.box, float), shape) if args.box else np.zeros((0, 4))

    neg = np.array(args.neg_point, float).reshape(-1, 2)
    neg_labels = np.zeros(len(neg))
    prompts = [ObjectPrompt(points=neg, labels=neg_labels, box=b) for b in boxes]
    prompts += [ObjectPrompt(points=np.vstack([[p], neg]), labels=np.r_[1.0, neg_labels]) for p in args.point]

    name = args.model or models.DEFAULT_MODEL  # read at run time: the catalogue's default may change
    model = models.load_model(name, device=args.device, precision=args.precision)
    config = AnnotationConfig(zoom="auto" if args.zoom else "off", mask_threshold=args.mask_threshold,
                              clicks_from_map=not args.no_map_clicks, missed_click=args.missed_click,
                              merged_ratio=args.merged_ratio,
                              click_answer=args.click_answer, map_scale=args.map_scale,
                              map_zoom_views=tuple(args.map_zoom_views),
                              views=args.views,
                              invert={"auto": None, "on": True, "off": False}[args.invert])
    segmenter = InteractiveSegmenter(model, config=config)
    segmenter.set_image(image, channel=args.channel)
    objects = segmenter.segment_many(prompts)
    labels = paint_by_score(objects, shape)
    out = write_labels(args.out, labels)
    areas = np.bincount(labels.ravel(), minlength=len(objects) + 1)[1:]
    scores = np.array([o.score for o in objects])
    kinds = []
    if len(boxes):
        kinds.append(f"{len(boxes)} box{'es' if len(boxes) > 1 else ''}")
    if args.point:
        kinds.append(f"{len(args.point)} point{'s' if len(args.point) > 1 else ''}")
    extra = f", {len(neg)} negative point{'s' if len(neg) > 1 else ''} each" if len(neg) else ""
    threshold = f"{segmenter.mask_threshold:g}"
    if segmenter.box_mask_threshold != segmenter.mask_threshold:  # a model with its own box decoder
        threshold += f" (boxes {segmenter.box_mask_threshold:g}"
        if args.point and segmenter.map_guided() and segmenter.click_mask_threshold != segmenter.box_mask_threshold:
            threshold += f", clicks {segmenter.click_mask_threshold:g}"
        threshold += ")"
    print(f"{model.describe()}{' (default model)' if args.model is None else ''}, mask threshold "
          f"{threshold}{', zoom' if args.zoom else ''}: {len(prompts)} prompts "
          f"({' + '.join(kinds)}{extra}) -> {int((areas > 0).sum())} objects, mean area {areas.mean():.0f} px, "
          f"mean predicted IoU {scores.mean():.2f}; wrote {out}")
    return 0
