"""The relational losses of TCD: match the teacher's cosine similarities between sampled token pairs.

With `scope: global` each data-parallel rank samples N/W positions of its micro-batch and all ranks compute
the same N x N relation over the gathered rows. The student's rows are gathered with autograd, whose backward
sums every rank's gradient for a rank's own rows; as every rank backprops the same loss, rank r's rows get
W * dL/d(rows_r). DeepSpeed then divides the summed parameter gradients by W, which leaves exactly dL/dtheta
of one process holding the whole batch. So each rank backprops the loss unscaled (tests/test_relations.py
checks it on two ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from tcd_ds.distill.taps import TapPlan
from tcd_ds.spec import DistillSpec

Captures = dict[str, list[torch.Tensor | None]]


def sample_positions(
    attention_mask: torch.Tensor | None, n: int, generator: torch.Generator, num_tokens: int | None = None
) -> torch.Tensor:
    """`n` distinct flat indices into `B*T` among non-padding tokens, drawn from `generator` (on its device).
    Without a mask (blocks without padding: `num_tokens` = B*T) the draw never looks at the data; with one, the
    mask is read (`nonzero`), so give its host copy."""
    real = None if attention_mask is None else attention_mask.reshape(-1).nonzero().squeeze(1)
    available = num_tokens if real is None else real.numel()
    if available < n:
        raise ValueError(f"cannot sample {n} token positions: the micro-batch has only {available} non-padding tokens")
    order = torch.randperm(available, generator=generator, device=generator.device)[:n]
    return order if real is None else real[order.to(real.device)]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Cosines of bf16 rows are too coarse for an MSE between them; fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length. An all-zero row (the MoE output of a token dropped at capacity) stays zero
    with a finite gradient, where F.normalize's eps would scale its gradient by 1e12 (inf in fp16)."""
    x = _at_least_fp32(x)
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the cosine-similarity matrices of `[..., N, d]` rows over the N(N-1) off-diagonal pairs,
    averaged over the leading dims (layers, heads). The diagonal is 1 for both models and carries nothing."""
    s, t = unit_rows(student), unit_rows(teacher)
    diff = s @ s.transpose(-1, -2) - t @ t.transpose(-1, -2)
    n = diff.shape[-1]
    # Zeroing the diagonal, not selecting the off-diagonal by a boolean mask, whose nonzero() waits on the device.
    diagonal = torch.eye(n, dtype=torch.bool, device=diff.device)
    return diff.masked_fill(diagonal, 0.0).pow(2).sum() / (diff.numel() // n * (n - 1))


def rows_at(captures: Captures, positions: torch.Tensor) -> torch.Tensor:
    """The sampled rows of every capture, stacked: `[K, n, H]` for K captures of `[B, T, H]`, in `captures` order,
    in fp32 at least, so that the gather and the gradients it sums are fp32 under bf16 too. `positions` may be on
    the host: they move to the captures' device."""
    rows = []
    for location, slots in captures.items():
        for slot, tensor in enumerate(slots):
            if tensor is None:
                raise RuntimeError(f"no capture for {location}[{slot}]: the model did not run forward with its taps")
            positions = positions.to(tensor.device, non_blocking=True)
            rows.append(_at_least_fp32(tensor.reshape(-1, tensor.shape[-1])[positions]))
    return torch.stack(rows)


def gather_rows(rows: torch.Tensor, group: dist.ProcessGroup | None, with_grad: bool) -> torch.Tensor:
    """Concatenate every rank's `[K, n, H]` rows along the position dim, in rank order."""
    if with_grad:
        parts = dist_nn.all_gather(rows, group=group)
    else:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, rows.contiguous(), group=group)
    return torch.cat(parts, dim=-2)


class RelationDistiller:
    """Turns the captures of both models on one micro-batch into the unweighted relation loss of each enabled
    location: trunk and residual_inner average over their matrices (residual_inner: two per layer), attention
    splits each `[N, H]` into `[heads, N, H/heads]` and averages over layers and heads."""

    def __init__(self, distill: DistillSpec, plan: TapPlan, num_heads: int, group: dist.ProcessGroup | None = None):
        self.plan = plan
        self.num_positions = distill.num_positions
        self.scope = distill.scope
        self.num_heads = num_heads
        self.group = group
        self.weights = {location: getattr(distill, location).weight for location in plan.enabled()}

    def world_size(self) -> int:
        """Ranks sharing one relation: the data-parallel group with global scope, else this rank alone."""
        if self.scope == "local" or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.group)

    def __call__(
        self, student: Captures, teacher: Captures, attention_mask: torch.Tensor | None, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """`generator` must differ across ranks (else with global scope all ranks pick the same flat positions)."""
        world = self.world_size()
        if self.num_positions % world:
            raise ValueError(
                f"distill.num_positions ({self.num_positions}) must be divisible by the data-parallel world size "
                f"({world}) with scope: global"
            )
        shapes = [t.shape for slots in student.values() for t in slots if t is not None]
        num_tokens = shapes[0][0] * shapes[0][1] if shapes else 0  # B*T; no capture: rows_at says so
        positions = sample_positions(attention_mask, self.num_positions // world, generator, num_tokens)
        s_rows = rows_at(student, positions)
        t_rows = rows_at(teacher, positions).detach()
        if world > 1:
            s_rows = gather_rows(s_rows, self.group, with_grad=True)
            t_rows = gather_rows(t_rows, self.group, with_grad=False)

        losses, start = {}, 0
        for location, slots in student.items():
            s, t = s_rows[start : start + len(slots)], t_rows[start : start + len(slots)]
            start += len(slots)
            if location == "attention":
                s, t = self.split_heads(s), self.split_heads(t)
            losses[location] = relation_loss(s, t)
        return losses

    def split_heads(self, rows: torch.Tensor) -> torch.Tensor:
        """`[L, N, H]` -> `[L, heads, N, H/heads]`: HF BERT lays head h out in features `h*d:(h+1)*d`."""
        layers, n, hidden = rows.shape
        return rows.view(layers, n, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """`sum_loc b_loc * L_rel(loc)`, the distillation term of the student's loss."""
        return sum(self.weights[location] * loss for location, loss in losses.items())
