"""N copies of one network as one: every affine layer holds its N weights with a leading model dimension.

Rows of a batch are model-major: a stacked batch ``[..., N*B, F]`` (batch axis second to last, the convention of
every net in amortlab) is N blocks ``[..., B, F]``, block i belonging to model i. A ``StackedLinear`` maps block i
with model i's weights only, through one batched product per layer:

    y[..., i*B + b, :] = x[..., i*B + b, :] W_i^T + c_i,     W ``[N, out, in]``, c ``[N, out]``

Everything else in a network (activations, sums over features, log-sum-exp over samples) is per row already, so
the stacked network computes each model's numbers exactly as its own network would. Parametrizations of a weight
(the encoder regularizers' weight norm and spectral norm) are stacked too: their parameters and buffers get the
same leading N, and their ``forward`` works on ``[..., out, in]``.

``stack_modules(members)`` builds the stacked copy of N modules of one architecture; ``member_state(stacked, i)``
is model i's ``state_dict`` again (same keys as the member's own).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from amortlab.distributions.flow import Dense
from amortlab.errors import AmortlabError


class StackedLinear(nn.Module):
    """N affine layers ``weight`` ``[N, out, in]``, ``bias`` ``[N, out]``; input ``[..., N*B, in]`` model-major."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.n_models, self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        n, lead, rows = self.n_models, x.shape[:-2], x.shape[-2]
        if rows % n:
            raise ValueError(f"a layer of {n} stacked models takes [..., {n}*B, {self.in_features}] (model-major "
                             f"rows), got {list(x.shape)}")
        b = rows // n
        # [..., N*B, in] -> [N, L*B, in] (L = prod(lead)) -> baddbmm -> back
        xs = x.reshape(-1, n, b, self.in_features).transpose(0, 1).reshape(n, -1, self.in_features)
        y = torch.baddbmm(self.bias.unsqueeze(1), xs, self.weight.transpose(1, 2))
        return y.reshape(n, -1, b, self.out_features).transpose(0, 1).reshape(*lead, rows, self.out_features)

    def extra_repr(self) -> str:
        return f"n_models={self.n_models}, in={self.in_features}, out={self.out_features}"


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.detach() for t in tensors]).clone()


def _stack_state(module: nn.Module, members: Sequence[nn.Module]) -> None:
    """Give ``module`` (a copy of members[0], no children) the members' parameters and buffers stacked on dim 0."""
    for name, _ in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(_stack([getattr(m, name) for m in members])))
    for name, _ in list(module.named_buffers(recurse=False)):
        module._buffers[name] = _stack([getattr(m, name) for m in members])


def _stacked_linear(layers: Sequence[nn.Module]) -> StackedLinear:
    first = layers[0]
    if parametrize.is_parametrized(first, "bias"):
        raise AmortlabError("stacking cannot stack a parametrized bias; train these models one run each.")
    if not parametrize.is_parametrized(first, "weight"):
        return StackedLinear(_stack([m.weight for m in layers]), _stack([m.bias for m in layers]))
    out = StackedLinear(_stack([m.parametrizations.weight.original for m in layers]), _stack([m.bias for m in layers]))
    for j, p in enumerate(first.parametrizations.weight):
        stacked_p = copy.deepcopy(p)
        if list(stacked_p.children()):
            raise AmortlabError(f"stacking cannot stack the parametrization {type(p).__name__} (it has submodules).")
        _stack_state(stacked_p, [m.parametrizations.weight[j] for m in layers])
        out.eval()  # registering evaluates it once, in the host's mode: a power iteration must not step there
        parametrize.register_parametrization(out, "weight", stacked_p)
    return out.train(first.training)


def _convert(stacked: nn.Module, members: Sequence[nn.Module], path: str) -> None:
    for name, child in list(stacked.named_children()):
        peers = [getattr(m, name) for m in members]
        where = f"{path}.{name}" if path else name
        if isinstance(child, Dense) and child.n_points is not None:
            raise AmortlabError(f"stacking cannot stack the per-point layer {where}.")
        if isinstance(child, nn.Linear) or type(child) is Dense:  # not a MaskedDense (its mask would be lost)
            setattr(stacked, name, _stacked_linear(peers))
            continue
        own = [n for n, _ in child.named_parameters(recurse=False)] + [
            n for n, _ in child.named_buffers(recurse=False) if n not in child._non_persistent_buffers_set]
        if own:
            raise AmortlabError(
                f"amortlab.stack cannot stack {where} ({type(child).__name__}): it holds parameters "
                f"({', '.join(own)}) outside nn.Linear / Dense layers. Stacking supports networks built from those "
                f"layers (model=burda_mlp, cremer_mlp, posterior=gaussian|flow); train this model one run per seed "
                f"(drop stack.seeds).")
        _convert(child, peers, where)


def stack_modules(members: Sequence[nn.Module]) -> nn.Module:
    """One module computing all N ``members`` (same architecture) at once: a deep copy of ``members[0]`` whose
    affine layers are ``StackedLinear`` of all members' weights. Refuses modules it cannot stack exactly."""
    if len(members) < 2:
        raise AmortlabError("stacking needs at least two models (stack.seeds with two or more seeds).")
    stacked = copy.deepcopy(members[0])
    _convert(stacked, members, "")
    n = len(members)
    mine, theirs = stacked.state_dict(), members[0].state_dict()
    if set(mine) != set(theirs):
        raise AmortlabError(f"stacking changed the module's state keys ({sorted(set(mine) ^ set(theirs))[:4]}); "
                            f"train these models one run each.")
    for key, value in mine.items():
        if tuple(value.shape) != (n, *theirs[key].shape):
            raise AmortlabError(f"amortlab.stack cannot stack {key} (shape {tuple(theirs[key].shape)}); train these "
                                f"models one run each.")
    return stacked


def member_state(stacked: nn.Module, i: int) -> dict[str, Tensor]:
    """Model i's ``state_dict`` (the member's own keys and shapes) from the stacked module."""
    return {k: v[i].clone() for k, v in stacked.state_dict().items()}
