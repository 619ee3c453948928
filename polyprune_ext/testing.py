"""Helpers for testing pruning on your own models, as the project's tests use them: the devices
to run on, a float64 function-preservation check of a prune, the smp model matrix, small
models that exercise the analysis rules, and a process group for multi-process tests.

    from polyprune_ext.testing import prune_and_compare
    analysis, before, after, error = prune_and_compare(MyNet(), torch.randn(1, 3, 64, 64), 0.5)
    assert error <= 1e-6   # the pruned model computes what the original does without those channels
"""

import contextlib
import copy
import datetime
import inspect
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .choices import MixingNorms
from .structure import Analysis, ModelStats, analyze, model_stats, prune_, zero_channels


def devices() -> list[Any]:
    """pytest parameters: "cpu", and "cuda", which runs whenever a GPU is visible and is skipped
    only when none is."""
    import pytest

    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no GPU"))]


@contextlib.contextmanager
def process_group(rank: int, world: int, init_file: Union[str, Path], timeout_s: float = 120,
                  backend: str = "gloo") -> Iterator[None]:
    """torch.distributed for one rank of a test spawned with ``torch.multiprocessing.spawn``,
    through a file store. The timeout turns a lost rank into a failure instead of a hang, and the
    ranks meet at a barrier before the teardown: a rank that tears the file store down while
    another still uses it can leave that one waiting forever (seen once in CI)."""
    torch.distributed.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def dihedral(t: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of a tensor over its last two dimensions."""
    out = []
    for flipped in (t, t.flip(-1)):
        out += [flipped.rot90(k, (-2, -1)) for k in range(4)]
    return out


def randomize_norms(model: torch.nn.Module) -> None:
    """Batch norms that are not identities and layer scales that are not ~0 (timm's ConvNeXt starts
    them at 1e-6), so that a zeroed channel visibly changes the output."""
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("gamma") and p.dim() == 1:
            p.data.copy_(torch.rand(p.numel(), generator=gen) + 0.5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats:
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


def zeroed_reference(model: torch.nn.Module, analysis: Analysis, keep: dict) -> torch.nn.Module:
    """A copy of model whose removed channels are zeroed at each of their group's gates."""
    reference = copy.deepcopy(model)
    drop = {i: sorted(set(range(analysis.groups[i].size)) - set(torch.as_tensor(k).tolist()))
            for i, k in keep.items()}
    zero_channels(reference, analysis, drop)
    return reference


class MaskedStatistics(TorchFunctionMode):
    """Norm statistics over the channels ``kept`` (a bool mask) alone, whatever module computes
    them: layer norms over the last dim, group norms over dim 1, a mean over a dim of the mask's
    size (GRN's). What a model pruned through its channel-mixing norms computes on the channels
    it keeps."""

    def __init__(self, kept: torch.Tensor):
        super().__init__()
        self.kept = kept

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (F.layer_norm, F.group_norm):
            call = inspect.signature(func).bind(*args, **kwargs)
            call.apply_defaults()
            x, weight, bias, eps = (call.arguments[n] for n in ("input", "weight", "bias", "eps"))
            groups = call.arguments.get("num_groups", 1)
            channels = -1 if func is F.layer_norm else 1  # as the mask runs
            xs = x.movedim(channels, 1).reshape(x.shape[0], groups, self.kept.numel() // groups, -1)
            mask = self.kept.view(1, groups, -1, 1).to(x.dtype)
            count = mask.sum(2, keepdim=True) * xs.shape[3] if func is F.group_norm else mask.sum(2, keepdim=True)
            dims = (2, 3) if func is F.group_norm else (2,)
            mean = (xs * mask).sum(dims, keepdim=True) / count
            var = ((xs - mean).square() * mask).sum(dims, keepdim=True) / count
            y = ((xs - mean) / torch.sqrt(var + eps)).reshape(x.movedim(channels, 1).shape).movedim(1, channels)
            shape = [-1] if func is F.layer_norm else [-1] + [1] * (x.dim() - 2)
            y = y * weight.view(shape) if weight is not None else y
            return y + bias.view(shape) if bias is not None else y
        if func in (torch.mean, torch.Tensor.mean):
            x, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(dim, (list, tuple)) and len(dim) == 1:
                dim = dim[0]
            if isinstance(dim, int) and x.shape[dim] == self.kept.numel():
                keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
                return x.index_select(dim, self.kept.nonzero().flatten().to(x.device)).mean(dim, keepdim)
        return func(*args, **kwargs)


def masked_norm_reference(model: torch.nn.Module, analysis: Analysis, keep: dict) -> torch.nn.Module:
    """The reference a prune through channel-mixing norms (analyze(..., mixing_norms="prune"))
    must equal: a copy of ``model`` whose removed channels are zeroed at their gates and left
    out of the statistics of every norm their groups name (``ChannelGroup.mixing``; norms with
    a ``weight``, whose slots say where the channels are), by MaskedStatistics."""
    reference = zeroed_reference(model, analysis, keep)
    kept: dict[str, torch.Tensor] = {}
    for i in keep:
        group = analysis.groups[i]
        drop = sorted(set(range(group.size)) - set(torch.as_tensor(keep[i]).tolist()))
        for norm in group.mixing:
            channels = analysis.shapes[f"{norm}.weight"][0]
            mask = kept.setdefault(norm, torch.ones(channels, dtype=torch.bool))
            for slot in group.slots:
                if slot.name == f"{norm}.weight":
                    mask[[slot.offset + c for c in drop]] = False
    for norm, mask in kept.items():
        module = reference.get_submodule(norm)
        module.forward = _masked_forward(module.forward, mask)  # type: ignore[method-assign]
    return reference


def _masked_forward(forward: Any, kept: torch.Tensor) -> Any:
    def masked(*args: Any, **kwargs: Any) -> Any:
        with MaskedStatistics(kept):
            return forward(*args, **kwargs)
    return masked


def random_runs(runs: int, unit: int, share: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted channel indices of ``share`` of ``runs`` aligned runs of ``unit`` channels (at
    least one run), chosen at random."""
    chosen = torch.randperm(runs, generator=gen)[: max(1, round(runs * share))]
    return (chosen[:, None] * unit + torch.arange(unit)).flatten().sort().values


def prune_and_compare(model: torch.nn.Module, x: torch.Tensor, ratio: float, seed: int = 0, *,
                      mixing_norms: MixingNorms = "freeze") -> tuple[Analysis, ModelStats, ModelStats, float]:
    """Prune ``ratio`` of every prunable group of ``model`` (in place, in float64; whole runs
    where a group goes in runs) at random and compare with a float64 reference in which those
    channels are zeroed at their gates (and, with ``mixing_norms="prune"``, left out of the
    statistics of the norms pruned through: masked_norm_reference); returns (analysis, stats
    before, stats after, relative error of the output)."""
    model, x = model.double().eval(), x.double()
    randomize_norms(model)
    analysis = analyze(model, x, mixing_norms=mixing_norms)
    gen = torch.Generator().manual_seed(seed)
    keep = {i: random_runs(g.size // g.unit, g.unit, 1 - ratio, gen)
            for i, g in enumerate(analysis.groups) if g.prunable}
    reference = masked_norm_reference(model, analysis, keep)
    before = model_stats(model, x)
    with torch.no_grad():
        expected, original = reference(x), model(x)
    change = ((expected - original).abs().max() / original.abs().max()).item()
    assert change > 1e-4, f"zeroing changed the output by only {change:.1e}: the check would be empty"
    prune_(model, analysis, keep)
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    return analysis, before, model_stats(model, x), error


def conv_share(model: torch.nn.Module, analysis: Analysis, prefix: str = "") -> float:
    """The share of the output channels of ``model``'s convs (those under ``prefix``) that are
    in prunable groups able to lose some (more channels than one run)."""
    convs = {n + ".weight": m for n, m in model.named_modules()
             if isinstance(m, torch.nn.modules.conv._ConvNd) and n.startswith(prefix)}
    total = removable = 0
    for g in analysis.groups:
        for slot in g.slots:
            conv = convs.get(slot.name)
            if conv is not None and slot.dim == (1 if conv.transposed else 0):
                total += g.size
                removable += g.size if g.prunable and g.size > g.unit else 0
    return removable / total


# -- the smp matrix: 11 architectures x 10 encoder families (102 pairs smp builds) -------------

SMP_ARCHITECTURES = ["Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus",
                     "Linknet", "MAnet", "PAN", "UPerNet", "Segformer"]
SMP_ENCODERS = ["resnet18", "resnext50_32x4d", "se_resnet50", "efficientnet-b0", "mobilenet_v2",
                "densenet121", "vgg11_bn", "timm-regnetx_002", "mit_b0", "tu-convnext_atto"]


def build_smp(arch: str, encoder: str) -> torch.nn.Module:
    """The model, or a pytest skip where smp itself cannot build the pair (mit with some
    decoders)."""
    import pytest

    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    try:
        return getattr(smp, arch)(encoder, encoder_weights=None)
    except Exception as error:  # smp refuses the combination at construction
        pytest.skip(f"smp cannot build {arch} with {encoder}: {error}")


# -- small models, each exercising a set of analysis rules -------------------------------------


class Toy(torch.nn.Module):
    """Residual add, U-Net style concatenation, depthwise conv, squeeze-excitation gate."""

    def __init__(self) -> None:
        super().__init__()
        bn = torch.nn.BatchNorm2d
        self.stem, self.stem_bn = torch.nn.Conv2d(3, 8, 3, padding=1), bn(8)
        self.res, self.res_bn = torch.nn.Conv2d(8, 8, 3, padding=1), bn(8)
        self.dw, self.dw_bn = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), bn(8)
        self.squeeze, self.excite = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 8, 1)
        self.down = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.fuse, self.fuse_bn = torch.nn.Conv2d(8 + 6, 10, 3, padding=1), bn(10)
        self.head = torch.nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.res_bn(self.res(x)))
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = x * torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        skip = x
        x = self.up(torch.relu(self.down(x)))
        x = torch.relu(self.fuse_bn(self.fuse(torch.cat([skip, x], 1))))
        return self.head(x)


class Grouped(torch.nn.Module):
    """ResNeXt-style grouped convs: one reading a concatenation of two groups that spans its conv
    groups whole, one whose conv groups cut a group (the groups are cut to line up)."""

    def __init__(self) -> None:
        super().__init__()
        bn = torch.nn.BatchNorm2d
        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(3, 4, 1)
        self.grouped, self.grouped_bn = torch.nn.Conv2d(12, 6, 3, padding=1, groups=3), bn(6)
        self.expand, self.expand_bn = torch.nn.Conv2d(6, 10, 1), bn(10)
        self.c, self.d = torch.nn.Conv2d(3, 5, 1), torch.nn.Conv2d(3, 7, 1)
        self.cut = torch.nn.Conv2d(12, 4, 1, groups=2)  # 6 channels per conv group: d cut
        self.head = torch.nn.Conv2d(14, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ab = torch.relu(torch.cat([self.a(x), self.b(x)], 1))  # conv groups: a, a, b
        y = torch.relu(self.grouped_bn(self.grouped(ab)))
        y = torch.relu(self.expand_bn(self.expand(y)))
        cd = torch.relu(torch.cat([self.c(x), self.d(x)], 1))
        return self.head(torch.cat([y, self.cut(cd)], 1))


class Tokens(torch.nn.Module):
    """Linear layers on channels-last tokens, a layer scale, per-channel group and instance
    norms, a group norm of 4 channels per group (pruned in whole groups), and a split that maps
    back to concatenated groups, its sizes an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.inorm = torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.a, self.b = torch.nn.Conv2d(8, 6, 1), torch.nn.Conv2d(8, 4, 1)
        self.sizes = [6, 4]  # a's and b's channels, set by the surgery
        self.gn_per_channel = torch.nn.GroupNorm(10, 10)
        self.fc1, self.fc2 = torch.nn.Linear(10, 16), torch.nn.Linear(16, 10)
        self.proj = torch.nn.Conv2d(10, 10, 1)
        self.scale = torch.nn.Parameter(torch.rand(10) + 0.5)
        self.mixing = torch.nn.Conv2d(10, 12, 1)
        self.gn_mixing = torch.nn.GroupNorm(3, 12)
        self.head = torch.nn.Conv2d(12 + 10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inorm(self.stem(x)))
        x = self.gn_per_channel(torch.cat([self.a(x), self.b(x)], 1))
        a, b = x.split(self.sizes, 1)  # the two groups again
        x = torch.cat([torch.relu(a), b], 1)
        tokens = self.proj(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        tokens = tokens + self.fc2(torch.nn.functional.gelu(self.fc1(tokens))) * self.scale
        x = tokens.permute(0, 3, 1, 2)
        return self.head(torch.cat([self.gn_mixing(self.mixing(x)), x], 1))


# -- beyond the smp matrix: MONAI networks in 2-D and 3-D, timm encoders through smp ---------


def _monai(name: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import pytest

        nets = pytest.importorskip("monai.networks.nets")
        return getattr(nets, name)(**kwargs)
    return build


def _smp_unet(encoder: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import pytest

        smp = pytest.importorskip("segmentation_models_pytorch")
        return smp.Unet(encoder, encoder_weights=None)
    return build


_2D = dict(spatial_dims=2, in_channels=3, out_channels=1)
_3D = dict(spatial_dims=3, in_channels=1, out_channels=2)
_DYN = dict(kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2])
_TIMM: list[tuple[str, MixingNorms]] = [
    ("tu-convnextv2_atto", "prune"), ("timm-skresnet18", "freeze"), ("tu-fastvit_t8", "freeze"),
    ("tu-regnety_002", "freeze"), ("tu-ghostnet_100", "freeze"), ("tu-dla34", "freeze"),
    ("tu-mixnet_s", "freeze"), ("tu-resnetblur18", "freeze"), ("tu-efficientvit_b0", "freeze")]
# name: (build, input shape, how analyze treats channel-mixing norms). MONAI with its defaults
# (UNet: residual units, PReLU, instance norms; SegResNet: group norms of 8 groups) at 64x64 and
# 32^3; timm encoders chosen for the patterns they hold (ConvNeXt-V2's layer norms and GRN,
# selective kernels, GhostNet, DLA roots, MixNet splits, blur pools, RegNetY's SE over grouped
# convs, FastViT, EfficientViT).
ZOO: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...], MixingNorms]] = {
    "monai.UNet": (_monai("UNet", **_2D, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                          num_res_units=2), (1, 3, 64, 64), "freeze"),
    "monai.SegResNet": (_monai("SegResNet", **_2D), (1, 3, 64, 64), "freeze"),
    "monai.BasicUNet": (_monai("BasicUNet", **_2D), (1, 3, 64, 64), "freeze"),
    "monai.DynUNet": (_monai("DynUNet", **_2D, **_DYN), (1, 3, 64, 64), "freeze"),
    "monai.AttentionUnet": (_monai("AttentionUnet", **_2D, channels=(16, 32, 64, 128), strides=(2, 2, 2)),
                            (1, 3, 64, 64), "freeze"),
    "monai.SwinUNETR": (_monai("SwinUNETR", **_2D, feature_size=12), (1, 3, 64, 64), "freeze"),
    "monai.UNet-3d": (_monai("UNet", **_3D, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=2),
                      (1, 1, 32, 32, 32), "freeze"),
    "monai.DynUNet-3d": (_monai("DynUNet", **_3D, **_DYN, filters=[8, 16, 32, 64]), (1, 1, 32, 32, 32), "freeze"),
    "monai.SegResNet-3d": (_monai("SegResNet", **_3D, init_filters=8), (1, 1, 32, 32, 32), "freeze"),
    **{f"Unet-{encoder}": (_smp_unet(encoder), (1, 3, 64, 64), mixing) for encoder, mixing in _TIMM},
}
