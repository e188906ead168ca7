"""An MoE layer's local experts in one batched product per projection, in place of DeepSpeed's per-expert loop.

DeepSpeed's `Experts` (deepspeed/moe/experts.py) runs each local expert on its slice of the dispatched
`[ep_size, local experts, capacity, H]` buffer in a Python loop: two small products per expert forward and
four backward, which on an accelerator are bound by kernel launches. Here the local experts' weights are
stacked and each projection is one `baddbmm` over `[local experts, ep_size * capacity, H]`.

The parameters stay as DeepSpeed registers them, one `ExpertFFN` per local expert (`deepspeed_experts.{j}`
with `dense_in` / `dense_out` Linears, tagged `allreduce=False` and the expert group name), so ZeRO's expert
groups, DeepSpeed's per-expert checkpoint files, conversion and (elastic) resume see exactly what they saw;
the stack is built in each forward. (Storing stacked parameters instead saves that copy but needs state-dict
name mapping for DeepSpeed's checkpoints and HF loading and changes the ZeRO groups; on CPU it measured no
faster end to end, see BENCHMARKS.md.) DeepSpeed 0.19's `GroupedExperts` (ep_experts.py, AutoEP) does not
fit: it is SwiGLU without biases over token-sorted (not capacity-padded) rows, with differently named weights.
The batched product itself is the converted model's (`batched_expert_ffn`), one home for both.
"""

from __future__ import annotations

from deepspeed.moe.experts import Experts
from torch import Tensor, nn

from tcd_ds.models.modeling_moe_bert import batched_expert_ffn, stacked_experts


class BatchedExperts(Experts):
    """DeepSpeed's `Experts` with a batched forward, over the expert modules of an `Experts` DeepSpeed built
    (the same parameter objects: nothing is copied or re-created, names and tags stay)."""

    def __init__(self, loop: Experts):
        nn.Module.__init__(self)
        self.deepspeed_experts = loop.deepspeed_experts
        self.num_local_experts = loop.num_local_experts

    def forward(self, inputs: Tensor) -> Tensor:
        """inputs [ep_size, L, capacity, H] as `MOELayer` passes them -> the experts' outputs, same shape."""
        groups, local, capacity, hidden = inputs.shape
        rows = inputs.transpose(0, 1).reshape(local, groups * capacity, hidden)
        out = batched_expert_ffn(rows, *stacked_experts(self.deepspeed_experts))
        return out.reshape(local, groups, capacity, hidden).transpose(0, 1)
