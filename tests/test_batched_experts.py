"""Batched experts against the per-expert loops they replace, DeepSpeed's `Experts` (training) and the converted
model's former loop: outputs and gradients to 1e-6; and the converted model's eval without token drops."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from deepspeed.moe.experts import Experts

from tcd_ds.models import modeling_moe_bert as plain_module
from tcd_ds.models.batched_experts import BatchedExperts, named_tensors
from tcd_ds.models.deepspeed_moe import DeepSpeedMoEFeedForward as MoEFeedForward
from tcd_ds.models.modeling_moe_bert import ExpertFFN, MoEBertConfig
from tcd_ds.models.modeling_moe_bert import MoEFeedForward as PlainMoE

H, I = 8, 16


def config(**kw) -> MoEBertConfig:
    return MoEBertConfig(**{"hidden_size": H, "intermediate_size": I, "num_attention_heads": 2, **kw})


def packed_like(loop: Experts) -> BatchedExperts:
    """Packed experts holding the loop's weights, loaded through the per-expert state-dict names."""
    batched = BatchedExperts(loop.num_local_experts, H, I, "ep_size_1", init_std=0.02)
    batched.load_state_dict(loop.state_dict(), strict=True)
    return batched


@pytest.mark.parametrize("groups,local", [(1, 4), (2, 3)])
def test_batched_experts_match_deepspeed_loop(groups, local):
    """Outputs, input gradients and every expert's weight gradients of the packed experts equal DeepSpeed's
    per-expert loop (today's parameters and names) to 1e-6."""
    torch.manual_seed(0)
    loop = Experts(ExpertFFN(config()), local, "ep_size_1")
    for p in loop.parameters():  # distinct experts (DeepSpeed deep-copies one expert)
        torch.nn.init.normal_(p)
    batched = packed_like(loop)
    x = torch.randn(groups, local, 5, H, dtype=torch.float64)
    loop.double(), batched.double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = loop(xa), batched(xb)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    assert yb.shape == ya.shape
    torch.testing.assert_close(yb, ya, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-6, rtol=1e-6)
    packed_grads = named_tensors(batched, grads=True)
    for name, pa in loop.named_parameters():
        torch.testing.assert_close(packed_grads[name], pa.grad, atol=1e-6, rtol=1e-6, msg=name)
    # the packed layout is ZeRO's flat order of the former per-expert parameters (decay group, no-decay group)
    weights = [p for n, p in loop.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in loop.named_parameters() if n.endswith("bias")]
    assert torch.equal(batched.weight.detach().flatten(), torch.cat([w.detach().flatten() for w in weights]))
    assert torch.equal(batched.bias.detach().flatten(), torch.cat([b.detach().flatten() for b in biases]))


def test_training_layer_speaks_deepspeeds_per_expert_names():
    """One packed weight and bias per layer with DeepSpeed's expert tags; its state dict (what DeepSpeed's
    per-expert checkpoint files and the converter read) has today's per-expert names and shapes."""
    layer = MoEFeedForward(config(num_experts=4, moe_layers=[0]))
    experts = layer.deepspeed_moe.experts
    assert isinstance(experts, BatchedExperts)
    assert [n for n, _ in layer.named_parameters() if ".experts." in n] == [
        "deepspeed_moe.experts.weight", "deepspeed_moe.experts.bias"]
    assert all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts.parameters())
    shapes = {"dense_in.weight": (I, H), "dense_in.bias": (I,), "dense_out.weight": (H, I), "dense_out.bias": (H,)}
    state = {k: tuple(v.shape) for k, v in layer.state_dict().items() if ".experts." in k}
    assert state == {f"deepspeed_moe.experts.deepspeed_experts.{j}.{n}": s for j in range(4) for n, s in shapes.items()}
    with pytest.raises(RuntimeError, match="Missing key"):
        experts.load_state_dict({k: v for k, v in experts.state_dict().items() if ".3." not in k})


def large_tensors(run, min_bytes: int) -> list[str]:
    """The aten ops `run` calls that return a new tensor (not a view) of at least `min_bytes`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            is_view = any(getattr(r.alias_info, "is_write", None) is False for r in func._schema.returns
                          if r.alias_info is not None)
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not is_view and t.untyped_storage().nbytes() >= min_bytes:
                    seen.append(f"{func} -> {tuple(t.shape)}")
            return out

    with Watch():
        run()
    return seen


def test_expert_forward_allocates_nothing_the_size_of_the_expert_weights():
    """Few tokens, many experts: the activations are far smaller than the weights, so any tensor the size of one
    projection's weights is a copy of them. Today's stacked forward makes one (the check can fail)."""
    torch.manual_seed(0)
    local, tokens = 16, 4
    layer = MoEFeedForward(config(num_experts=local, moe_layers=[0], min_capacity=1, hidden_size=32,
                                  intermediate_size=64, num_attention_heads=2))
    experts = layer.deepspeed_moe.experts
    one_projection = experts.weight.nbytes // 2
    x = torch.randn(1, tokens, 32, requires_grad=True)
    assert large_tensors(lambda: layer(x), one_projection) == []
    loop = Experts(ExpertFFN(config(hidden_size=32, intermediate_size=64)), local, "ep_size_1")
    assert large_tensors(lambda: torch.stack([e.dense_in.weight for e in loop.deepspeed_experts]), one_projection)


def test_routing_under_bf16_autocast_is_fp32():
    """Gate logits computed in fp32 with autocast on (its `.float()` alone does not escape autocast): the same
    expert choices and probabilities as without autocast, in the training layer and the converted model."""
    torch.manual_seed(0)
    cfg = config(num_experts=64, moe_layers=[0], hidden_size=64, min_capacity=0, drop_tokens=False)
    training, converted = MoEFeedForward(cfg).eval(), PlainMoE(cfg).eval()
    converted.deepspeed_moe.gate.wg.weight.data.copy_(training.deepspeed_moe.gate.wg.weight.data)
    x = torch.randn(512, 64)
    fp32 = (training.deepspeed_moe.gate(x)[1:3], converted.deepspeed_moe.gate(x, None))  # DeepSpeed's combine
    with torch.autocast("cpu", torch.bfloat16):  # weights and dispatch mask: each token's expert, slot and weight
        bf16 = (training.deepspeed_moe.gate(x)[1:3], converted.deepspeed_moe.gate(x, None))
        naive = torch.nn.functional.linear(x.float(), training.deepspeed_moe.gate.wg.weight.float())
    assert naive.dtype == torch.bfloat16 and not torch.equal(naive.argmax(-1), fp32[1][0]), \
        "the premise: autocast's bf16 logits pick other experts"
    assert bf16[0][0].dtype == torch.float32 and torch.equal(bf16[0][0], fp32[0][0]), "training layer: weights"
    assert torch.equal(bf16[0][1], fp32[0][1]), "training layer: the dispatch (expert, slot) changed under autocast"
    expert, probs, _ = bf16[1]
    assert probs.dtype == torch.float32 and torch.equal(expert, fp32[1][0]) and torch.equal(probs, fp32[1][1])
    with torch.autocast("cpu", torch.bfloat16):
        torch.testing.assert_close(training._router_probs(x), fp32[1][1], rtol=0, atol=1e-6)


HOST_READS = [(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "nonzero", "numpy", "__int__",
                                                  "__float__", "__index__")] + [(torch, "nonzero")]


def count_host_reads(run, monkeypatch) -> int:
    """Calls that read a device tensor back to the host (a stall on GPU), counted by patching them."""
    calls = []
    for owner, name in HOST_READS:
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    run()
    monkeypatch.undo()
    return len(calls)


@pytest.mark.parametrize("training", [False, True])
def test_converted_moe_forward_reads_nothing_back_to_the_host(training, monkeypatch):
    """Zero host reads per layer forward (the routing, the grouping and the grouped products), with token drops
    in training; the patch does count (the fallback without `_grouped_mm` reads)."""
    torch.manual_seed(0)
    layer = PlainMoE(config(num_experts=8, moe_layers=[0], capacity_factor=0.5, min_capacity=1)).train(training)
    x = torch.randn(2, 12, H)
    layer.token_mask = torch.ones(24, dtype=torch.long)
    layer(x)  # warm-up: lazy initialisation is not per forward
    assert count_host_reads(lambda: layer(x).sum().backward(), monkeypatch) == 0
    monkeypatch.setattr(plain_module, "grouped_mm_supported", lambda device, dtype: False)
    fallback = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t, _o=torch.Tensor.tolist: fallback.append(1) or _o(t))
    layer(x)
    assert fallback, "the counting works: the fallback path reads the group sizes"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_groups_equal_the_unpadded_products(dtype):
    """Groups padded to the kernels' alignment (uneven sizes, an empty expert, dropped tokens) give each row
    its own expert's FFN, as the capacity-padded fallback does; in bf16 too (the GPU's dtype)."""
    torch.manual_seed(0)
    experts, rows = 5, 23
    w = (torch.randn(experts, I, H), torch.randn(experts, I), torch.randn(experts, H, I), torch.randn(experts, H))
    group = torch.tensor([0] * 3 + [1] * 9 + [3] * 1 + [4] * 6 + [experts] * 4)  # expert 2 empty, 4 dropped
    counts = torch.bincount(group, minlength=experts + 1)[:experts]
    x = torch.randn(rows, H)
    out = plain_module.grouped_expert_ffn(x.to(dtype), group, counts, *(t.to(dtype) for t in w))
    padded = plain_module.aligned_rows(group, counts, plain_module.group_alignment(dtype))
    assert (padded[1] % plain_module.group_alignment(dtype) == 0).all()
    expected = torch.stack([plain_module.batched_expert_ffn(x[s:s + 1].unsqueeze(0), *(t[e:e + 1] for t in w))[0, 0]
                            for s, e in enumerate(group.tolist()) if e < experts])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-1)
    torch.testing.assert_close(out[: rows - 4].float(), expected, **tol)


def per_expert_loop(moe, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The converted model's former forward: one product per expert over its kept tokens."""
    expert, probs, kept = moe.gate(x, token_mask)
    weight = probs.gather(1, expert[:, None]).squeeze(1)
    out = torch.zeros_like(x)
    for e in range(moe.experts.num_experts):
        tokens = torch.nonzero(kept & (expert == e)).squeeze(1)
        ffn = plain_module.expert_ffn(x[tokens], *(w[e] for w in moe.experts.stacked()))
        out = out.index_add(0, tokens, (weight[tokens, None] * ffn.float()).to(x.dtype))
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
