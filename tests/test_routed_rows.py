"""The MoE layer's experts on the routed tokens only (`RoutedRowsMOELayer`, `BatchedExperts.forward(inputs,
filled)`) against DeepSpeed's own forward over the capacity-padded buffers: the same outputs and gradients (1e-6),
token drops and padding included, on one process (ep_size 1) and on 2 gloo CPU ranks (ep_size 1 and 2)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import copy

import pytest
import torch
import torch.distributed as dist
from deepspeed.moe.sharded_moe import MOELayer
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.host_syncs import HostSyncs, unexpected
from benchmarks.variants import with_padded_experts
from tcd_ds.models.batched_experts import BatchedExperts, named_tensors
from tcd_ds.models.build import build_model
from tcd_ds.models.deepspeed_moe import DeepSpeedMoEFeedForward, RoutedRowsMOELayer, drop_capacity
from tcd_ds.models.modeling_moe_bert import MoEBertConfig
from tcd_ds.spec import ModelSpec, MoESpec
from test_models_dist import init_rank, spawn

H, I = 8, 16
EXACT = dict(rtol=1e-6, atol=1e-6)


def config(**kw) -> MoEBertConfig:
    return MoEBertConfig(**{"hidden_size": H, "intermediate_size": I, "num_attention_heads": 2, "moe_layers": [0],
                            "min_capacity": 1, **kw})


def filled_blocks(groups: int, local: int, capacity: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatched tokens as DeepSpeed lays them out: block (g, j) filled in its first rows, zero after; the
    counts include an empty block and a full one."""
    filled = torch.randint(0, capacity + 1, (groups, local))
    filled[0, 0], filled[-1, -1] = 0, capacity
    x = torch.randn(groups, local, capacity, H, dtype=dtype)
    return torch.where((torch.arange(capacity) < filled.unsqueeze(-1)).unsqueeze(-1), x, 0), filled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,local", [(1, 4), (2, 3)])
def test_filled_rows_equal_the_padded_product(groups, local, dtype):
    """Filled rows: the padded product's outputs, input and weight gradients (with the gradient DeepSpeed's
    combine sends, zero on empty slots); empty rows: never read (NaN there changes nothing), output 0, gradient
    0; no host read."""
    torch.manual_seed(0)
    experts = BatchedExperts(local, H, I, "ep_size_1", init_std=0.5).to(dtype)
    with torch.no_grad():
        experts.bias.normal_()
    capacity = 7
    x, filled = filled_blocks(groups, local, capacity, dtype)
    is_filled = (torch.arange(capacity) < filled.unsqueeze(-1)).unsqueeze(-1)
    grad = torch.where(is_filled, torch.randn_like(x), 0)
    results = []
    for counts in (None, filled):
        inputs = (x.clone() if counts is None else x.masked_fill(~is_filled, float("nan"))).requires_grad_()
        with HostSyncs() as syncs:
            out = experts(inputs, counts)
            out.backward(grad)
        assert counts is None or not syncs.counts, syncs.counts
        results.append((out, inputs.grad, experts.weight.grad.clone(), experts.bias.grad.clone()))
        experts.zero_grad()
    (padded, *padded_grads), (routed, *routed_grads) = results
    tol = EXACT if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(routed, torch.where(is_filled, padded, 0), **tol)
    row_sizes = routed.abs().sum(-1, keepdim=True)
    assert not row_sizes.masked_select(~is_filled).any() and row_sizes.masked_select(is_filled).min() > 0
    for name, a, b in zip(("input", "weight", "bias"), padded_grads, routed_grads):
        torch.testing.assert_close(b, a, **tol, msg=lambda m, name=name: f"{name}: {m}")


class ProductRows(TorchDispatchMode):
    """Rows the expert products compute: the grouped products' groups, the batched products' whole buffers."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._grouped_mm.default:
            self.rows += int(kwargs.get("offs", args[2] if len(args) > 2 else None)[-1])
        elif func is torch.ops.aten.baddbmm.default:
            self.rows += args[1].shape[0] * args[1].shape[1]
        return func(*args, **kwargs)


def routed_and_padded(layer: DeepSpeedMoEFeedForward, x: torch.Tensor, mask: torch.Tensor | None,
                      seed: int) -> dict:
    """Output and gradients (input, gate, every expert) of the layer's forward and of DeepSpeed's own
    `MOELayer.forward` on the same module, the same random token selection (seeded), the same output gradient."""
    moe = layer.deepspeed_moe
    assert isinstance(moe, RoutedRowsMOELayer)
    filled = []
    hook = moe.experts.register_forward_pre_hook(lambda _, args: filled.append(args[1] if len(args) > 1 else None))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    results = {}
    for name, forward in (("routed", moe.forward), ("padded", lambda *a: MOELayer.forward(moe, *a))):
        torch.manual_seed(seed)
        inputs = x.clone().requires_grad_()
        with ProductRows() as rows:
            out = forward(inputs, mask)
        out.backward(grad)
        results[name] = {"output": out.detach(), "input": inputs.grad, **named_tensors(layer, grads=True)}
        results[name]["counts"] = moe.exp_counts
        results[f"{name} rows"] = rows.rows
        layer.zero_grad()
    hook.remove()
    routed_filled, padded_filled = filled
    assert padded_filled is None and routed_filled is not None, "the routed path ran, and DeepSpeed's did not"
    results["filled"] = routed_filled
    # two products each: the kept rows (each expert's group aligned to 4 rows in fp32) against every slot
    gate, experts = moe.gate, moe.ep_size * moe.num_local_experts
    factor = gate.capacity_factor if moe.training else gate.eval_capacity_factor
    capacity = drop_capacity(x.numel() // x.shape[-1], experts, factor, gate.min_capacity)
    assert results.pop("padded rows") == 2 * experts * capacity
    assert results.pop("routed rows") <= 2 * (int(routed_filled.sum()) + moe.num_local_experts * 3)
    return results


def assert_same(results: dict) -> None:
    routed, padded = results["routed"], results["padded"]
    assert routed.keys() == padded.keys()
    for name in routed:
        torch.testing.assert_close(routed[name], padded[name], **EXACT, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("num_experts", [4, 64])
def test_layer_equals_deepspeeds_padded_forward(num_experts, training):
    """ep_size 1, tokens dropped (a gate skewed towards expert 0, capacity factor 1.0) and padding tokens routed
    nowhere: the experts see only the kept tokens, and the layer's output and gradients are DeepSpeed's."""
    torch.manual_seed(0)
    layer = DeepSpeedMoEFeedForward(config(num_experts=num_experts, capacity_factor=1.0, eval_capacity_factor=1.0))
    layer.train(training)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight[0] += 0.5
        layer.deepspeed_moe.experts.bias.normal_()
    x = torch.randn(3, 40, H) + 0.5
    mask = torch.ones(120, dtype=torch.long)
    mask[-10:] = 0
    results = routed_and_padded(layer, x, mask, seed=1)
    assert_same(results)
    counts = results["routed"]["counts"]
    capacity = drop_capacity(120, num_experts, 1.0, 1)
    assert counts.sum() == 110 and counts.max() > capacity, "the premise: padding routed nowhere, tokens dropped"
    assert results["filled"].tolist() == [counts.clamp(max=capacity).tolist()]


def expert_parallel_worker(rank: int, world_size: int, port: int) -> None:
    init_rank(rank, world_size, port)
    for ep_size in (1, 2):
        torch.manual_seed(0)  # the same gate on both ranks
        layer = DeepSpeedMoEFeedForward(config(num_experts=4, ep_size=ep_size, capacity_factor=1.0))
        torch.manual_seed(1 + rank)  # each rank's experts its own
        for p in layer.deepspeed_moe.experts.parameters():
            p.data.normal_(0.0, 0.5)
        layer.set_deepspeed_parallelism()  # what deepspeed.initialize does: attach the expert-parallel group
        with torch.no_grad():
            layer.deepspeed_moe.gate.wg.weight[rank] += 0.5  # each rank overflows another expert
        x = torch.randn(2, 24, H, generator=torch.Generator().manual_seed(10 + rank)) + 0.5
        results = routed_and_padded(layer.train(), x, None, seed=2 + rank)
        assert_same(results)
        counts = results["routed"]["counts"]
        capacity = drop_capacity(48, 4, 1.0, 1)
        assert counts.max() > capacity, "the premise: tokens dropped"
        # each (source rank, local expert) block's count of kept tokens, on the rank holding the expert
        kept = counts.clamp(max=capacity)
        every = [torch.empty_like(kept) for _ in range(world_size)]
        dist.all_gather(every, kept)
        local = 4 // ep_size
        sources = every if ep_size > 1 else [kept]
        expected = torch.stack([k[rank % ep_size * local:(rank % ep_size + 1) * local] for k in sources])
        assert torch.equal(results["filled"], expected), (results["filled"], expected)
    dist.destroy_process_group()


def test_expert_parallel_layer_equals_deepspeeds_padded_forward():
    """2 gloo CPU ranks, ep_size 1 and 2, tokens dropped: on each rank the same outputs and gradients as
    DeepSpeed's forward, the counts of kept tokens reaching the experts' ranks."""
    spawn(expert_parallel_worker, 2)


def test_layer_forward_and_backward_read_nothing_back_but_deepspeeds_gate():
    """The host reads of a training forward and backward are the gate's own (top1gating's capacity), none of
    ours: the capacity is computed from the shapes."""
    torch.manual_seed(0)
    layer = DeepSpeedMoEFeedForward(config(num_experts=8, capacity_factor=1.0)).train()
    x = torch.randn(2, 16, H, requires_grad=True)
    layer(x)  # warm-up: lazy initialisation is not per forward
    with HostSyncs() as syncs:
        layer(x).sum().backward()
    assert unexpected([syncs.counts]) == [] and syncs.counts, syncs.counts


def test_students_loss_and_gradients_equal_the_padded_benchmark_baseline():
    """A whole student (2 MoE layers, tokens dropped, padding): the routed model and the bench's before-baseline
    (`with_padded_experts`, DeepSpeed's own forward) give the same logits and gradients of every parameter."""
    torch.manual_seed(0)
    moe = MoESpec(num_experts=4, layers="every", capacity_factor=1.0, min_capacity=1)
    spec = ModelSpec(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position=12, dropout=0.0,
                     attention_dropout=0.0, moe=moe)
    routed = build_model(spec, 40, pad_token_id=0)
    padded = with_padded_experts(copy.deepcopy(routed))
    assert all(type(b.deepspeed_moe) is MOELayer for b in padded.moe_blocks().values())
    ids = torch.randint(5, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    results = []
    for model in (routed, padded):
        torch.manual_seed(2)  # the same random token selection
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        drops = [b.routing_window["dropped"] for b in model.moe_blocks().values()]
        results.append((out.logits, named_tensors(model, grads=True), drops))
    (logits_a, grads_a, drops_a), (logits_b, grads_b, drops_b) = results
    assert torch.equal(torch.stack(drops_a), torch.stack(drops_b)) and sum(drops_a) > 0, \
        "the premise: tokens dropped, the same in both"
    torch.testing.assert_close(logits_a, logits_b, **EXACT)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **EXACT, msg=lambda m, name=name: f"{name}: {m}")
