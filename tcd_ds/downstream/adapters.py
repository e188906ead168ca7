"""Bottleneck adapters (Houlsby et al. 2019) for adapter fine-tuning, the paper's second downstream setting.

In every layer an adapter follows the attention output projection and another the FFN (in an MoE layer, the
whole MoE FFN), before dropout, the residual add and LayerNorm. They are attached by forward hooks, so the
pre-trained modules keep their paths and weights; only the adapters, the layer norms and the task head (pooler
and classifier) train, the rest of the encoder is frozen.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import PreTrainedModel


class Bottleneck(nn.Module):
    """x + up(gelu(down(x))). `up` starts at zero, so an adapted model starts as the pre-trained one."""

    def __init__(self, hidden_size: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(nn.functional.gelu(self.down(x)))


def add_adapters(model: PreTrainedModel, bottleneck: int) -> nn.ModuleDict:
    """Hook an adapter after each layer's attention output projection and FFN, register them on the model as
    `model.adapters` (so they move and save with it) and freeze everything else but layer norms and the head."""
    hidden = model.config.hidden_size
    adapters = nn.ModuleDict()
    for i, layer in enumerate(model.bert.encoder.layer):
        for place, module in (("attention", layer.attention.output.dense), ("ffn", layer.output.dense)):
            adapter = adapters[f"layer{i}_{place}"] = Bottleneck(hidden, bottleneck)
            module.register_forward_hook(lambda _module, _args, output, adapter=adapter: adapter(output))
    model.adapters = adapters.to(next(model.parameters()).device)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trained_with_adapters(name))
    return adapters


def is_trained_with_adapters(name: str) -> bool:
    return name.startswith(("adapters.", "classifier.", "bert.pooler.")) or ".LayerNorm." in name
