"""BatchNorm re-calibration: the running statistics become the exact pooled mean and unbiased
variance of each norm's inputs over the images, checked against a float64 reference computed
from those inputs directly; everything else is left as it was."""

import copy

import pytest
import torch

from polyprune_ext import recalibrate_bn
from polyprune_ext.testing import process_group


class Norms(torch.nn.Module):
    """BatchNorm 1-, 2- and 3-D, a SyncBatchNorm (plain BatchNorm outside torch.distributed),
    a dropout, and a norm without running statistics. (SyncBatchNorm needs a GPU under
    torch.distributed: ``sync=False`` makes it a BatchNorm2d.)"""

    def __init__(self, sync=True):
        super().__init__()
        self.conv, self.bn2 = torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6)
        self.sync = torch.nn.SyncBatchNorm(6) if sync else torch.nn.BatchNorm2d(6)
        self.conv3, self.bn3 = torch.nn.Conv3d(6, 4, 1), torch.nn.BatchNorm3d(4, momentum=None)
        self.fc, self.bn1 = torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5)
        self.drop = torch.nn.Dropout(0.5)
        self.untracked = torch.nn.BatchNorm1d(5, track_running_stats=False)

    def forward(self, x):
        x = torch.relu(self.sync(self.bn2(self.conv(x))))
        x = self.bn3(self.conv3(x.unsqueeze(2).expand(-1, -1, 2, -1, -1))).mean((2, 3, 4))
        return self.untracked(self.drop(self.bn1(self.fc(x))))


def batches(count=5, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 9, 9, generator=gen) * 3 + 2 for _ in range(count)]


def reference_statistics(model, images):
    """{norm name: (mean, unbiased var)} in float64 from each norm's inputs, concatenated over
    every image, with the norms normalising by batch statistics and everything else in eval."""
    model = copy.deepcopy(model).double().eval()
    inputs = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.train()
            m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for x in images:
            model(x.double())
    result = {}
    for name, xs in inputs.items():
        values = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], 1)
        result[name] = values.mean(1), values.var(1, unbiased=True)
    return result


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_statistics_are_the_pooled_mean_and_unbiased_variance(dtype):
    torch.manual_seed(0)
    model = Norms().to(dtype)
    images = batches()
    expected = reference_statistics(model, images)
    assert recalibrate_bn(model, [(x.to(dtype), None) for x in images]) == 4
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for name, (mean, var) in expected.items():
        norm = model.get_submodule(name)
        torch.testing.assert_close(norm.running_mean.double(), mean, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(norm.running_var.double(), var, rtol=tolerance, atol=tolerance)
        assert norm.num_batches_tracked.item() == len(images)


def test_the_spread_between_batch_means_counts():
    """Batches with different means: the pooled variance includes the spread between them, which
    the average of per-batch variances (momentum=None) misses."""
    norm = torch.nn.BatchNorm1d(1)
    low, high = torch.randn(64, 1), torch.randn(64, 1) + 10
    recalibrate_bn(norm, [low, high])
    pooled = torch.cat([low, high]).double()
    assert norm.running_var.item() == pytest.approx(pooled.var().item(), rel=1e-6)
    assert norm.running_var.item() > 20  # the per-batch variances are about 1


def test_num_images_cuts_the_last_batch():
    torch.manual_seed(0)
    model = Norms()
    images = batches()
    expected = reference_statistics(model, [images[0], images[1][:2]])
    recalibrate_bn(model, iter(images), num_images=6)
    torch.testing.assert_close(model.bn2.running_mean.double(), expected["bn2"][0], rtol=1e-5, atol=1e-5)
    assert model.bn2.num_batches_tracked.item() == 2


def test_modes_momentum_and_parameters_are_left_as_they_were():
    torch.manual_seed(0)
    model = Norms().train()
    model.bn2.eval()  # a frozen part inside a training model keeps its own mode
    model.conv.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_bn(model, batches(2))
    assert model.training and not model.bn2.training and model.bn1.training and model.drop.training
    assert model.bn2.momentum == 0.1 and model.bn3.momentum is None
    assert not model.conv.weight.requires_grad and model.fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():  # only the running statistics moved
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, state[key]), key


def test_a_failed_pass_changes_nothing():
    torch.manual_seed(0)
    model = Norms()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def broken():
        yield from batches(2)
        yield torch.randn(4, 5, 9, 9)  # wrong channel count: the conv raises
    with pytest.raises(RuntimeError):
        recalibrate_bn(model, broken())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.bn2.momentum == 0.1 and model.bn3.momentum is None


def test_no_batchnorm_and_bad_input():
    with pytest.warns(UserWarning, match="no BatchNorm"):
        assert recalibrate_bn(torch.nn.Conv2d(3, 3, 1), batches(1)) == 0
    with pytest.raises(ValueError, match="no images"):
        recalibrate_bn(Norms(), [])
    with pytest.raises(ValueError, match="num_images"):
        recalibrate_bn(Norms(), batches(1), num_images=0)


def _rank(rank, world, init_file, out_dir):
    with process_group(rank, world, init_file):
        torch.manual_seed(0)
        model = Norms(sync=False)
        recalibrate_bn(model, batches(seed=0)[rank::world])
        torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")


def test_ranks_end_with_the_statistics_of_all_their_images(tmp_path):
    torch.multiprocessing.spawn(_rank, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    single = Norms(sync=False)
    recalibrate_bn(single, batches(seed=0))  # the union of the ranks' batches
    for key, value in single.state_dict().items():
        if "running" in key:
            assert torch.equal(states[0][key], states[1][key]), key  # the same bits on both ranks
            torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)
