"""Forward hooks that keep exactly the tensors the enabled relational losses compare (README: the method, as configured).

Teacher and student are BERTs with the same module paths, so one plan taps both. A capture is whatever the
hooked module returned, graph included: the student's carry autograd into the relation loss; the teacher's
carry none because the teacher is frozen and runs under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tcd_ds.spec import RELATION_LOCATIONS, DistillSpec

# Where each location reads, given one encoder layer (an HF BertLayer or the student's MoE layer).
TAP_POINTS: dict[str, list[Callable[[nn.Module], nn.Module]]] = {
    "trunk": [lambda layer: layer],
    # The residual branches before dropout, residual add and LayerNorm: attention output projection, FFN/MoE.
    "residual_inner": [lambda layer: layer.attention.output.dense, lambda layer: layer.output.dense],
}
ATTENTION_POINTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "context": lambda layer: layer.attention.self,
    "query": lambda layer: layer.attention.self.query,
    "key": lambda layer: layer.attention.self.key,
    "value": lambda layer: layer.attention.self.value,
}


@dataclass(frozen=True)
class TapPlan:
    """The encoder layers each relation reads, resolved from the spec; an empty tuple means the relation is off."""

    trunk: tuple[int, ...] = ()
    residual_inner: tuple[int, ...] = ()
    attention: tuple[int, ...] = ()
    attention_vectors: str = "context"

    @classmethod
    def from_spec(cls, distill: DistillSpec, num_layers: int) -> TapPlan:
        """`num_layers`: the layers both models have ("all" means those)."""
        selected = {}
        for location in RELATION_LOCATIONS:
            relation = getattr(distill, location)
            if not relation.enabled:
                selected[location] = ()
                continue
            layers = range(num_layers) if relation.layers == "all" else sorted(set(relation.layers))
            if not layers:
                raise ValueError(f"distill.{location}.layers selects no layer")
            if layers[-1] >= num_layers:
                raise ValueError(
                    f"distill.{location}.layers {list(layers)} out of range: "
                    f"teacher and student share {num_layers} layers"
                )
            selected[location] = tuple(layers)
        return cls(**selected, attention_vectors=distill.attention.vectors)

    def enabled(self) -> dict[str, tuple[int, ...]]:
        return {location: getattr(self, location) for location in RELATION_LOCATIONS if getattr(self, location)}

    def layers_needed(self) -> int:
        """How many leading encoder layers a model must run for every capture to exist."""
        return max((max(layers) + 1 for layers in self.enabled().values()), default=0)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a BertModel or BertForMaskedLM, bare or wrapped by DeepSpeed (`.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return getattr(model, "bert", model).encoder.layer


class Taps:
    """Hooks on one model. `captures[location]` lists one tensor `[B, T, H]` per tapped module, in plan order
    (residual_inner: attention projection then FFN/MoE output, per layer). Hooks write into fixed slots, so a
    second forward (e.g. activation-checkpoint recompute) overwrites instead of piling up."""

    def __init__(self, model: nn.Module, plan: TapPlan):
        layers = encoder_layers(model)
        points = {**TAP_POINTS, "attention": [ATTENTION_POINTS[plan.attention_vectors]]}
        self.captures: dict[str, list[torch.Tensor | None]] = {}
        self._handles = []
        for location, selected in plan.enabled().items():
            modules = [point(layers[i]) for i in selected for point in points[location]]
            self.captures[location] = [None] * len(modules)
            for slot, module in enumerate(modules):
                self._handles.append(module.register_forward_hook(self._keep(location, slot)))

    def _keep(self, location: str, slot: int):
        def hook(module: nn.Module, args, output) -> None:
            # Self-attention returns (context, weights); a DeepSpeed MoE block returns (output, l_aux, counts).
            self.captures[location][slot] = output[0] if isinstance(output, tuple) else output

        return hook

    def clear(self) -> None:
        """Drop the captured tensors (and with them the graph they pin) once the losses are computed."""
        for slots in self.captures.values():
            slots[:] = [None] * len(slots)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
