"""An MoE layer's local experts stored the way they are computed: one packed weight and one packed bias.

DeepSpeed's `Experts` (deepspeed/moe/experts.py) holds one `ExpertFFN` per local expert and runs them in a
Python loop; stacking their weights for one batched product copied every expert's weights in each forward
and kept the copy for backward (~0.6 GB per MoE layer at BERT-base with 64 local experts). Here the weights
live stacked, so each projection is one product over views of the parameters, nothing copied: a
`torch._grouped_mm` over the kept tokens only (`filled_rows_ffn`, given each block's count by
`RoutedRowsMOELayer`), else one `baddbmm` over the capacity-padded buffers:

    weight [local experts, I*H + H*I]: row j = dense_in.weight (I x H) then dense_out.weight (H x I), flattened
    bias   [local experts, I + H]:     row j = dense_in.bias then dense_out.bias

Why packed per expert rather than one tensor per projection: this is exactly the flat order in which ZeRO laid
out the former per-expert parameters (`dense_in.weight, dense_out.weight` of expert 0, then of expert 1, ...
in the decay group; the biases likewise in the no-decay group), so the ZeRO shards (fp32 masters, Adam moments)
of checkpoints written before the change load unchanged: exact resume keeps working across the change.

At the checkpoint boundary the module speaks DeepSpeed's per-expert names: `state_dict()` yields
`deepspeed_experts.{j}.dense_in.weight` etc. (views into the packed rows) and `load_state_dict` accepts them,
so DeepSpeed's per-expert files `layer_{i}_expert_{g}_mp_rank_00_model_states.pt`, the converter, the
DeepSpeed-free model and elastic resume (module weights re-sharded by global expert id) see what they saw.
Only `named_parameters()` changes (`experts.weight`, `experts.bias`); `tcd_ds.rundir.weights` unpacks the
ZeRO shards' fp32 masters of these names. The parameters carry DeepSpeed's expert tags (`allreduce=False`,
`group_name`), so ZeRO's expert groups and the expert-data-parallel gradient reduction treat them as experts.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcd_ds.models.modeling_moe_bert import batched_expert_ffn, group_alignment


def unpack_experts(weight: Tensor, bias: Tensor, hidden_size: int, intermediate_size: int) -> dict[str, Tensor]:
    """Packed rows (parameters, their gradients, ZeRO's masters) -> DeepSpeed's per-expert names, local ids
    (`deepspeed_experts.{j}.dense_in.weight` [I, H], ...), as views: nothing is copied."""
    split = intermediate_size * hidden_size
    out = {}
    for j in range(weight.shape[0]):
        out[f"deepspeed_experts.{j}.dense_in.weight"] = weight[j, :split].view(intermediate_size, hidden_size)
        out[f"deepspeed_experts.{j}.dense_in.bias"] = bias[j, :intermediate_size]
        out[f"deepspeed_experts.{j}.dense_out.weight"] = weight[j, split:].view(hidden_size, intermediate_size)
        out[f"deepspeed_experts.{j}.dense_out.bias"] = bias[j, intermediate_size:]
    return out


class SplitRows(torch.autograd.Function):
    """`packed[:, :split]` and `packed[:, split:]` as views shaped `[rows, *first]` and `[rows, *second]`, whose
    backward writes one gradient of `packed`'s size (slicing's own backward would zero-fill one per view)."""

    @staticmethod
    def forward(ctx, packed: Tensor, split: int, first: tuple[int, ...], second: tuple[int, ...]):
        rows = packed.shape[0]
        return packed[:, :split].view(rows, *first), packed[:, split:].view(rows, *second)

    @staticmethod
    def backward(ctx, grad_first: Tensor, grad_second: Tensor):
        rows, split = grad_first.shape[0], grad_first[0].numel()
        grad = grad_first.new_empty(rows, split + grad_second[0].numel())  # each part copied in once, whatever
        grad[:, :split].view(grad_first.shape).copy_(grad_first)  # its strides (the products' gradients come
        grad[:, split:].view(grad_second.shape).copy_(grad_second)  # transposed)
        return grad, None, None, None


class BatchedExperts(nn.Module):
    """DeepSpeed's `Experts` interface ([ep_size, local experts, capacity, H] in and out, `num_local_experts`)
    over packed parameters (see the module docstring)."""

    def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int, group_name: str,
                 init_std: float):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        # BERT's Linear init (HF's `_init_weights` reaches Linears only), each expert its own draw
        self.weight = nn.Parameter(torch.randn(num_local_experts, 2 * intermediate_size * hidden_size) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_local_experts, intermediate_size + hidden_size))
        for p in (self.weight, self.bias):
            p.allreduce = False  # DeepSpeed's expert tags, as `Experts.__init__` sets them
            p.group_name = group_name

    def projections(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Views, no copies: w_in [L, I, H], b_in [L, I], w_out [L, H, I], b_out [L, H]."""
        h, i = self.hidden_size, self.intermediate_size
        w_in, w_out = SplitRows.apply(self.weight, i * h, (i, h), (h, i))
        b_in, b_out = SplitRows.apply(self.bias, i, (i,), (h,))
        return w_in, b_in, w_out, b_out

    def forward(self, inputs: Tensor, filled: Tensor | None = None) -> Tensor:
        """inputs [ep_size, L, capacity, H] as `MOELayer` passes them -> the experts' outputs, same shape.

        With `filled` [ep_size, L] (as `RoutedRowsMOELayer` passes it: block (g, j) holds tokens in its first
        `filled[g, j]` rows only), only those rows are computed (`filled_rows_ffn`) and the others are 0; without
        it every capacity slot is, padding included, in one batched product."""
        if filled is not None:
            return filled_rows_ffn(inputs, filled, *self.projections())
        groups, local, capacity, hidden = inputs.shape
        rows = inputs.transpose(0, 1).reshape(local, groups * capacity, hidden)
        out = batched_expert_ffn(rows, *self.projections())
        return out.reshape(local, groups, capacity, hidden).transpose(0, 1)

    def per_expert(self) -> dict[str, Tensor]:
        """The parameters by DeepSpeed's per-expert names (local ids), detached views."""
        return unpack_experts(self.weight.detach(), self.bias.detach(), self.hidden_size, self.intermediate_size)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, value in self.per_expert().items():
            destination[prefix + name] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        targets = self.per_expert()
        with torch.no_grad():
            for name, target in targets.items():
                key = prefix + name
                if key not in state_dict:
                    missing_keys.append(key)
                elif state_dict[key].shape != target.shape:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                      f"{tuple(state_dict[key].shape)}, the shape here is {tuple(target.shape)}")
                else:
                    target.copy_(state_dict[key])
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in targets)


def filled_rows_ffn(inputs: Tensor, filled: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor,
                    b_out: Tensor) -> Tensor:
    """Each block's filled rows through its expert, the other rows 0: inputs [G, L, C, H] and filled [G, L] ->
    [G, L, C, H]. The capacity padding costs no product: the filled rows are gathered expert by expert into a
    buffer (each expert's rows starting at a multiple of the kernels' alignment, as `grouped_expert_ffn` lays out
    the converted model's) and `torch._grouped_mm` computes the groups' rows only. The buffer's size is fixed by
    the shapes (G * L * C rows plus the alignment), so nothing is read back to the host.

    The kernels leave the rows past the last group undefined (NaN, say) in the products and their gradients, so
    those rows meet a zero row in every gather (rows, biases, outputs), whose gradient is dropped: multiplying by
    a mask would let a NaN through."""
    groups, local, capacity, hidden = inputs.shape
    align = group_alignment(inputs.dtype)
    flat, device = groups * local * capacity, inputs.device
    buffer_rows = flat + local * (align - 1)
    slot = torch.arange(capacity, device=device)
    is_filled = slot < filled.unsqueeze(-1)  # [G, L, C]
    padded = (filled.sum(0) + align - 1) // align * align  # each expert's rows over all source blocks, aligned
    ends = padded.cumsum(0)
    earlier = filled.cumsum(0) - filled  # the expert's rows from the blocks of earlier source ranks
    to_group = (ends - padded).unsqueeze(-1) + earlier.unsqueeze(-1) + slot
    destination = torch.where(is_filled, to_group, buffer_rows).flatten()  # an empty row: the zero row
    rows = torch.cat([inputs.reshape(flat, hidden), inputs.new_zeros(1, hidden)])
    source = torch.full((buffer_rows + 1,), flat, device=device).scatter_(  # buffer row -> its row, or the zero
        0, destination, torch.arange(flat, device=device))[:buffer_rows]  # row (alignment, past the groups)
    offs = ends.to(torch.int32)
    position = torch.arange(buffer_rows, device=device, dtype=torch.int32)
    owner = torch.searchsorted(offs, position, right=True)  # L past the groups: the zero bias row
    b_in, b_out = (torch.cat([b, b.new_zeros(1, b.shape[1])]) for b in (b_in, b_out))
    h = torch._grouped_mm(rows.index_select(0, source), w_in.transpose(1, 2), offs=offs)
    h = F.gelu(h.add_(b_in.index_select(0, owner)))
    out = torch._grouped_mm(h, w_out.transpose(1, 2), offs=offs).add_(b_out.index_select(0, owner))
    out = torch.cat([out, out.new_zeros(1, hidden)])
    return out.index_select(0, destination).view(groups, local, capacity, hidden)


def named_tensors(model: nn.Module, grads: bool = False) -> dict[str, Tensor]:
    """`named_parameters()` (or their gradients, None where none), the packed experts under DeepSpeed's
    per-expert names: what comparisons against per-expert references index by."""
    packed = {f"{name}." if name else "": m for name, m in model.named_modules() if isinstance(m, BatchedExperts)}
    out = {}
    for name, p in model.named_parameters():
        if not any(name.startswith(prefix) for prefix in packed):
            out[name] = p.grad if grads else p.detach()
    for prefix, m in packed.items():
        w, b = (m.weight.grad, m.bias.grad) if grads else (m.weight.detach(), m.bias.detach())
        if w is not None:
            out.update({prefix + n: t for n, t in unpack_experts(w, b, m.hidden_size, m.intermediate_size).items()})
    return out


PER_EXPERT_NAME = re.compile(r"\.deepspeed_experts\.\d+\.dense_(in|out)\.(?P<kind>weight|bias)$")


def packed_name(name: str) -> str:
    """A former per-expert parameter's name -> the packed parameter holding it (other names unchanged)."""
    match = PER_EXPERT_NAME.search(name)
    return name if not match else f"{name[:match.start()]}.{match['kind']}"


def accept_per_expert_zero_shards(optimizer) -> None:
    """Let a ZeRO-1/2 optimizer (DeepSpeedZeroOptimizer) resume shards written when each expert had its own
    parameters. Their flat partitions, fp32 masters and Adam moments alike, are laid out as the packed ones
    (module docstring); what differs is the bookkeeping DeepSpeed compares, one alignment padding per
    parameter. Where each rank's shard names the same parameters once per-expert names are read as packed
    ones, in order, and no parameter is padded in either, the shard's paddings are taken as the current ones;
    any other shard loads as it would have (a real mismatch is still refused)."""
    from deepspeed.checkpoint.constants import PARAM_ALIGNMENT_PADDINGS, PARAM_SLICE_MAPPINGS

    if not hasattr(optimizer, "round_robin_bit16_padding"):
        return  # not ZeRO-1/2: nothing compares paddings
    load = optimizer.load_state_dict

    def same_layout(shard: dict, current_names: list[list[str]]) -> bool:
        saved = shard.get(PARAM_ALIGNMENT_PADDINGS)
        if saved is None or saved == optimizer.round_robin_bit16_padding:
            return False
        if any(any(group) for group in saved) or any(any(g) for g in optimizer.round_robin_bit16_padding):
            return False
        names = [list(dict.fromkeys(packed_name(n) for n in group)) for group in shard.get(PARAM_SLICE_MAPPINGS, [])]
        return names == current_names

    def load_state_dict(state_dict_list, *args, **kwargs):
        import deepspeed.comm as dist

        rank = dist.get_rank(group=optimizer.dp_process_group)
        current = [list(group) for group in optimizer._param_slice_mappings]
        if same_layout(state_dict_list[rank], current):
            for shard in state_dict_list:
                if shard is not None:  # DeepSpeed reads only the shards a rank needs
                    shard[PARAM_ALIGNMENT_PADDINGS] = optimizer.round_robin_bit16_padding
        return load(state_dict_list, *args, **kwargs)

    optimizer.load_state_dict = load_state_dict
