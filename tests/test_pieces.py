"""The modules methods insert, directly: LoRA's update, the adapter's bottleneck, module surgery, MLP heads, the side
network, and the per-task linear head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vptune.head import FeatureNorm, Head
from vptune.methods import Adapter, LoraLinear, MlpHead, SideNetwork
from vptune.methods.adapter import AdapterAfter
from vptune.methods.surgery import replace_submodule


def test_lora_is_w_x_plus_scaled_b_a_x() -> None:
    linear = nn.Linear(6, 4)
    lora = LoraLinear(linear, rank=2, alpha=3.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 6)
    assert torch.equal(lora(x), linear(x))  # B starts at zero
    with torch.no_grad():
        lora.lora_b.normal_()
    expected = linear(x) + 1.5 * (x @ lora.lora_a.T @ lora.lora_b.T)
    torch.testing.assert_close(lora(x), expected)
    assert lora.lora_a.shape == (2, 6) and lora.lora_b.shape == (4, 2)


def test_adapter_is_a_residual_bottleneck() -> None:
    adapter = Adapter(8, reduction=4, generator=torch.Generator().manual_seed(0))
    h = torch.randn(3, 8)
    assert torch.equal(adapter(h), h) and adapter.down.out_features == 2
    with torch.no_grad():
        adapter.up.weight.normal_()
    torch.testing.assert_close(adapter(h), h + adapter.up(F.gelu(adapter.down(h))))
    linear = nn.Linear(8, 8)
    torch.testing.assert_close(AdapterAfter(linear, adapter)(h), adapter(linear(h)))
    with pytest.raises(ValueError, match="reduction must be in 1..8"):
        Adapter(8, reduction=9)


def test_replace_submodule_by_identity() -> None:
    root = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 3)))
    target, replacement = root[1][1], nn.Identity()
    replace_submodule(root, target, replacement)
    assert root[1][1] is replacement
    with pytest.raises(ValueError, match="Linear is not a submodule of Sequential"):
        replace_submodule(root, nn.Linear(2, 2), nn.Identity())


def test_mlp_head_layers() -> None:
    head = MlpHead(8, 3, layers=3, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(4, 8)
    hidden = x
    for linear, _, norm, _ in head.hidden:  # Linear -> ReLU -> BatchNorm1d -> Dropout (identity in eval)
        hidden = F.batch_norm(F.relu(linear(hidden)), norm.running_mean, norm.running_var, norm.weight, norm.bias)
    torch.testing.assert_close(head(x), head.out(hidden))
    assert len(head.hidden) == 2 and head.num_classes == 3 and len(MlpHead(8, 3, layers=1).hidden) == 0
    with pytest.raises(ValueError, match=">= 1 layer"):
        MlpHead(8, 3, layers=0)


def test_side_network_shapes() -> None:
    side = SideNetwork(3, 16, width=4, depth=3)
    assert [conv.out_channels for conv in side.convs] == [4, 8, 16] and side(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_head_chooses_each_samples_task() -> None:
    weight, bias = torch.randn(3, 5, 8), torch.randn(3, 5)
    head = Head(8, 5, num_tasks=3, norm="none")
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    x, ids = torch.randn(4, 8), torch.tensor([2, 0, 2, 1])
    expected = torch.stack([x[i] @ weight[t].T + bias[t] for i, t in enumerate(ids.tolist())])
    torch.testing.assert_close(head(x, ids), expected)
    torch.testing.assert_close(head(x), x @ weight[0].T + bias[0])  # no ids: task 0


def test_feature_norm_is_a_batch_norm_without_affine_per_task() -> None:
    norm, reference = FeatureNorm(6, num_tasks=2), nn.BatchNorm1d(6, affine=False, eps=1e-6)
    x, ids = torch.randn(10, 6) * 5 + 3, torch.tensor([0, 1] * 5)
    out = norm(x, ids)
    torch.testing.assert_close(out[ids == 1], reference(x[ids == 1]))  # each task: its own batch statistics
    torch.testing.assert_close(norm.running_mean[1], reference.running_mean)
    torch.testing.assert_close(norm.running_var[1], reference.running_var)
    norm.eval()
    reference.eval()
    torch.testing.assert_close(norm(x, ids)[ids == 1], reference(x[ids == 1]))
    assert torch.allclose(norm(x[:3]), (x[:3] - norm.running_mean[0]) / (norm.running_var[0] + 1e-6).sqrt())
    norm.train()
    before = norm.running_mean.clone()
    norm(x[:1])  # one row: no batch variance, the running statistics normalise it and stay
    assert torch.equal(norm.running_mean, before)
