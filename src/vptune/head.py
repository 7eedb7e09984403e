"""The classifier on the pooled features: a linear head per task, and the normalisation of what it reads."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

HEAD_BIAS = -math.log(99.0)  # the released code's "special bias": -log((1 - 0.01) / 0.01)
HEAD_INITS = ("uniform", "released")
HEAD_NORMS = ("batchnorm", "none")
HEAD_INIT, HEAD_NORM = "uniform", "batchnorm"  # the defaults (docs/fidelity.md says why)


def check_head(init: str, norm: str) -> None:
    """Refuse an unknown head start or feature norm, naming the choices."""
    for name, value, choices in (("head_init", init, HEAD_INITS), ("head_norm", norm, HEAD_NORMS)):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


class FeatureNorm(nn.Module):
    """BatchNorm without affine on the head's input, one set of statistics per task (as MAE's linear probing).

    It removes the features' common mean and scales each dimension to unit variance; see docs/fidelity.md for why
    vptune puts it before the head by default. Rows of a batch are normalised with the statistics of their own task
    (``task_ids``), so that K configurations trained together each keep theirs; under torchrun the statistics are
    those of the whole global batch, so that N processes train as one. Computed in the statistics' precision.
    """

    def __init__(self, width: int, num_tasks: int = 1, momentum: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(num_tasks, width))
        self.register_buffer("running_var", torch.ones(num_tasks, width))

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            return self._normalise(features, 0)
        if not self.training:  # every row its own task's statistics, in one step
            mean, var = self.running_mean[task_ids], self.running_var[task_ids]
            return ((features.to(mean.dtype) - mean) * torch.rsqrt(var + self.eps)).to(features.dtype)
        out = torch.empty_like(features)
        for task in task_ids.unique().tolist():
            rows = task_ids == task
            out[rows] = self._normalise(features[rows], task)
        return out

    def _normalise(self, features: torch.Tensor, task: int) -> torch.Tensor:
        mean, var = self.running_mean[task], self.running_var[task]
        x = features.to(mean.dtype)  # the statistics' precision (fp32 under bf16 autocast)
        if self.training:
            total = _summed(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]))
            count = total[-1]
            if count > 1:  # one row has no batch variance: its task's running statistics
                mean = total[:-1] / count
                var = _summed((x - mean).square().sum(0)) / count
                with torch.no_grad():
                    self.running_mean[task].lerp_(mean, self.momentum)
                    self.running_var[task].lerp_(var * count / (count - 1), self.momentum)  # unbiased, as BatchNorm
        return ((x - mean) * torch.rsqrt(var + self.eps)).to(features.dtype)


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over every process of a distributed run (gradients flow back to each); the tensor itself otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist_nn.all_reduce(tensor)
    return tensor


class Head(nn.Module):
    """A linear classifier per task, ``weight`` (T, C, d) and ``bias`` (T, C), chosen per sample by task index.

    Args:
        width: feature width d.
        num_classes: classes C.
        num_tasks: tasks T held (several configurations, or several tasks served together).
        generator: draws the initial weights.
        init: ``"uniform"``: nn.Linear's default range, U(-1/sqrt(d), 1/sqrt(d)) for weight and bias (the
            default); ``"released"``: the released code's head, the weight kaiming-normal over its fan-out (std
            sqrt(2 / C)) and the bias the constant -log(99).
        norm: ``"batchnorm"``: a :class:`FeatureNorm` before the linear layer (the default); ``"none"``: the
            features as they are (the paper). See docs/fidelity.md.
    """

    def __init__(
        self,
        width: int,
        num_classes: int,
        num_tasks: int = 1,
        generator: torch.Generator | None = None,
        init: str = HEAD_INIT,
        norm: str = HEAD_NORM,
    ):
        super().__init__()
        check_head(init, norm)
        weight, bias = torch.empty(num_tasks, num_classes, width), torch.empty(num_tasks, num_classes)
        if init == "released":
            weight.normal_(0.0, math.sqrt(2.0 / num_classes), generator=generator)  # kaiming fan-out of (C, d)
            bias.fill_(HEAD_BIAS)
        else:
            bound = 1.0 / math.sqrt(width)
            weight.uniform_(-bound, bound, generator=generator)
            bias.uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.norm = FeatureNorm(width, num_tasks) if norm == "batchnorm" else None

    @classmethod
    def stacked(cls, heads: list[Head]) -> Head:
        """One head holding several heads' tensors along the task dimension (head k = task k)."""
        first = heads[0]
        norm = "batchnorm" if first.norm is not None else "none"
        head = cls(first.weight.shape[2], first.num_classes, len(heads), norm=norm).to(first.weight.device)
        with torch.no_grad():
            for name, tensor in head.state_dict().items():
                tensor.copy_(torch.cat([each.state_dict()[name] for each in heads]))
        return head

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm is not None:
            features = self.norm(features, task_ids)
        if task_ids is None:
            return F.linear(features, self.weight[0].to(features.dtype), self.bias[0].to(features.dtype))
        weight, bias = self.weight[task_ids].to(features.dtype), self.bias[task_ids].to(features.dtype)
        return torch.einsum("bd,bcd->bc", features, weight) + bias
