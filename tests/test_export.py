"""ONNX export: the file onnxruntime runs computes what the pruned PyTorch model computes (float64
reference) at other batch sizes and image sizes; a wrong export fails and leaves nothing; the
latency rows; the export and bench commands on a pruned checkpoint."""

import copy

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import polyprune_ext  # noqa: E402
from polyprune_ext import PruningPlan, analyze, export_onnx, select_channels  # noqa: E402
from polyprune_ext.export import onnx_latency, onnx_session  # noqa: E402
from polyprune_ext.testing import Toy, randomize_norms  # noqa: E402

CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
PROVIDERS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_EP, reason="no CUDA provider"))]


def pruned(model, size, amount=0.5):
    """``model`` with ``amount`` of its FLOPs removed at random (plan recorded), in eval mode."""
    torch.manual_seed(0)
    randomize_norms(model)
    x = torch.randn(1, 3, size, size)
    plan = PruningPlan.for_model(model, x.shape)
    analysis = analyze(model, x)
    gen = torch.Generator().manual_seed(0)
    scores = {i: torch.rand(g.size, generator=gen) for i, g in enumerate(analysis.groups) if g.prunable}
    plan.prune_(model, analysis, select_channels(analysis, scores, amount=amount, target="flops"))
    return model.eval(), plan


def onnx_output(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_export_matches_pytorch_in_float64_at_any_batch_and_size(tmp_path, provider):
    model, _ = pruned(Toy(), 32)
    model.train()
    before = copy.deepcopy(model.state_dict())
    done = export_onnx(model, tmp_path / "toy.onnx", size=32, provider=provider)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert done.max_rel_error <= 1e-4 and done.shapes == ((1, 3, 32, 32), (2, 3, 64, 96))
    graph = onnx.load(tmp_path / "toy.onnx")
    onnx.checker.check_model(graph)
    assert [o.version for o in graph.opset_import if o.domain == ""] == [polyprune_ext.export.OPSET]
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    x = torch.randn(3, 3, 48, 80)  # neither shape the export checked
    with torch.no_grad():
        expected = copy.deepcopy(model).double().eval()(x.double())
    error = (onnx_output(tmp_path / "toy.onnx", x).double() - expected).abs().max() / expected.abs().max()
    assert error <= 1e-5


@pytest.mark.parametrize("provider", PROVIDERS)
def test_float16_export_is_checked_against_float32(tmp_path, provider):
    model, _ = pruned(Toy(), 32)
    done = export_onnx(model, tmp_path / "toy16.onnx", size=32, dtype="float16", provider=provider)
    assert done.dtype == "float16" and 0 < done.max_rel_error <= 1e-2
    session = onnx_session(tmp_path / "toy16.onnx", provider)
    assert session.get_inputs()[0].type == "tensor(float16)"


class ExportsWrong(torch.nn.Module):
    """Computes one thing in PyTorch and writes another into the graph: what a mistranslated op
    looks like from outside."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * 1.01 if torch.compiler.is_exporting() else y


def test_a_wrong_export_fails_and_leaves_no_file(tmp_path):
    (tmp_path / "model.onnx").write_text("the previous export")
    with pytest.raises(RuntimeError, match=r"differs from PyTorch by 1\.0e-02.*nothing was written"):
        export_onnx(ExportsWrong(), tmp_path / "model.onnx", size=16)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert (tmp_path / "model.onnx").read_text() == "the previous export"


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="float32 or float16"):
        export_onnx(Toy(), tmp_path / "m.onnx", dtype="bfloat16")
    with pytest.raises(ValueError, match="provider must be one of"):
        export_onnx(Toy(), tmp_path / "m.onnx", provider="tensorrt")
    if not CUDA_EP:
        with pytest.raises(RuntimeError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
            export_onnx(Toy(), tmp_path / "m.onnx", size=16, provider="cuda")
    assert not list(tmp_path.iterdir())


def test_latency_rows_state_what_was_timed(tmp_path):
    full = Toy().eval()
    small, _ = pruned(Toy(), 32)
    paths = {name: tmp_path / f"{name}.onnx" for name in ("unpruned", "pruned")}
    export_onnx(full, paths["unpruned"], size=32)
    export_onnx(small, paths["pruned"], size=32)
    rows = onnx_latency(paths, batch=2, size=32, threads=1, warmup=1, repeats=3)
    assert [r["model"] for r in rows] == ["unpruned", "pruned"]
    for r in rows:
        assert (r["runtime"], r["provider"], r["threads"], r["batch"], r["size"], r["dtype"]) == \
            ("onnxruntime", "cpu", 1, 2, 32, "float32")
        assert 0 < r["ms"] <= r["ms_p90"] and r["fps"] == pytest.approx(2000 / r["ms"])
    table = polyprune_ext.export.format_latency(rows)
    assert table.count("| onnxruntime cpu | 1 | 2 | 32 | float32 |") == 2 and "| 1.00x |" in table


def test_export_and_bench_commands_on_a_pruned_checkpoint(tmp_path, capsys, monkeypatch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from polyprune_ext import cli

    model, plan = pruned(smp.Unet("resnet18", encoder_weights=None, encoder_depth=3,
                                  decoder_channels=(32, 16, 8)), 64)
    polyprune_ext.save(tmp_path / "model.safetensors", model, plan)
    cli.main(["export", "--checkpoint", str(tmp_path), "--onnx", str(tmp_path / "m.onnx")])
    assert "wrote" in capsys.readouterr().out
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = model.double()(x.double())
    error = (onnx_output(tmp_path / "m.onnx", x).double() - expected).abs().max() / expected.abs().max()
    assert error <= 1e-5
    timed = []
    onnx_latency = polyprune_ext.export.onnx_latency
    monkeypatch.setattr(polyprune_ext.export, "onnx_latency",
                        lambda *a, **kw: timed.append(kw) or onnx_latency(*a, **kw))
    cli.main(["bench", "--checkpoint", str(tmp_path), "--runtime", "onnxruntime", "--size", "64",
              "--batch-size", "2", "--threads", "2", "--warmup", "0", "--device", "cpu"])
    assert [(kw["batch"], kw["threads"], kw["warmup"]) for kw in timed] == [(1, 2, 0), (2, 2, 0)]
    out = capsys.readouterr().out
    for name in ("unpruned", "pruned"):
        for batch in (1, 2):
            assert f"| {name} | onnxruntime cpu | 2 | {batch} | 64 | float32 |" in out
        assert f"{name}: " in out and "in onnxruntime on cpu, 2 CPU threads" in out


def test_a_missing_runtime_names_the_extra(tmp_path, monkeypatch):
    find_spec = polyprune_ext.export.importlib.util.find_spec
    monkeypatch.setattr(polyprune_ext.export.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"onnxruntime not installed: pip install 'polyprune_ext\[deploy\]'"):
        export_onnx(Toy(), tmp_path / "m.onnx")
