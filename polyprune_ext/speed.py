"""Latency and frames per second of a segmentation model: is it fast enough for real-time use?

Pruning is done to reach real-time speed, so speed is measured the way the model will be run:
eval mode, torch.inference_mode(), optionally mixed precision (torch.autocast) and channels_last,
which are the usual deployment settings on a GPU. The caller's model is never touched: each
measurement runs on a deep copy, so its device, memory format and train/eval flag stay as they
were. Torch thread counts are left alone too; set them before calling if needed.
"""

import copy
import math
import statistics
import time
from typing import Sequence, Union

import torch

REAL_TIME_FPS = 30

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _in_channels(model: torch.nn.Module) -> int:
    """Input channels of the model: those of its first Conv2d (smp encoders start with one).

    3 (RGB, as smp models default to) when the model has no Conv2d.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    return 3


def _p90(times: list[float]) -> float:
    """90th percentile by nearest rank: a time actually measured, defined for any count >= 1."""
    ordered = sorted(times)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def latency(
    model: torch.nn.Module,
    *,
    batch: int = 1,
    size: int = 352,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    warmup: int = 5,
    repeats: int = 20,
) -> dict:
    """Times model on a random (batch, C, size, size) input; C is read from the first Conv2d.

    float16 / bfloat16 run under torch.autocast (the model's weights stay float32, as in mixed
    precision deployment). On the CPU only float32 and bfloat16 are allowed: CPU autocast to
    float16 is slow or unsupported for convolutions and would give meaningless numbers.
    `warmup` untimed runs (cuDNN autotuning, allocator, lazy init), then `repeats` timed runs,
    each ended by torch.cuda.synchronize() on CUDA so the time covers the kernels, not just their
    launch. The median is reported because it ignores the occasional stall of a shared machine.

    Returns {"batch", "size", "dtype" (e.g. "float32"), "layout" ("channels_last" or
    "contiguous"), "ms" (median milliseconds per batch), "ms_p90", "fps" (images per second,
    batch * 1000 / ms)}.
    """
    device = torch.device(device)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 is not supported on the CPU: use float32 or bfloat16")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"need batch >= 1, repeats >= 1, warmup >= 0; got {batch}, {repeats}, {warmup}"
        )

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = copy.deepcopy(model).to(device).eval()
    x = torch.randn(batch, _in_channels(net), size, size, device=device)
    if channels_last:
        net = net.to(memory_format=memory_format)
        x = x.contiguous(memory_format=memory_format)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            net(x)
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            sync()
            times.append((time.perf_counter() - start) * 1000)

    ms = statistics.median(times)
    return {
        "batch": batch,
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "layout": "channels_last" if channels_last else "contiguous",
        "ms": ms,
        "ms_p90": _p90(times),
        "fps": batch * 1000 / ms,
    }


def speed_table(
    model: torch.nn.Module, *, size: int = 352, batches: Sequence[int] = (1, 8),
    device: Union[str, torch.device] = "cpu", warmup: int = 5, repeats: int = 20,
) -> list[dict]:
    """latency() rows for the settings worth comparing on `device`.

    Always float32 contiguous (the baseline) for each batch size; on CUDA also float16 and
    bfloat16 with channels_last (how GPUs reach their speed: tensor cores want NHWC); on the CPU
    also float32 channels_last (often faster for convolutions with oneDNN).
    """
    device = torch.device(device)
    settings = [(torch.float32, False)]
    if device.type == "cuda":
        settings += [(torch.float16, True), (torch.bfloat16, True)]
    else:
        settings += [(torch.float32, True)]
    return [
        latency(model, batch=b, size=size, device=device, dtype=dtype, channels_last=cl,
                warmup=warmup, repeats=repeats)
        for dtype, cl in settings
        for b in batches
    ]


def is_real_time(rows: Sequence[dict], size: int = 352) -> bool:
    """True if any row at batch 1 and `size` reaches REAL_TIME_FPS.

    The definition used by the issue: >= 30 FPS at 352x352, batch 1 (one video frame at a time,
    as it arrives), on the device the rows were measured on. Larger batches do not count: they
    raise throughput but add latency a live video cannot wait for.
    """
    return any(r["batch"] == 1 and r["size"] == size and r["fps"] >= REAL_TIME_FPS for r in rows)


def format_table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table, one line per row."""
    lines = [
        "| batch | size | dtype | layout | ms | ms p90 | FPS |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['size']} | {r['dtype']} | {r['layout']} "
            f"| {r['ms']:.2f} | {r['ms_p90']:.2f} | {r['fps']:.1f} |"
        )
    return "\n".join(lines)
