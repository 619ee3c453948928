"""ONNX export of any model, checked on the spot in onnxruntime, and its latency there.

A pruned model is worth something where it runs, and many deployments run ONNX (onnxruntime,
TensorRT, OpenVINO). ``export_onnx`` writes a model with dynamic batch, height and width at a
stated opset (torch.onnx's torch.export-based exporter), then runs the file in onnxruntime on
random inputs of two shapes and compares with PyTorch in float32. An exporter that mistranslates
an op writes a file that loads, runs and is wrong, so the check is part of the export: above the
bound it fails and leaves no file.

``onnx_latency`` times exported models in onnxruntime by the conventions of
polyprune_ext.speed.latency (random input, warm-up runs, then the median and the 90th percentile
of timed runs, the thread count stated), several models round-robin in one process, so the slow
spells of a shared machine fall on all of them alike.

Needs the ``deploy`` extra (onnx, onnxscript, onnxruntime), imported when called. For the CUDA
execution provider install onnxruntime-gpu in place of onnxruntime.
"""

import copy
import dataclasses
import importlib.util
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from . import _io, choices
from .choices import Dtype, Provider
from .speed import input_shape, percentile

OPSET = 18  # read by onnxruntime >= 1.14, TensorRT >= 8.6, OpenVINO >= 2023.0
# max |onnxruntime - PyTorch float32| / max |PyTorch float32| an export may reach. Measured:
# 1e-6 in float32 (Unet-resnet18, pruned), 1e-3 in float16 (onnxruntime's CPU provider).
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}
PathLike = Union[str, Path]


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """What export_onnx wrote, and how closely onnxruntime reproduced PyTorch on it."""

    path: Path
    opset: int
    dtype: str
    provider: str  # the onnxruntime execution provider the check ran on
    shapes: tuple[tuple[int, ...], ...]  # the input shapes checked
    max_rel_error: float  # max |onnxruntime - PyTorch float32| / max |PyTorch float32| over them


def export_onnx(model: torch.nn.Module, path: PathLike, *, batch: int = 1, size: int = 352,
                dtype: Dtype = "float32", opset: int = OPSET, provider: Provider = "cpu",
                tolerance: Optional[float] = None,
                check_shapes: Optional[Sequence[Sequence[int]]] = None) -> OnnxExport:
    """Write ``model`` (which returns one tensor) to ``path`` as ONNX, checked in onnxruntime.

    A copy of the model (eval mode, CPU; the caller's is left alone) is traced on a
    (batch, C, size, size) input, C read from its first Conv2d. The graph's input ``image`` and
    output ``logits`` have dynamic ``batch``, ``height`` and ``width`` axes; height and width
    must suit the model as in PyTorch (multiples of 32 for smp models). ``dtype="float16"``
    exports a half-precision graph (inputs and outputs float16), for GPUs; it is still checked
    against PyTorch in float32, the answer it approximates.

    The check runs onnxruntime's ``provider`` on random normal inputs of the traced shape and of
    ``check_shapes`` (default: one more sample, 32 and 64 pixels larger, so a graph whose axes
    were frozen fails). Above ``tolerance`` (default TOLERANCE[dtype]) it raises RuntimeError,
    and ``path`` is left as it was: the file is written under a temporary name and renamed once
    checked. One file, no external weights: models up to protobuf's 2 GiB.
    """
    choices.check("dtype", dtype, Dtype)
    choices.check("provider", provider, Provider)
    _require("onnx", "onnxscript", "onnxruntime")
    if dtype not in TOLERANCE:
        raise ValueError(f"ONNX export takes dtype float32 or float16, got {dtype!r}: onnxruntime "
                         "has few bfloat16 kernels")
    reference = copy.deepcopy(model).cpu().float().eval()
    shape = input_shape(reference, batch, size)
    with torch.no_grad():
        if not isinstance(reference(torch.zeros(shape)), torch.Tensor):
            raise TypeError("export_onnx exports models that return one tensor")
    shapes = [tuple(s) for s in (shape, *(check_shapes or [(batch + 1, shape[1], size + 32, size + 64)]))]
    bound = TOLERANCE[dtype] if tolerance is None else tolerance

    def write_and_check(tmp: Path) -> float:
        graph_dtype = getattr(torch, dtype)
        _export(copy.deepcopy(reference).to(graph_dtype), torch.randn(shape, dtype=graph_dtype), tmp, opset)
        session = onnx_session(tmp, provider)
        generator = torch.Generator().manual_seed(0)
        return max(_check(session, reference, s, graph_dtype, bound, generator) for s in shapes)

    error = _io.replace_atomically(path, write_and_check)
    return OnnxExport(Path(path), opset, dtype, PROVIDERS[provider], tuple(shapes), error)


def _require(*modules: str) -> None:
    """ImportError naming the extra to install when one of ``modules`` is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed: pip install 'polyprune_ext[deploy]'")


def _export(model: torch.nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    axes = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    program = torch.onnx.export(model, (x,), dynamo=True, input_names=["image"],
                                output_names=["logits"], dynamic_shapes=(axes,),
                                opset_version=opset, verbose=False)
    assert program is not None  # the torch.export-based exporter returns the program
    program.save(str(path), external_data=False)


def _check(session: Any, reference: torch.nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
           bound: float, generator: torch.Generator) -> float:
    """onnxruntime's largest difference from ``reference`` (PyTorch, float32) on one random
    input, over the largest output magnitude; RuntimeError above ``bound``."""
    x = torch.randn(shape, generator=generator)
    with torch.no_grad():
        expected = reference(x)
    (got,) = session.run(None, {"image": x.to(dtype).numpy()})
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    error = float((torch.from_numpy(got).float() - expected).abs().max() / scale)
    if not error <= bound:  # NaN fails too
        raise RuntimeError(f"onnxruntime ({session.get_providers()[0]}) differs from PyTorch by "
                           f"{error:.1e} of the output's largest magnitude on a {list(shape)} input,"
                           f" above the bound {bound:.0e}: the export is wrong; nothing was written")
    return error


def onnx_session(path: PathLike, provider: Provider = "cpu", threads: Optional[int] = None) -> Any:
    """An onnxruntime InferenceSession of ``path`` on ``provider`` with ``threads`` intra-op
    threads (default: torch's thread count, so both runtimes get the same cores). Raises when
    the provider is missing, or when onnxruntime falls back to the CPU instead, as it does
    silently when the CUDA provider cannot load."""
    _require("onnxruntime")
    import onnxruntime as ort

    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        hint = (": install onnxruntime-gpu in place of onnxruntime, on a machine with a CUDA GPU"
                if provider == "cuda" else "")
        raise RuntimeError(f"this onnxruntime ({ort.__version__}) has no {name}, only "
                           f"{ort.get_available_providers()}{hint}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=[name])
    if session.get_providers()[0] != name:
        raise RuntimeError(f"onnxruntime could not start its {name} and fell back to "
                           f"{session.get_providers()}; its log above says why")
    return session


def onnx_latency(models: Mapping[str, PathLike], *, batch: int = 1, size: int = 352,
                 provider: Provider = "cpu", threads: Optional[int] = None, warmup: int = 5,
                 repeats: int = 20) -> list[dict]:
    """Times each exported model in ``models`` ({name: path}) in onnxruntime on a random
    (batch, C, size, size) input of its input dtype: ``warmup`` untimed runs each, then
    ``repeats`` rounds that run every model once in turn. On CUDA, input and output stay on the
    GPU (I/O binding), as PyTorch's timings keep them.

    Returns one row per model, with latency()'s keys ("batch", "size", "dtype", "layout", "ms",
    "ms_p10", "ms_p90", "fps") and "model", "runtime" ("onnxruntime"), "provider" and "threads"."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, repeats >= 1, warmup >= 0; got {batch}, {repeats}, {warmup}")
    threads = threads or torch.get_num_threads()
    sessions = {name: onnx_session(path, provider, threads) for name, path in models.items()}
    runs = {name: _runner(session, batch, size, provider) for name, session in sessions.items()}
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    rows = []
    for name, session in sessions.items():
        ms = statistics.median(times[name])
        rows.append({"model": name, "runtime": "onnxruntime", "provider": provider,
                     "threads": threads, "batch": batch, "size": size,
                     "dtype": _ONNX_DTYPES[session.get_inputs()[0].type], "layout": "contiguous",
                     "ms": ms, "ms_p10": percentile(times[name], 0.1),
                     "ms_p90": percentile(times[name], 0.9), "fps": batch * 1000 / ms})
    return rows


def _runner(session: Any, batch: int, size: int, provider: Provider) -> Callable[[], Any]:
    """One call that runs ``session`` once on a fixed random input."""
    import onnxruntime as ort

    spec = session.get_inputs()[0]
    x = torch.randn(batch, spec.shape[1], size, size).to(getattr(torch, _ONNX_DTYPES[spec.type])).numpy()
    if provider == "cpu":
        return lambda: session.run(None, {spec.name: x})
    binding = session.io_binding()
    binding.bind_ortvalue_input(spec.name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")
    return lambda: session.run_with_iobinding(binding)


def format_latency(rows: Sequence[dict]) -> str:
    """Latency rows (latency() or onnx_latency() ones, with a "model" key) as a markdown table;
    the speed-up is against the first row of the same runtime, batch and dtype."""
    lines = ["| model | runtime | threads | batch | size | dtype | ms | ms p90 | FPS | speed-up |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    first: dict[tuple, float] = {}
    for r in rows:
        runtime = f"{r.get('runtime', 'torch')} {r.get('provider', '')}".strip()
        base = first.setdefault((runtime, r["batch"], r["dtype"]), r["ms"])
        lines.append(f"| {r['model']} | {runtime} | {r.get('threads', '-')} | {r['batch']} | "
                     f"{r['size']} | {r['dtype']} | {r['ms']:.2f} | {r['ms_p90']:.2f} | "
                     f"{r['fps']:.1f} | {base / r['ms']:.2f}x |")
    return "\n".join(lines)
