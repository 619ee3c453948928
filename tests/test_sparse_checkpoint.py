"""Sparse checkpoints: magnitude-pruned models stored as non-zero values plus bit masks."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from polyprune_ext.testing import devices
from polyprune_ext.unstructured import load_compressed, magnitude, save_compressed

smp = pytest.importorskip("segmentation_models_pytorch")


@pytest.fixture(scope="module")
def pruned_unet():
    """Unet-resnet18 with 90% of its convolution weights zeroed for good."""
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None).eval()
    magnitude.magnitude_prune_(model, 0.9)
    magnitude.make_permanent_(model)
    return model


def stored_names(path) -> list:
    with safe_open(str(path), "pt") as file:
        return list(file.keys())


def assert_identical(loaded: dict, original: dict) -> None:
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


def test_pruned_unet_round_trips_exactly_and_small(tmp_path, pruned_unet):
    path = tmp_path / "unet.safetensors"
    report = save_compressed(pruned_unet, path)
    state = load_compressed(path)
    assert_identical(state, pruned_unet.state_dict())
    assert state["encoder.bn1.num_batches_tracked"].dtype == torch.int64  # integer buffers as they were
    assert "encoder.bn1.num_batches_tracked" in stored_names(path)

    fresh = smp.Unet("resnet18", encoder_weights=None).eval()
    fresh.load_state_dict(state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned_unet(x))

    save_file(pruned_unet.state_dict(), str(tmp_path / "dense.safetensors"))
    assert report["dense_bytes"] == os.path.getsize(tmp_path / "dense.safetensors")
    assert report["compressed_bytes"] == os.path.getsize(path)
    assert report["ratio"] == report["compressed_bytes"] / report["dense_bytes"] < 0.3
    assert report["sparsity"] > 0.85


def test_dense_model_is_barely_larger(tmp_path):
    """A trained model has few exact zeros: one per tensor must not cost a mask each."""
    model = smp.Unet("resnet18", encoder_weights=None)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.view(-1)[0] = 0
    report = save_compressed(model, tmp_path / "dense.safetensors")
    assert report["ratio"] <= 1.05
    assert_identical(load_compressed(tmp_path / "dense.safetensors"), model.state_dict())


def test_min_sparsity_keeps_less_sparse_tensors_dense(tmp_path):
    half_zero = torch.arange(100, dtype=torch.float32) % 2
    path = tmp_path / "m.safetensors"
    save_compressed({"half_zero": half_zero}, path, min_sparsity=0.6)
    assert stored_names(path) == ["half_zero"]
    report = save_compressed({"half_zero": half_zero}, path, min_sparsity=0.4)
    assert sorted(stored_names(path)) == ["half_zero::mask", "half_zero::values"]
    assert report["sparsity"] == 0.5
    assert_identical(load_compressed(path), {"half_zero": half_zero})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_values_come_back_bit_exact(tmp_path, dtype):
    """Every dtype, NaN and infinities included; a -0.0 is a zero and comes back +0.0."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(7, 5, 3, generator=gen).to(dtype)
    weight[torch.rand(weight.shape, generator=gen) < 0.7] = 0
    weight.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    weight.view(-1)[3] = -0.0
    state = {"weight": weight, "scalar": torch.zeros((), dtype=dtype), "empty": torch.zeros(0, 4)}
    save_compressed(state, tmp_path / "m.safetensors")
    loaded = load_compressed(tmp_path / "m.safetensors")
    expected = dict(state, weight=torch.where(weight == 0, torch.zeros_like(weight), weight))
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for name, tensor in expected.items():
        view = bits[tensor.element_size()]
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name].view(view), tensor.view(view))
    assert torch.signbit(loaded["weight"].view(-1)[3]).item() is False


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_tensors_on_any_device(tmp_path, device):
    base = torch.randn(6, 8, device=device)
    base[base.abs() < 1] = 0
    state = {"transposed": base.t(), "strided": base[:, ::3],
             "counts": torch.tensor([0, 3, 0], device=device)}
    assert not state["transposed"].is_contiguous() and not state["strided"].is_contiguous()
    save_compressed(state, tmp_path / "m.safetensors")
    assert_identical(load_compressed(tmp_path / "m.safetensors"), {k: v.cpu() for k, v in state.items()})
    assert "counts" in stored_names(tmp_path / "m.safetensors")  # integers stay as they are


def test_plain_safetensors_file_is_refused(tmp_path):
    save_file({"weight": torch.zeros(4)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors was not written by save_compressed"):
        load_compressed(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        load_compressed(tmp_path / "junk.safetensors")


def rewrite(path, edit_tensors=lambda tensors: None, edit_record=lambda record: None) -> None:
    """Tamper with a sparse checkpoint: edit its tensors and its metadata record in place."""
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    tensors, record = load_file(str(path)), json.loads(metadata["polyprune-sparse"])
    edit_tensors(tensors)
    edit_record(record)
    save_file(tensors, str(path), metadata={"polyprune-sparse": json.dumps(record)})


@pytest.mark.parametrize("tamper, message", [
    (dict(edit_tensors=lambda t: t.update({"w::values": t["w::values"][:-1]})), "values for"),
    (dict(edit_tensors=lambda t: t.pop("w::mask")), "lacks its values or its mask"),
    (dict(edit_tensors=lambda t: t.update({"w::mask": t["w::mask"] | torch.tensor([0, 1]).byte()})),
     "padding bits set"),
    (dict(edit_record=lambda r: r["shapes"].update(w=[2, 2])), "does not fit its shape"),
    (dict(edit_record=lambda r: r["shapes"].pop("w")), "belong to no sparse tensor"),
    (dict(edit_record=lambda r: r["shapes"].update(w=[3, "4"])), "invalid shape"),
    (dict(edit_record=lambda r: r.update(format="polyprune-sparse/2")), "polyprune-sparse/2"),
    (dict(edit_record=lambda r: r.update(shapes=[[3, 4]])), "lists no shapes"),
])
def test_tampered_file_is_refused(tmp_path, tamper, message):
    path = tmp_path / "m.safetensors"
    weight = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    save_compressed({"w": weight}, path)
    rewrite(path, **tamper)
    with pytest.raises(ValueError, match=message):
        load_compressed(path)


def test_failed_write_leaves_nothing_behind(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        save_compressed({"w": torch.zeros(10)}, tmp_path / "taken")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert not any((tmp_path / "taken").iterdir())


def test_separator_in_a_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        save_compressed({"a::values": torch.zeros(3)}, tmp_path / "m.safetensors")
