"""MLP policy settings: the smallest policy (state, optionally image features -> chunk)."""

from __future__ import annotations

from ilstudio.config.declare import configurable, param
from ilstudio.policies.base import PolicyConfig, dropout_param


@configurable("mlp", group="MLP policy")
class MLPConfig(PolicyConfig):
    name = "mlp"
    uses_images = True

    hidden_dim: int = param(256, "Width of each hidden layer.", documented=False,
                            bounds="[1, inf)")
    num_layers: int = param(3, "Hidden layers (0: a linear map).", documented=False,
                            bounds="[0, inf)")
    image_feature_dim: int = param(64, "Per-camera image feature size (small conv encoder).",
                                   documented=False, bounds="[1, inf)")
    dropout: float = dropout_param(0.0, "Dropout between hidden layers.")


CONFIG_CLASS = MLPConfig
