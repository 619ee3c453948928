"""polyprune infer: masks at each frame's size that match a hand-made answer, overlays, a
synthetic video in and an overlay video out at its frame rate, and bad input refused in one line
naming the file, with a partly processed video keeping what was written."""

import fractions
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")
pytest.importorskip("segmentation_models_pytorch")

import polyprune_ext  # noqa: E402
from polyprune_ext import cli  # noqa: E402
from polyprune_ext.models import smp_model  # noqa: E402
from polyprune_ext.structure.plan import PruningPlan  # noqa: E402
from polyprune_ext.tasks.infer import ALPHA, FILL, Predictor, infer_images, infer_video, overlay  # noqa: E402

RATE = fractions.Fraction(30000, 1001)


class RedIsForeground(torch.nn.Module):
    """Logits from the normalised red channel: foreground where red > 0.485 * 255, whatever the
    size, so the right mask of any frame is known by hand."""

    def forward(self, x):
        return 20 * x[:, :1]


def disc_frame(height, width, cx, cy, radius):
    """A dark frame with a red disc; returns it and the disc's mask."""
    y, x = np.mgrid[:height, :width]
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2
    frame = np.full((height, width, 3), 40, np.uint8)
    frame[disc] = (230, 60, 50)
    return frame, disc


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def write_video(path, frames, codec="ffv1", pix_fmt="yuv444p", options=None, gop=None):
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def read_video(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.average_rate, [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small smp checkpoint, as train writes it."""
    folder = tmp_path_factory.mktemp("checkpoint")
    model = smp_model("Unet", "resnet18", encoder_depth=3, decoder_channels=(32, 16, 8))
    polyprune_ext.save(folder / "model.safetensors", model, PruningPlan.for_model(model, (1, 3, 64, 64)))
    return folder


def test_masks_come_back_at_each_frame_size_and_match_the_drawn_disc(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    truth = {}
    for name, (h, w, cx, cy, r) in {"wide": (90, 160, 110, 40, 30), "tall": (150, 70, 30, 100, 25),
                                    "tiny": (40, 50, 20, 15, 10)}.items():
        frame, truth[name] = disc_frame(h, w, cx, cy, r)
        Image.fromarray(frame).save(folder / f"{name}.png")
    predictor = Predictor(RedIsForeground(), size=64)
    summary = infer_images(predictor, folder, tmp_path / "out", batch_size=2, progress=False)
    assert summary["complete"] and summary["frames"] == 3 and summary["sustained_fps"] > 0
    for name, disc in truth.items():
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name}.png"))
        assert mask.shape == disc.shape and set(np.unique(mask)) <= {0, 255}
        assert iou(mask == 255, disc) > 0.9, name
        assert Image.open(tmp_path / "out" / "overlays" / f"{name}.jpg").size == disc.shape[::-1]
    lines = (tmp_path / "out" / "frames.csv").read_text().splitlines()
    assert lines[0] == "frame,ms" and [line.split(",")[0] for line in lines[1:]] == ["tall", "tiny", "wide"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_overlay_fills_and_outlines_the_mask():
    frame = np.zeros((400, 400, 3), np.uint8)
    mask = np.zeros((400, 400), bool)
    mask[100:200, 150:250] = True
    out = overlay(frame, mask)
    outline = (out == FILL).all(-1)
    assert outline.sum() == 100 ** 2 - 96 ** 2 and not outline[~mask].any()  # 2 pixels thick
    assert (out[120:180, 170:230] == np.round(ALPHA * np.array(FILL))).all()  # filled inside
    assert (out[~mask] == 0).all()


def test_video_in_overlay_video_out_at_its_frame_rate(tmp_path):
    frames, discs = zip(*(disc_frame(71, 97, 20 + 5 * i, 35, 15) for i in range(12)))  # odd sizes
    write_video(tmp_path / "clip.mkv", list(frames))
    summary = infer_video(Predictor(RedIsForeground(), size=64), tmp_path / "clip.mkv", tmp_path / "out",
                          progress=False)
    assert summary["complete"] and summary["frames"] == 12
    assert summary["video_fps"] == pytest.approx(float(RATE))
    for i, disc in enumerate(discs):
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / f"frame_{i:06d}.png")) == 255
        assert mask.shape == (71, 97) and iou(mask, disc) > 0.9
    rate, written = read_video(tmp_path / "out" / "overlay.mp4")
    assert rate == RATE and len(written) == 12 and written[0].shape == (70, 96, 3)  # cut to even
    inside = discs[5][:70, :96] & ~np.roll(discs[5], 3, 0)[:70, :96]
    assert written[5][inside][:, 1].mean() > written[5][~discs[5][:70, :96]][:, 1].mean() + 40  # green


def test_infer_command_on_images_and_video(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(disc_frame(60 + 10 * i, 80, 40, 30, 12)[0]).save(folder / f"{i}.jpg")
    cli.main(["infer", "--checkpoint", str(checkpoint), "--images", str(folder), "--out",
              str(tmp_path / "images-out"), "--batch-size", "2", "--no-progress", "--device", "cpu"])
    assert "3 frames:" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "images-out" / "masks").iterdir()) == ["0.png", "1.png", "2.png"]
    write_video(tmp_path / "clip.mp4", [disc_frame(48, 64, 30, 20, 8)[0]] * 5, "libx264", "yuv420p")
    cli.main(["infer", "--checkpoint", str(checkpoint), "--video", str(tmp_path / "clip.mp4"), "--out",
              str(tmp_path / "video-out"), "--threshold", "0.7", "--dtype", "bfloat16", "--no-progress",
              "--device", "cpu"])
    summary = json.loads((tmp_path / "video-out" / "summary.json").read_text())
    assert (summary["frames"], summary["threshold"], summary["dtype"], summary["size"]) == (5, 0.7, "bfloat16", 64)
    assert len(read_video(tmp_path / "video-out" / "overlay.mp4")[1]) == 5


def bad_inputs(tmp_path):
    """{case: (option, path, what the one-line error must say)}"""
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.fromarray(disc_frame(32, 32, 10, 10, 5)[0]).save(tmp_path / "mixed" / "a.png")
    (tmp_path / "mixed" / "notes.txt").write_text("not an image")
    (tmp_path / "corrupt").mkdir()
    Image.fromarray(disc_frame(32, 32, 10, 10, 5)[0]).save(tmp_path / "corrupt" / "a.png")
    (tmp_path / "corrupt" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "text.mp4").write_text("not a video")
    write_video(tmp_path / "ffv1.mkv", [disc_frame(32, 32, 10, 10, 5)[0]] * 2)
    data = (tmp_path / "ffv1.mkv").read_bytes()
    assert data.count(b"V_FFV1") == 1
    (tmp_path / "unknown.mkv").write_bytes(data.replace(b"V_FFV1", b"V_QQQQ"))  # a codec id nobody knows
    return {"missing folder": ("--images", tmp_path / "nowhere", f"{tmp_path / 'nowhere'} does not exist"),
            "empty folder": ("--images", tmp_path / "empty", f"{tmp_path / 'empty'} holds no images"),
            "non-image file": ("--images", tmp_path / "mixed", f"{tmp_path / 'mixed' / 'notes.txt'} is not an image"),
            "corrupt image": ("--images", tmp_path / "corrupt", f"cannot decode image file {tmp_path / 'corrupt' / 'b.png'}"),
            "missing video": ("--video", tmp_path / "none.mp4", f"cannot read video {tmp_path / 'none.mp4'}"),
            "unreadable video": ("--video", tmp_path / "text.mp4", f"cannot read video {tmp_path / 'text.mp4'}"),
            "unknown codec": ("--video", tmp_path / "unknown.mkv", f"{tmp_path / 'unknown.mkv'}: its video codec")}


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "non-image file", "corrupt image",
                                  "missing video", "unreadable video", "unknown codec"])
def test_bad_input_is_one_line_naming_the_file(checkpoint, tmp_path, case, capsys):
    option, path, message = bad_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as error:
        cli.main(["infer", "--checkpoint", str(checkpoint), option, str(path), "--out", str(tmp_path / "out"),
                  "--no-progress", "--device", "cpu"])
    text = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.value.code == 2
    assert text.startswith("polyprune infer: error: ") and message in text
    if case == "corrupt image":  # a.png was done before b.png failed
        assert (tmp_path / "out" / "masks" / "a.png").exists()
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert not summary["complete"] and summary["frames"] == 1 and "b.png" in summary["error"]


class FailsAtFrame(RedIsForeground):
    """RedIsForeground until frame ``n``, where the forward pass raises (a crash half-way)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, 0

    def forward(self, x):
        self.seen += len(x)
        if self.seen > self.n:
            raise RuntimeError(f"failed at frame {self.n}")
        return super().forward(x)


def test_a_video_broken_half_way_keeps_what_was_written(tmp_path):
    noise = np.random.default_rng(0)
    frames = [noise.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(100)]
    write_video(tmp_path / "full.mp4", frames, "libx264", "yuv420p",
                {"movflags": "frag_keyframe+empty_moov"}, gop=10)
    with pytest.raises(RuntimeError, match="failed at frame 37"):
        infer_video(Predictor(FailsAtFrame(37), size=32), tmp_path / "full.mp4", tmp_path / "out",
                    progress=False)
    assert len(list((tmp_path / "out" / "masks").iterdir())) == 37
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not summary["complete"] and summary["frames"] == 37 and "failed at frame 37" in summary["error"]
    assert len(read_video(tmp_path / "out" / "overlay.mp4")[1]) == 37  # closed properly
    # A file cut short: ffmpeg either ends it there or raises naming the frame; either way what
    # came before the cut is written and the overlay video is closed.
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    try:
        done = infer_video(Predictor(RedIsForeground(), size=32), tmp_path / "cut.mp4", tmp_path / "cut",
                           progress=False)["frames"]
    except ValueError as error:
        assert re.search(r"cut.mp4: cannot decode frame \d+", str(error))
        done = json.loads((tmp_path / "cut" / "summary.json").read_text())["frames"]
    assert 0 < done < 100
    assert len(list((tmp_path / "cut" / "masks").iterdir())) == done
    assert len(read_video(tmp_path / "cut" / "overlay.mp4")[1]) == done
