"""What pruning buys where a model is deployed: Unet-resnet34 exported to ONNX, unpruned and with
--amount (default 50%) of its conv FLOPs pruned, timed in onnxruntime (and in PyTorch, for
reference); then `polyprune infer` with each model on a generated colonoscopy-like video.

The pruned model is made as benchmarks/gpu_latency.py makes it: random weights and random
channel scores (speed does not depend on which channels go), every group rounded to multiples
of 8 channels; here through a PruningPlan, so that it is a checkpoint `polyprune infer` reads.
onnxruntime times both exports round-robin in one process (export.onnx_latency: warm-up, then
the median and p90 of --repeats rounds) with --threads threads; the PyTorch rows are
speed.latency in float32, measured after. The video holds --frames synthetic polyp frames of
--frame-size pixels (H.264, 25 FPS); `polyprune infer` resizes them to --size: its median
milliseconds per frame in the model, and its sustained FPS end to end (decoding, resizing,
inference, overlays, H.264 encoding, PNG masks). Prints the tables; --append adds them to
RESULTS.md.
"""

import argparse
import contextlib
import fractions
import io
import json
import tempfile
from pathlib import Path

import av
import segmentation_models_pytorch as smp
import torch

import polyprune_ext
from _common import add_options, append_if_asked, heading, setup
from polyprune_ext import PruningPlan, analyze, cli, cost, export, select_channels, speed
from polyprune_ext.tasks.polyp import synthetic_polyp


def checkpoints(folder, amount, size):
    """{name: (model, checkpoint directory, conv GFLOPs)} of the unpruned and pruned models."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    models = {}
    for name in ("unpruned", f"pruned -{amount:.0%} FLOPs"):
        model = smp.Unet("resnet34", encoder_weights=None).eval()
        plan = PruningPlan.for_model(model, x.shape)
        analysis = analyze(model, x)
        keep = None
        if name != "unpruned":
            gen = torch.Generator().manual_seed(0)
            scores = {i: torch.rand(g.size, generator=gen) for i, g in enumerate(analysis.groups) if g.prunable}
            keep = select_channels(analysis, scores, amount=amount, target="flops", round_to=8)
            plan.prune_(model, analysis, keep)
        gflops = cost(analysis, {i: len(k) for i, k in keep.items()} if keep else None)["flops"] / 1e9
        directory = Path(folder) / name.split()[0]
        directory.mkdir()
        polyprune_ext.save(directory / "model.safetensors", model, plan)
        models[name] = (model, directory, gflops)
    return models


def write_video(path, frames, size):
    """``frames`` synthetic polyp frames, ``size`` pixels square, as H.264 at 25 FPS."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(25))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = synthetic_polyp(0, i, size)[0]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--frame-size", type=int, default=480)
    add_options(parser)
    args = parser.parse_args()
    setup(args)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        models = checkpoints(tmp, args.amount, args.size)
        paths = {name: Path(tmp) / f"{directory.name}.onnx" for name, (_, directory, _) in models.items()}
        exports = {name: export.export_onnx(model, paths[name], size=args.size)
                   for name, (model, _, _) in models.items()}
        rows = export.onnx_latency(paths, batch=1, size=args.size, threads=threads,
                                   warmup=args.warmup, repeats=args.repeats)
        rows += [{"model": name, "threads": threads, **speed.latency(model, batch=1, size=args.size,
                                                                     warmup=args.warmup, repeats=args.repeats)}
                 for name, (model, _, _) in models.items()]
        write_video(Path(tmp) / "video.mp4", args.frames, args.frame_size)
        infer_rows = []
        for name, (_, directory, _) in models.items():
            with contextlib.redirect_stdout(io.StringIO()):  # its summary, tabled below
                cli.main(["infer", "--checkpoint", str(directory), "--video", str(Path(tmp) / "video.mp4"),
                          "--out", str(Path(tmp) / f"infer-{directory.name}"), "--device", "cpu",
                          "--no-progress"])
            summary = json.loads((Path(tmp) / f"infer-{directory.name}" / "summary.json").read_text())
            infer_rows.append((name, summary))

    lines = heading("cpu") + [
        f"Unet-resnet34, random weights, {args.size}x{args.size}, batch 1, float32, {threads} threads; "
        f"pruned: random scores, groups rounded to 8 channels. "
        + ", ".join(f"{name}: {gflops:.1f} conv GFLOPs, onnxruntime within {exports[name].max_rel_error:.1e}"
                    f" of PyTorch" for name, (_, _, gflops) in models.items()), "",
        export.format_latency(rows), "",
        f"`polyprune infer --video` (batch 1, float32, CPU, {threads} threads), {args.frames} synthetic "
        f"frames of {args.frame_size}x{args.frame_size} (H.264, 25 FPS), resized to {args.size}:", "",
        "| model | frames | ms per frame in the model (median) | p90 | sustained FPS end to end |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {name} | {s['frames']} | {s['ms_per_frame']:.1f} | {s['ms_per_frame_p90']:.1f} | "
          f"{s['sustained_fps']:.2f} |" for name, s in infer_rows), ""]
    print("\n".join(lines))
    append_if_asked(lines, args)


if __name__ == "__main__":
    main()
