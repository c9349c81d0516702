"""One fake view for the planted-ground-truth tests: a hand-built module whose `HookPoint`s carry
TransformerLens names, with the unembedding and weights the test chooses."""

import torch
from torch import nn

from dynascope.analysis.view import ModelShape, ModelView


class FakeView(ModelView):
    def __init__(self, model: nn.Module, points: dict[str, nn.Module], unembedding: torch.Tensor, n_layers: int = 1,
                 d_mlp: int | None = None, context_length: int = 64, activation: str = "relu",
                 values: torch.Tensor | None = None, gain: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        self.model, self.E, self.values, self.gain, self.bias = model, unembedding, values, gain, bias
        V, d = unembedding.shape
        self.shape = ModelShape(n_layers, d, d_mlp or d, V, context_length, activation)
        self.points = {name: (module, "out") for name, module in points.items()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    @property
    def output_embeddings(self) -> torch.Tensor:
        return self.E

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self.bias

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def final_norm_gain(self) -> torch.Tensor:
        return self.gain if self.gain is not None else torch.ones(self.shape.d_model)

    def mlp_values(self, layer: int) -> torch.Tensor:
        return self.values if self.values is not None else torch.zeros(self.shape.d_mlp, self.shape.d_model)
