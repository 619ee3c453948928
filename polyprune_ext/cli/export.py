"""polyprune export: a checkpoint as an ONNX file, checked in onnxruntime before it is kept."""

import argparse

from .. import choices, export
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="ONNX export of a checkpoint, checked in onnxruntime")
    options.add_checkpoint(p, "train or prune")
    p.add_argument("--onnx", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=options.input_size, default=None,
                   help="side of the traced input; the file takes any batch and size "
                        "(default: the checkpoint's)")
    p.add_argument("--dtype", choices=[d for d in choices.names(choices.Dtype) if d in export.TOLERANCE],
                   default="float32", help="float16: a half-precision graph for GPUs (default %(default)s)")
    p.add_argument("--opset", type=options.positive_int, default=export.OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--provider", choices=choices.names(choices.Provider), default="cpu",
                   help="onnxruntime execution provider the check runs on (default %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    plan = options.checkpoint_plan(args)
    model = options.load_checkpoint(args)
    try:
        done = export.export_onnx(model, args.onnx, size=args.size or plan.input_shape[-1],
                                  dtype=args.dtype, opset=args.opset, provider=args.provider)
    except (RuntimeError, ImportError) as error:
        raise options.CommandError(str(error)) from None
    print(f"wrote {done.path}: opset {done.opset}, {done.dtype}, input image (batch, "
          f"{plan.input_shape[1]}, height, width); onnxruntime {done.provider} matches PyTorch to "
          f"{done.max_rel_error:.1e} of the largest output (bound {export.TOLERANCE[done.dtype]:.0e}) "
          f"on inputs {', '.join(str(list(s)) for s in done.shapes)}")
