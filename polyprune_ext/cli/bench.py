"""polyprune bench: latency and FPS of a checkpoint (or an unpruned model), real-time or not; in
PyTorch, or exported to ONNX and run in onnxruntime beside its unpruned base."""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .. import export, models, speed
from ..models import named_model
from . import options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency and FPS, and whether the model is real-time")
    p.add_argument("--checkpoint", type=options.checkpoint_folder,
                   help="folder written by train, prune or sparsify (default: an unpruned "
                        "--arch/--encoder model)")
    options.add_arch(p, when=", without --checkpoint")
    p.add_argument("--size", type=options.input_size, default=352,
                   help="input side in pixels (default %(default)s, where real-time is judged)")
    p.add_argument("--batch-size", type=options.positive_int, default=8,
                   help="the larger batch timed beside batch 1 (default %(default)s)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="torch: the model in PyTorch; onnxruntime: exported to ONNX (checked), "
                        "a pruned checkpoint beside its unpruned base, round-robin, on the CUDA "
                        "provider with --device cuda (default %(default)s)")
    p.add_argument("--threads", type=options.positive_int, default=None,
                   help="CPU threads of either runtime, pinned while timing (default: torch's, one per core)")
    p.add_argument("--warmup", type=options.count, default=5,
                   help="untimed runs first (default %(default)s)")
    options.add_device(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    named = _models(args, beside_base=args.runtime == "onnxruntime")
    if args.runtime == "onnxruntime":
        rows = _onnx_rows(named, args)
        print(export.format_latency(rows))
    else:
        (name, model), = named.items()
        options.say(f"{args.warmup} warm-up runs, then runs in chunks of 10 until the median moves by "
                    "less than 2% (at most 200); median, p10 and p90 in ms")
        rows = []
        for batch in dict.fromkeys((1, args.batch_size)):  # a line per batch size: bench takes minutes
            start = time.perf_counter()
            timed = speed.speed_table(model, size=args.size, batches=(batch,), device=args.device,
                                      threads=args.threads, warmup=args.warmup)
            options.say(f"batch {batch}: {len(timed)} settings timed in {time.perf_counter() - start:.0f} s")
            rows += [dict(r, model=name) for r in timed]
        print(speed.format_table(rows))
    print()
    for name in named:
        ours = [r for r in rows if r["model"] == name]
        verdict = "real-time" if speed.is_real_time(ours, size=args.size) else "not real-time"
        print(f"{name}: {verdict} in {args.runtime} on {args.device}, {args.threads or torch.get_num_threads()} "
              f"CPU threads (>= {speed.REAL_TIME_FPS} FPS at batch 1, {args.size}x{args.size})")


def _models(args: argparse.Namespace, beside_base: bool) -> dict[str, torch.nn.Module]:
    """{name: model}: the checkpoint (after its unpruned base, rebuilt from its plan, when it is
    pruned and ``beside_base``), or the --arch/--encoder model."""
    if not args.checkpoint:
        return {f"{args.arch}-{args.encoder}": named_model(args.arch, args.encoder, **args.model_args)}
    plan = options.checkpoint_plan(args)
    model = options.load_checkpoint(args)
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
            for name, model in named.items():
                export.export_onnx(model, paths[name], size=args.size, dtype=dtype, provider=provider)
            for batch in dict.fromkeys((1, args.batch_size)):
                rows += export.onnx_latency(paths, batch=batch, size=args.size, provider=provider,
                                            threads=args.threads, warmup=args.warmup)
    return rows
