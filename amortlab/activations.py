"""Activation functions by config name (``model.encoder.activation=elu``), for the nets and the flow layers."""
from __future__ import annotations

from torch import nn

from amortlab.errors import AmortlabError

ACTIVATIONS = {"tanh": nn.Tanh, "elu": nn.ELU, "relu": nn.ReLU, "softplus": nn.Softplus, "leaky_relu": nn.LeakyReLU}


def activation(name: str) -> type[nn.Module]:
    """The ``nn.Module`` class of activation ``name``; an unknown name is a readable error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise AmortlabError(f"model activation {name!r} is unknown; use one of {', '.join(ACTIVATIONS)} "
                            f"(e.g. model.activation=tanh).") from None
