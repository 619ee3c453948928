"""Structural pruning, ours against Torch-Pruning: is the result right, how long did it take, how
much of each model is prunable.

The models: every pair of the smp test matrix (11 architectures x 10 encoders), and the MONAI
networks (2-D and 3-D) and smp Unets with timm encoders of polyprune_ext.testing.ZOO (ours only;
ConvNeXt-V2 pruned through its channel-mixing norms, mixing_norms="prune"). For each (float64,
eval mode, batch norms with random statistics so that nothing is trivially zero), 50% of the
channels of every prunable group (whole runs where a group goes in runs) are chosen at random and
removed by each library. "Right" is function preservation: a copy of the unpruned model in which
the removed channels are zeroed at every module that, by the library's own account, produces them
(and, for ours, left out of the statistics of the norms pruned through) must give the same output
as the pruned model (relative error <= 1e-6). A model that prunes but gives another output, or
changes the output shape, is "wrong"; exceptions and runs past --timeout are reported.

Each trial runs in its own process (Torch-Pruning has hung on some models). Time is analysis plus
pruning, after one untimed forward pass (torch's own first float64 forward of some models takes
tens of seconds), without the model's construction or the check. For our trials, the share of
the conv output channels (the encoder's, for the smp matrix) that are in prunable groups able to
lose some (polyprune_ext.testing.conv_share). Also: the time of our analysis plus a 50% prune of
Unet with resnet34, resnet50 and efficientnet-b0 at 352x352.

Torch-Pruning is a benchmark-only dependency: pip install ../shared/wheels/torch_pruning-*.whl.
Prints markdown tables and appends them to benchmarks/RESULTS.md (with --append).
"""

import argparse
import copy
import json
import subprocess
import sys
import time

import torch

from _common import add_options, append_if_asked, heading, setup
from polyprune_ext.testing import (SMP_ARCHITECTURES, SMP_ENCODERS, ZOO, conv_share,
                                   masked_norm_reference, random_runs, randomize_norms)

# The smp test matrix (every pair smp can build), then the MONAI and timm models.
MODELS = [f"{arch}-{encoder}" for arch in SMP_ARCHITECTURES for encoder in SMP_ENCODERS] + list(ZOO)
SIZE = 128


def build(name):
    """(model, example input, mixing_norms, prefix of the convs whose share is reported)."""
    if name in ZOO:
        make, shape, mixing_norms = ZOO[name]
        torch.manual_seed(0)
        model, prefix = make(), ""
    else:
        import segmentation_models_pytorch as smp

        arch, encoder = name.split("-", 1)
        model, shape, mixing_norms, prefix = getattr(smp, arch)(encoder, encoder_weights=None), \
            (1, 3, SIZE, SIZE), "freeze", "encoder."
    model = model.double().eval()
    randomize_norms(model)
    return model, torch.randn(shape, dtype=torch.float64), mixing_norms, prefix


def zero_hook(channels):
    def hook(module, inputs, out):
        out = out.clone()
        out[:, channels] = 0
        return out
    return hook


def half(size, gen):
    return torch.randperm(size, generator=gen)[: size // 2].sort().values.tolist()


def ours(model, x, gen, mixing_norms, prefix):
    """(reference, seconds, share) after pruning model in place with polyprune_ext."""
    from polyprune_ext import analyze
    from polyprune_ext.structure import prune_

    unpruned = copy.deepcopy(model)
    start = time.perf_counter()
    analysis = analyze(model, x, mixing_norms=mixing_norms)
    keep = {i: random_runs(g.size // g.unit, g.unit, 0.5, gen)
            for i, g in enumerate(analysis.groups) if g.prunable and g.size > g.unit}
    prune_(model, analysis, keep)
    seconds = time.perf_counter() - start
    return masked_norm_reference(unpruned, analysis, keep), seconds, conv_share(model, analysis, prefix)


def torch_pruning(model, x, gen):
    """The same with Torch-Pruning's dependency graph, every Conv2d group but the head."""
    import torch_pruning as tp

    reference = copy.deepcopy(model)
    names = {m: n for n, m in model.named_modules()}
    zeroed = []
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    head = [m for m in model.segmentation_head.modules() if isinstance(m, torch.nn.Conv2d)]
    for group in graph.get_all_groups(ignored_layers=head, root_module_types=[torch.nn.Conv2d]):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        if len(group[0].idxs) < 2:
            continue
        group = graph.get_pruning_group(root, handler, idxs=half(len(group[0].idxs), gen))
        for item in group:
            module = item.dep.target.module
            if item.dep.handler.__name__ == "prune_out_channels" and module in names and \
                    isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
                zeroed.append((names[module], list(item.idxs)))
        group.prune()
    seconds = time.perf_counter() - start
    for name, channels in zeroed:
        reference.get_submodule(name).register_forward_hook(zero_hook(channels))
    return reference, seconds, None


def trial(library, name):
    """One model with one library: a dict with status, error, seconds, params before and after."""
    if library == "tp" and name in ZOO:
        return {"status": "not run"}
    try:
        model, x, mixing_norms, prefix = build(name)
    except Exception:  # smp refuses some pairs (mit with several decoders)
        return {"status": "not built by smp"}
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            model(x)  # warm-up, untimed
        if library == "ours":
            reference, seconds, share = ours(model, x, gen, mixing_norms, prefix)
        else:
            (reference, seconds, share) = torch_pruning(model, x, gen)
        with torch.no_grad():
            expected, got = reference(x), model(x)
    except Exception as error:  # reported, not hidden: the table says what broke
        return {"status": f"error: {type(error).__name__}: {str(error)[:80]}"}
    after = sum(p.numel() for p in model.parameters())
    if got.shape != expected.shape:
        return {"status": "wrong (output shape)", "seconds": seconds}
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    return {"status": "right" if error <= 1e-6 else "wrong (output)", "error": error,
            "seconds": seconds, "params": [params, after], "share": share}


def run_trial(library, name, timeout):
    command = [sys.executable, __file__, "--trial", library, name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout} s)"}
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if done.returncode == 0 and lines else \
        {"status": f"crashed: {done.stderr.strip().splitlines()[-1][:80] if done.stderr.strip() else done.returncode}"}


def unet_timings():
    import segmentation_models_pytorch as smp

    from polyprune_ext import analyze
    from polyprune_ext.structure import prune_

    rows = ["| model (352x352, float32) | analysis + 50% prune s | encoder conv output channels prunable |",
            "|---|---|---|"]
    for encoder in ("resnet34", "resnet50", "efficientnet-b0"):
        model = smp.Unet(encoder, encoder_weights=None).eval()
        start = time.perf_counter()
        analysis = analyze(model, torch.randn(1, 3, 352, 352))
        prune_(model, analysis, {i: list(range(g.size // 2 or 1)) for i, g in enumerate(analysis.groups)
                                 if g.prunable and g.unit == 1})
        seconds = time.perf_counter() - start
        rows.append(f"| Unet-{encoder} | {seconds:.2f} | {conv_share(model, analysis, 'encoder.'):.0%} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=int, default=60, help="seconds per trial")
    add_options(parser)
    parser.add_argument("--libraries", nargs="+", choices=("ours", "tp"), default=["ours", "tp"],
                        help="Torch-Pruning ('tp') takes most of the time: about an hour more")
    parser.add_argument("--trial", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args)
    if args.trial:
        print(json.dumps(trial(*args.trial)))
        return

    report = heading("cpu") + [
        f"### Structural pruning, 50% of every group at random, float64 ({SIZE}x{SIZE} for the smp matrix)",
        "", "| model | ours | ours s | conv channels prunable (ours; the encoder's for the smp matrix) "
            "| Torch-Pruning 1.6.1 | Torch-Pruning s |", "|---|---|---|---|---|---|"]
    print("\n".join(report), flush=True)
    right = {"ours": 0, "tp": 0}
    built, shares, slowest = 0, {}, (0.0, None)
    for name in MODELS:
        results = {lib: run_trial(lib, name, args.timeout) if lib in args.libraries
                   else {"status": "not run"} for lib in ("ours", "tp")}
        if results["ours"]["status"] == "not built by smp":
            continue
        built += 1
        if results["ours"].get("share") is not None:
            shares.setdefault(name if name in ZOO else name.split("-", 1)[1], []).append(results["ours"]["share"])
            slowest = max(slowest, (results["ours"]["seconds"], name))
        cells = []
        for lib, r in results.items():
            right[lib] += r["status"] == "right"
            detail = f" ({r['error']:.0e})" if "error" in r and r["status"] != "right" else ""
            cells += [r["status"] + detail, f"{r['seconds']:.2f}" if "seconds" in r else "-"]
            if lib == "ours":
                cells.append(f"{r['share']:.0%}" if r.get("share") is not None else "-")
        report.append(f"| {name} | " + " | ".join(cells) + " |")
        print(report[-1], flush=True)
    counts = ", ".join(f"{label} {right[lib]}/{built}" for lib, label in
                       (("ours", "ours"), ("tp", "Torch-Pruning")) if lib in args.libraries)
    tail = ["", f"Pruned right: {counts} (of {len(MODELS)} models, {built} built).",
            f"Slowest analysis + prune of ours: {slowest[0]:.2f} s ({slowest[1]}).",
            "Encoder conv output channels prunable (ours), lowest over the smp architectures: "
            + ", ".join(f"{e} {min(v):.0%}" for e, v in shares.items() if e not in ZOO) + ".",
            "Conv output channels prunable (ours), MONAI and timm models: "
            + ", ".join(f"{e} {v[0]:.0%}" for e, v in shares.items() if e in ZOO) + ".",
            ""] + unet_timings()
    report += tail
    print("\n".join(tail))
    append_if_asked(report, args)


if __name__ == "__main__":
    main()
