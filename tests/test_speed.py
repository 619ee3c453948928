"""Speed measurement: what it returns and that it leaves the caller's model alone.

Timings themselves are not asserted (the machine is shared); tiny inputs keep the tests fast.
"""

import pytest
import torch

from polyprune_ext.speed import (REAL_TIME_FPS, compare, format_table, input_shape, is_real_time,
                                 latency, speed_table)

FAST = dict(size=32, warmup=1, repeats=3)


def tiny_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 1, 1),
    )


def test_latency_keys_and_types():
    row = latency(tiny_model(), batch=2, **FAST)
    assert set(row) == {"batch", "size", "dtype", "layout", "threads", "ms", "ms_p10", "ms_p90",
                        "repeats", "fps"}
    assert row["batch"] == 2 and row["size"] == 32 and row["threads"] == torch.get_num_threads()
    assert row["dtype"] == "float32" and row["layout"] == "contiguous"
    assert isinstance(row["ms"], float) and isinstance(row["ms_p90"], float)
    assert 0 < row["ms_p10"] <= row["ms"] <= row["ms_p90"]
    assert row["repeats"] >= 6 and row["repeats"] % 3 == 0  # chunks of 3 until stable, 2 at least
    assert row["fps"] == pytest.approx(2 * 1000 / row["ms"])


def test_channels_last_and_bfloat16_leave_the_model_alone():
    model = tiny_model().train()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]

    row = latency(model, dtype=torch.bfloat16, channels_last=True, **FAST)
    assert row["layout"] == "channels_last" and row["dtype"] == "bfloat16"
    assert row["fps"] == pytest.approx(1000 / row["ms"])

    assert model.training  # not switched to eval
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    weight = model[0].weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    assert model[1].running_mean.abs().sum() == 0  # no BatchNorm statistics updated


def test_bad_arguments():
    with pytest.raises(ValueError, match="float16.*CPU"):
        latency(tiny_model(), dtype=torch.float16, **FAST)
    with pytest.raises(ValueError, match="dtype"):
        latency(tiny_model(), dtype=torch.float64, **FAST)


def test_speed_table_cpu():
    rows = speed_table(tiny_model(), batches=(1, 2), **FAST)
    assert [(r["dtype"], r["layout"], r["batch"]) for r in rows] == [
        ("float32", "contiguous", 1), ("float32", "contiguous", 2),
        ("float32", "channels_last", 1), ("float32", "channels_last", 2),
    ]
    assert all(r["size"] == 32 for r in rows)


def test_repeats_until_stable_within_bounds_and_threads_pinned():
    before = torch.get_num_threads()
    row = latency(tiny_model(), threads=1, tolerance=0.0, max_repeats=9, **FAST)
    assert row["repeats"] == 9 and row["threads"] == 1  # never stable at tolerance 0: the bound
    assert torch.get_num_threads() == before  # restored


def test_compare_times_every_model_round_robin():
    models = {"wide": tiny_model(), "narrow": torch.nn.Conv2d(3, 1, 1)}
    rows = compare(models, tolerance=0.0, max_repeats=6, **FAST)
    assert list(rows) == ["wide", "narrow"]
    assert [r["repeats"] for r in rows.values()] == [6, 6]  # the same number of runs, interleaved


def test_input_follows_the_first_conv():
    assert input_shape(tiny_model(), 2, 32) == (2, 3, 32, 32)
    volume = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Conv3d(4, 2, 1))
    assert input_shape(volume, 1, 16) == (1, 1, 16, 16, 16)
    row = latency(volume, size=16, channels_last=True, warmup=1, repeats=2)
    assert row["layout"] == "channels_last"


def row(batch=1, size=352, fps=REAL_TIME_FPS):
    return {"batch": batch, "size": size, "dtype": "float32", "layout": "contiguous", "threads": 2,
            "ms": batch * 1000 / fps, "ms_p10": batch * 1000 / fps, "ms_p90": batch * 1000 / fps,
            "repeats": 20, "fps": fps}


def test_is_real_time():
    assert is_real_time([row(fps=30)])
    assert not is_real_time([row(fps=29.9)])
    # Throughput at batch 8 does not count.
    assert not is_real_time([row(batch=8, fps=500), row(fps=10)])
    assert not is_real_time([row(size=256, fps=100)])  # wrong size
    assert is_real_time([row(size=256, fps=100)], size=256)
    assert is_real_time([row(fps=10), row(fps=45)])
    assert not is_real_time([])


def test_format_table():
    rows = [row(fps=30), row(batch=8, fps=123.456)]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0] == "| batch | size | dtype | layout | threads | ms | ms p10 | ms p90 | runs | FPS |"
    assert len(lines) == 2 + len(rows)
    assert lines[3].startswith("| 8 | 352 | float32 | contiguous | 2 |") and "123.5" in lines[3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda():
    model = tiny_model()
    rows = speed_table(model, batches=(1, 2), device="cuda", **FAST)
    assert [(r["dtype"], r["layout"]) for r in rows[::2]] == [
        ("float32", "contiguous"), ("float16", "channels_last"), ("bfloat16", "channels_last"),
    ]
    assert all(r["ms"] > 0 and r["fps"] == pytest.approx(r["batch"] * 1000 / r["ms"]) for r in rows)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays where it was
