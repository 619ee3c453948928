"""A segmentation model run on a user's images or colonoscopy video: a binary mask per frame as a
PNG, overlays (the mask filled and outlined on the frame), per-frame latency and sustained FPS.

Frames are prepared as the training folders prepare images (a bilinear PIL resize to the model's
input size, then images.normalize), so the model sees what it was trained on. The model's first
output channel holds the foreground logits (the polyp mask; the nuclei model's semantic branch);
they are resized back to the frame bilinearly, then thresholded.

Video goes through PyAV: ffmpeg's own libraries, shipped in its wheel and called in process, so
decoding errors arrive as exceptions naming what failed, the frame rate is exact (a fraction:
30000/1001), and the encoder is flushed and the file closed properly when a run stops half-way.
The overlay video is H.264 in a fragmented MP4 with a keyframe every second: readable up to the
last whole second even when the process is killed. imageio-ffmpeg, the other maintained choice,
pipes raw frames through an ffmpeg subprocess and reports its errors as that process's output.

Everything is written as it is made: masks, overlays and frames.csv (one line per frame with its
latency); summary.json at the end, and also when a run fails or is interrupted, saying so.
"""

import copy
import csv
import fractions
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import _io, choices
from .._progress import progress as progress_bar
from ..choices import Dtype
from ..speed import percentile
from .images import IMAGE_EXTENSIONS, decode, normalize

Frame = tuple[str, np.ndarray]  # (name, uint8 (H, W, 3) RGB)
FILL, ALPHA = (0, 255, 0), 0.35  # the overlay: green over pink mucosa


class Predictor:
    """A copy of ``model`` as it runs here: eval mode on ``device``, mixed precision ``dtype``
    (torch.autocast; float16 on GPUs only), channels_last (default: on CUDA). Called with frames
    of any sizes, it returns one boolean mask per frame, at the frame's size."""

    def __init__(self, model: torch.nn.Module, *, size: int, device: Union[str, torch.device] = "cpu",
                 dtype: Dtype = "float32", channels_last: Optional[bool] = None, threshold: float = 0.5):
        choices.check("dtype", dtype, Dtype)
        self.device = torch.device(device)
        if self.device.type == "cpu" and dtype == "float16":
            raise ValueError("float16 is not supported on the CPU: use float32 or bfloat16")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.size, self.dtype, self.threshold = size, getattr(torch, dtype), threshold
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.model = copy.deepcopy(model).to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        side = (self.size, self.size)
        x = torch.stack([normalize(np.array(Image.fromarray(f).resize(side, Image.BILINEAR)))
                         for f in frames]).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(x)[:, :1].float()
        probabilities = (torch.sigmoid(F.interpolate(map_[None], size=frame.shape[:2], mode="bilinear",
                                                     align_corners=False))[0, 0]
                         for map_, frame in zip(logits, frames))
        return [(p > self.threshold).cpu().numpy() for p in probabilities]


def overlay(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``frame`` with ``mask`` filled in translucent green and outlined in solid green (a line
    about 1/200 of the frame's shorter side thick)."""
    out = frame.astype(np.float32)
    out[mask] = (1 - ALPHA) * out[mask] + ALPHA * np.array(FILL, dtype=np.float32)
    inner = mask.copy()
    for _ in range(max(1, round(min(mask.shape) / 200))):  # erode by one pixel, 4-neighbourhood
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    out[mask & ~inner] = FILL
    return out.round().astype(np.uint8)


def image_files(folder: Path) -> list[Path]:
    """The images in ``folder`` (not its subfolders; hidden files ignored), sorted; a folder that
    is missing, empty, or holds other files is refused, naming one."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    kinds = ", ".join(IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder} holds no images ({kinds})")
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        raise ValueError(f"{others[0]} is not an image ({kinds}); {len(others)} such file(s) in "
                         f"{folder}: move them out")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise ValueError(f"{stems[path.stem]} and {path} would write the same mask: rename one")
        stems[path.stem] = path
    return files


def infer_images(predictor: Predictor, folder: Union[str, Path], out: Union[str, Path], *,
                 batch_size: int = 1, progress: bool = True) -> dict:
    """Masks (masks/<stem>.png, 0 or 255) and overlays (overlays/<stem>.jpg) of every image in
    ``folder``, written to ``out`` with frames.csv and summary.json; returns the summary."""
    files = image_files(Path(folder))
    out = Path(out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    frames = ((p.stem, np.asarray(decode(p, "RGB"))) for p in files)
    save = lambda name, image: Image.fromarray(image).save(out / "overlays" / f"{name}.jpg", quality=90)
    return _run(predictor, frames, len(files), out, save, batch_size, progress, {"source": str(folder)})


def infer_video(predictor: Predictor, path: Union[str, Path], out: Union[str, Path], *,
                batch_size: int = 1, progress: bool = True) -> dict:
    """Masks (masks/frame_000000.png, ...) of every frame of the video at ``path`` and the
    overlay video (overlay.mp4, at the source's frame rate), written to ``out`` with frames.csv
    and summary.json; returns the summary. A video that cannot be read is refused, naming it;
    one that fails half-way keeps every mask and overlay frame written before the error."""
    try:
        import av
    except ImportError:
        raise ImportError("video needs PyAV: pip install 'polyprune_ext[deploy]'") from None

    path, out = Path(path), Path(out)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise ValueError(f"cannot read video {path}: {error.strerror or error}") from None
    writer = None
    try:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate or fractions.Fraction(30)
        out.mkdir(parents=True, exist_ok=True)
        writer = _VideoWriter(out / "overlay.mp4", rate)
        summary = {"source": str(path), "video_fps": float(rate), "overlay_video": str(out / "overlay.mp4")}
        return _run(predictor, _decoded(container, stream, path), stream.frames or None, out,
                    writer.write, batch_size, progress, summary)
    finally:
        if writer is not None:
            writer.close()
        container.close()


def _video_stream(container: Any, path: Path) -> Any:
    if not container.streams.video:
        raise ValueError(f"{path} holds no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise ValueError(f"{path}: its video codec is not one ffmpeg (PyAV) can decode")
    stream.thread_type = "AUTO"
    return stream


def _decoded(container: Any, stream: Any, path: Path) -> Iterator[Frame]:
    import av

    index = 0
    try:
        for frame in container.decode(stream):
            yield f"frame_{index:06d}", frame.to_ndarray(format="rgb24")
            index += 1
    except av.error.FFmpegError as error:
        raise ValueError(f"{path}: cannot decode frame {index}: {error.strerror or error}") from None
    if index == 0:
        raise ValueError(f"{path} holds no video frames")


class _VideoWriter:
    """H.264 frames into a fragmented MP4 at ``rate``, a keyframe (a new fragment) every second;
    frames are cut to even sizes, as yuv420p needs."""

    def __init__(self, path: Path, rate: fractions.Fraction):
        import av

        self.container = av.open(str(path), "w", options={"movflags": "frag_keyframe+empty_moov"})
        self.stream = self.container.add_stream("libx264", rate=rate, options={"preset": "veryfast"})
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.gop_size = max(1, round(rate))
        self.count = 0

    def write(self, name: str, image: np.ndarray) -> None:
        import av

        height, width = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
        if self.count == 0:
            self.stream.width, self.stream.height = width, height
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:height, :width]), format="rgb24")
        frame.pts = self.count
        self.container.mux(self.stream.encode(frame))
        self.count += 1

    def close(self) -> None:
        if self.count:
            self.container.mux(self.stream.encode())
        self.container.close()


def _run(predictor: Predictor, frames: Iterable[Frame], total: Optional[int], out: Path,
         write_overlay: Callable[[str, np.ndarray], None], batch_size: int, progress: bool,
         summary: dict) -> dict:
    """Masks and overlays of ``frames``, ``batch_size`` at a time, with frames.csv and
    summary.json (written whatever happens; "complete" says whether every frame was done)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    (out / "masks").mkdir(parents=True, exist_ok=True)
    summary.update(size=predictor.size, batch_size=batch_size, device=str(predictor.device),
                   dtype=str(predictor.dtype).removeprefix("torch."),
                   channels_last=predictor.channels_last, threshold=predictor.threshold,
                   complete=False)
    times: list[float] = []
    start = time.perf_counter()
    try:
        with open(out / "frames.csv", "w", newline="") as log:
            rows = csv.writer(log)
            rows.writerow(["frame", "ms"])
            for batch in _batches(progress_bar(frames, total, progress, "infer"), batch_size):
                tick = time.perf_counter()
                masks = predictor([frame for _, frame in batch])
                ms = (time.perf_counter() - tick) * 1000 / len(batch)
                for (name, frame), mask in zip(batch, masks):
                    Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{name}.png")
                    write_overlay(name, overlay(frame, mask))
                    rows.writerow([name, f"{ms:.3f}"])
                    times.append(ms)
                log.flush()
        summary["complete"] = True
    except BaseException as error:
        summary["error"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        wall = time.perf_counter() - start
        summary.update(frames=len(times), wall_s=wall, sustained_fps=len(times) / wall if times else None,
                       ms_per_frame=statistics.median(times) if times else None,
                       ms_per_frame_p90=percentile(times, 0.9) if times else None)
        _io.write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def _batches(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
