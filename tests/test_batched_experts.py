"""Batched experts against the per-expert loops they replace, DeepSpeed's `Experts` (training) and the converted
model's former loop: outputs and gradients to 1e-6; and the converted model's eval without token drops."""

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from deepspeed.moe.experts import Experts

from tcd_ds.models import modeling_moe_bert as plain_module
from tcd_ds.models.batched_experts import BatchedExperts
from tcd_ds.models.deepspeed_moe import DeepSpeedMoEFeedForward as MoEFeedForward
from tcd_ds.models.modeling_moe_bert import ExpertFFN, MoEBertConfig
from tcd_ds.models.modeling_moe_bert import MoEFeedForward as PlainMoE

H, I = 8, 16


def config(**kw) -> MoEBertConfig:
    return MoEBertConfig(**{"hidden_size": H, "intermediate_size": I, "num_attention_heads": 2, **kw})


@pytest.mark.parametrize("groups,local", [(1, 4), (2, 3)])
def test_batched_experts_match_deepspeed_loop(groups, local):
    torch.manual_seed(0)
    loop = Experts(ExpertFFN(config()), local, "ep_size_1")
    for p in loop.parameters():  # distinct experts (DeepSpeed deep-copies one expert)
        torch.nn.init.normal_(p)
    batched = BatchedExperts(copy.deepcopy(loop))
    x = torch.randn(groups, local, 5, H, dtype=torch.float64)
    loop.double(), batched.double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = loop(xa), batched(xb)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    assert yb.shape == ya.shape
    torch.testing.assert_close(yb, ya, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-6, rtol=1e-6)
    for (name, pa), (_, pb) in zip(loop.named_parameters(), batched.named_parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-6, msg=name)


def test_training_layer_keeps_deepspeed_parameters():
    """Names, tags and count of the expert parameters are DeepSpeed's, so ZeRO groups and checkpoints see them."""
    layer = MoEFeedForward(config(num_experts=4, moe_layers=[0]))
    experts = layer.deepspeed_moe.experts
    assert isinstance(experts, BatchedExperts)
    names = [n for n, _ in layer.named_parameters() if ".experts." in n]
    assert names == [f"deepspeed_moe.experts.deepspeed_experts.{j}.{lin}.{w}"
                     for j in range(4) for lin in ("dense_in", "dense_out") for w in ("weight", "bias")]
    assert all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts.parameters())


def per_expert_loop(moe, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The converted model's former forward: one product per expert over its kept tokens."""
    expert, probs, kept = moe.gate(x, token_mask)
    weight = probs.gather(1, expert[:, None]).squeeze(1)
    out = torch.zeros_like(x)
    for e, ffn in enumerate(moe.experts.deepspeed_experts):
        tokens = torch.nonzero(kept & (expert == e)).squeeze(1)
        out = out.index_add(0, tokens, (weight[tokens, None] * ffn(x[tokens]).float()).to(x.dtype))
    return out


@pytest.mark.parametrize("path", ["grouped_mm", "padded_bmm", "per_expert"])
@pytest.mark.parametrize("experts", [4, 64])
def test_converted_moe_matches_per_expert_loop(path, experts, monkeypatch):
    """Outputs and gradients (inputs, gate, every expert) of the batched converted layer equal the loop's, on
    each of its paths: `torch._grouped_mm`; without it, routing even enough for the padded product, and so
    uneven that it falls back to one product per expert."""
    if path != "grouped_mm":
        monkeypatch.setattr(plain_module, "grouped_mm_supported", lambda device, dtype: False)
    torch.manual_seed(0)
    hidden = experts  # room for a gate row per expert
    dtype = torch.float32 if path == "grouped_mm" else torch.float64  # torch._grouped_mm has no float64
    layer = PlainMoE(config(num_experts=experts, moe_layers=[0], min_capacity=0, hidden_size=hidden)).to(dtype).eval()
    moe = layer.deepspeed_moe
    skew = 3.0 if path == "per_expert" else 0.0
    with torch.no_grad():
        moe.gate.wg.weight[0] += skew
        if path == "padded_bmm":  # a gate that spreads the tokens evenly: expert e's row points at token e % E
            moe.gate.wg.weight.copy_(torch.eye(experts, dtype=torch.float64) * 5)
    x = torch.randn(6 * experts, hidden, dtype=dtype) + skew
    if path == "padded_bmm":
        x = torch.eye(experts, dtype=dtype).repeat(6, 1) + 0.01 * x
    mask = torch.ones(len(x), dtype=torch.long)
    mask[-3:] = 0
    counts = torch.bincount(moe.gate(x, mask)[0][:-3], minlength=experts)
    if path != "grouped_mm":
        assert (experts * counts.max() > 2 * counts.sum()) == (path == "per_expert"), "the premise: which path runs"
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = per_expert_loop(moe, xa, mask), moe(xb, mask)[0]
    g = torch.randn_like(ya)
    grads_a = torch.autograd.grad(ya, [xa, *moe.parameters()], g, allow_unused=True)
    grads_b = torch.autograd.grad(yb, [xb, *moe.parameters()], g, allow_unused=True)
    torch.testing.assert_close(yb, ya, atol=1e-6, rtol=1e-6)
    params = [xa, *moe.parameters()]
    for p, a, b in zip(params, grads_a, grads_b, strict=True):  # None: an expert without tokens, a zero gradient
        zero = torch.zeros_like(p)
        torch.testing.assert_close(zero if b is None else b, zero if a is None else a, atol=1e-6, rtol=1e-6)


def test_converted_eval_does_not_depend_on_batch_mates():
    """By default eval drops no token, even at a capacity that training would overflow: an example's output is
    the same alone as next to others; `eval_drop_tokens=True` brings back capacity and the dependence."""
    torch.manual_seed(0)
    outputs = {}
    for drop in (False, True):
        layer = PlainMoE(config(num_experts=4, moe_layers=[0], eval_capacity_factor=0.5, min_capacity=1,
                                eval_drop_tokens=drop)).eval()
        with torch.no_grad():
            layer.deepspeed_moe.gate.wg.weight[0] += 2.0
            x = torch.randn(4, 6, H) + 1.0
            layer.token_mask = None
            together = layer(x)[0]
            layer.token_mask = None
            alone = layer(x[:1])[0]
        outputs[drop] = (together, alone)
    torch.testing.assert_close(*outputs[False], rtol=0, atol=1e-6)
    assert not torch.allclose(*outputs[True], atol=1e-3), "with capacity the batch-mates take the room"
