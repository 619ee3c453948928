"""polyprune infer: a checkpoint run on a folder of images or a video; masks, overlays, latency."""

import argparse
import json

from .. import choices
from ..choices import Dtype
from ..tasks import infer
from ..tasks.images import IMAGE_EXTENSIONS
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="masks and overlays of a folder of images or a video, with "
                                     "per-frame latency and sustained FPS")
    options.add_checkpoint(p, "train or prune")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (" + ", ".join(IMAGE_EXTENSIONS) + ")")
    source.add_argument("--video", help="a video file (any format ffmpeg reads: mp4, avi, mkv, ...)")
    options.add_out(p, "masks/, overlays (overlays/ or overlay.mp4), frames.csv and summary.json")
    p.add_argument("--batch-size", type=options.positive_int, default=1,
                   help="frames per forward pass; 1 is a live video's latency (default %(default)s)")
    p.add_argument("--size", type=options.input_size, default=None,
                   help="side the frames are resized to for the model (default: the checkpoint's)")
    p.add_argument("--threshold", type=options.fraction, default=0.5,
                   help="foreground where the predicted probability exceeds this (default %(default)s)")
    p.add_argument("--dtype", choices=choices.names(Dtype), default="float32",
                   help="mixed precision (autocast); float16 on GPUs only (default %(default)s)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: on CUDA)")
    options.add_device(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    plan = options.checkpoint_plan(args)
    model = options.load_checkpoint(args)
    try:
        predictor = infer.Predictor(model, size=args.size or plan.input_shape[-1], device=args.device,
                                    dtype=args.dtype, channels_last=args.channels_last,
                                    threshold=args.threshold)
        run_on = infer.infer_video if args.video else infer.infer_images
        summary = run_on(predictor, args.video or args.images, args.out, batch_size=args.batch_size,
                         progress=not args.no_progress)
    except ImportError as error:
        raise options.CommandError(str(error)) from None
    print(json.dumps(summary, indent=1))
    print(f"{summary['frames']} frames: {summary['ms_per_frame']:.1f} ms per frame in the model "
          f"(median; p90 {summary['ms_per_frame_p90']:.1f}), {summary['sustained_fps']:.1f} FPS "
          f"sustained end to end (decoding, inference, writing)")
