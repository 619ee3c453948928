"""polyprune bench: latency and FPS of a checkpoint (or an unpruned model), real-time or not; in
PyTorch, or exported to ONNX and run in onnxruntime beside its unpruned base."""

import argparse
import tempfile
from pathlib import Path

import torch

from .. import export, models, speed
from ..models import smp_model
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency and FPS, and whether the model is real-time")
    p.add_argument("--checkpoint", help="directory written by train or prune (default: an "
                                        "unpruned --arch/--encoder model)")
    p.add_argument("--arch", default="Unet", help="smp architecture without --checkpoint (default %(default)s)")
    p.add_argument("--encoder", default="resnet34", help="smp encoder without --checkpoint (default %(default)s)")
    p.add_argument("--size", type=int, default=352, help="input side in pixels (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="the larger batch timed beside batch 1 (default %(default)s)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="torch: the model in PyTorch; onnxruntime: exported to ONNX (checked), "
                        "a pruned checkpoint beside its unpruned base, round-robin, on the CUDA "
                        "provider with --device cuda (default %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of either runtime (default: torch's, one per core)")
    options.add_run(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    named = _models(args, beside_base=args.runtime == "onnxruntime")
    if args.runtime == "onnxruntime":
        rows = _onnx_rows(named, args)
        print(export.format_latency(rows))
    else:
        (name, model), = named.items()
        rows = [dict(r, model=name) for r in speed.speed_table(model, size=args.size, batches=(1, args.batch_size),
                                                               device=args.device)]
        print(speed.format_table(rows))
    print()
    for name in named:
        ours = [r for r in rows if r["model"] == name]
        verdict = "real-time" if speed.is_real_time(ours, size=args.size) else "not real-time"
        print(f"{name}: {verdict} in {args.runtime} on {args.device}, {torch.get_num_threads()} CPU threads "
              f"(>= {speed.REAL_TIME_FPS} FPS at batch 1, {args.size}x{args.size})")


def _models(args: argparse.Namespace, beside_base: bool) -> dict[str, torch.nn.Module]:
    """{name: model}: the checkpoint (after its unpruned base, rebuilt from its plan, when it is
    pruned and ``beside_base``), or the --arch/--encoder model."""
    if not args.checkpoint:
        return {f"{args.arch}-{args.encoder}": smp_model(args.arch, args.encoder)}
    model, plan = options.load_checkpoint(args.checkpoint)
    if not (beside_base and plan.steps and plan.base):
        return {"checkpoint": model}
    return {"unpruned": models.build(plan.base), "pruned": model}


def _onnx_rows(named: dict[str, torch.nn.Module], args: argparse.Namespace) -> list[dict]:
    """Each model exported (float32, and float16 on CUDA) and timed round-robin at batch 1 and
    --batch-size."""
    provider = "cuda" if args.device.startswith("cuda") else "cpu"
    dtypes = ("float32", "float16") if provider == "cuda" else ("float32",)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            paths = {name: Path(tmp) / f"{name}-{dtype}.onnx" for name in named}
            try:
                for name, model in named.items():
                    export.export_onnx(model, paths[name], size=args.size, dtype=dtype, provider=provider)
            except (RuntimeError, ImportError) as error:
                raise SystemExit(f"polyprune bench: {error}") from None
            for batch in (1, args.batch_size):
                rows += export.onnx_latency(paths, batch=batch, size=args.size, provider=provider)
    return rows
