"""``napari-cellseg predict``: segment prompted objects, one object per box or per point."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("image", nargs="?", help="image file (TIFF, PNG, JPEG)")
    src.add_argument("--sample", choices=["cells", "nuclei"], help="use a sample image shipped with the plugin")
    parser.add_argument("--box", nargs=4, type=float, action="append", default=[], metavar=("R0", "C0", "R1", "C1"),
                        help="a box prompt (row/col of two corners, end exclusive); repeat for more objects")
    parser.add_argument("--point", nargs=2, type=float, action="append", default=[], metavar=("R", "C"),
                        help="a click on an object (row, col); one object per point; repeat for more")
    parser.add_argument("--gt-boxes", action="store_true",
                        help="with --sample: prompt with a box around every annotated cell (a demo)")
    parser.add_argument("--model", default=None, help="catalogue name or checkpoint file (default: the default model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--channel", type=int, default=None, help="channel of a multichannel image")
    parser.add_argument("--plane", type=int, default=None, help="plane of a 3D or time stack (first axis)")
    parser.add_argument("--out", required=True, help="output label image (TIFF)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_cellseg.cli import UserError
    from napari_cellseg.core.io import load_sample, read_image, write_labels
    from napari_cellseg.core.models import DEFAULT_MODEL, load_model
    from napari_cellseg.core.predictor import Predictor, masks_to_labels

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
        raise UserError("give at least one --box R0 C0 R1 C1 or --point R C")

    model = load_model(args.model or DEFAULT_MODEL, device=args.device)
    predictor = Predictor(model)
    predictor.set_image(image, channel=args.channel)
    masks, scores = [], []
    if args.box:
        m, s = predictor.predict_boxes(np.array(args.box, float))
        masks.append(m)
        scores.append(s)
    if args.point:
        m, s = predictor.predict_points(np.array(args.point, float))
        masks.append(m)
        scores.append(s)
    masks = np.concatenate(masks)
    scores = np.concatenate(scores)
    labels = masks_to_labels(masks, scores)
    out = write_labels(args.out, labels)
    areas = [int((labels == k + 1).sum()) for k in range(len(masks))]
    print(f"{model.describe()}: {len(masks)} prompts -> {sum(a > 0 for a in areas)} objects, "
          f"mean area {np.mean(areas):.0f} px, mean predicted IoU {scores.mean():.2f}; wrote {out}")
    return 0
