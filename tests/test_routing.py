"""Routing telemetry in one process (an ep_size-1 DeepSpeed MoE needs no torch.distributed): the window's
counters against a hand computation from the gate's probabilities, and a collapsed router that `kl_uniform`
barely sees; the all-reduce over ranks runs in the end-to-end launches (tests/test_pretrain.py)."""

import math
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from test_models import E, PAD, V, batch, gate_inputs, routing_probs, tiny_moe, tiny_spec
from tcd_ds.models.build import build_model
from tcd_ds.train.routing import routing_metrics, take_counters


def naive_window(model, batches, capacity_factor: float) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer, from each forward's gate inputs: top-1 counts of real tokens, tokens over capacity
    (ceil(B*T / E * capacity_factor), padding included, as DeepSpeed sizes it), per-token entropies, mean probs."""
    sums = {}
    for ids, mask in batches:
        real = mask.reshape(-1).bool()
        capacity = math.ceil(ids.numel() / E * capacity_factor)
        for i, x in gate_inputs(model, ids, mask).items():
            p = routing_probs(model, i, x)[real]
            counts = torch.bincount(p.argmax(-1), minlength=E).double()
            s = sums.setdefault(i, {"routed": 0, "dropped": 0, "entropy": [], "probs": []})
            s["routed"] = s["routed"] + counts
            s["dropped"] += (counts - capacity).clamp(min=0).sum()
            s["entropy"].append(-(p * p.log()).sum(-1))
            s["probs"].append(p)
    return {i: {"routed": s["routed"], "dropped": s["dropped"], "entropy": torch.cat(s["entropy"]),
                "probs": torch.cat(s["probs"])} for i, s in sums.items()}


def test_window_counters_match_a_hand_computation_and_reset_when_read():
    model = build_model(tiny_spec(tiny_moe(capacity_factor=0.5)), V, PAD).train()
    batches = [batch(seed=3, pad_last=2), batch(seed=4)]
    expected = naive_window(model, batches, capacity_factor=0.5)  # gate_inputs runs each batch once: the window
    model.eval()
    model(*batches[0])  # validation forwards do not count
    layers, counters = take_counters(model)
    record = routing_metrics(layers, counters)
    assert layers == sorted(expected) == [0, 1]
    for row, i in enumerate(layers):
        e = expected[i]
        tokens = e["routed"].sum()
        assert counters[row, :E].sum() == tokens == sum(int(m.sum()) for _, m in batches)
        assert e["dropped"] > 0  # capacity 0.5 of the mean load drops tokens
        assert record[f"moe/load/layer_{i}"] == pytest.approx((e["routed"] / tokens).tolist(), abs=1e-12)
        assert record[f"moe/dropped/layer_{i}"] == pytest.approx((e["dropped"] / tokens).item(), abs=1e-12)
        assert record[f"moe/idle_experts/layer_{i}"] == int((e["routed"] == 0).sum())
        assert record[f"moe/max_load/layer_{i}"] == pytest.approx((e["routed"].max() / tokens).item(), abs=1e-12)
        assert record[f"moe/entropy/layer_{i}"] == pytest.approx(e["entropy"].mean().item() / math.log(E), rel=1e-5)
        mean = e["probs"].mean(0)
        assert record[f"moe/mean_entropy/layer_{i}"] == pytest.approx(
            -(mean * mean.log()).sum().item() / math.log(E), rel=1e-5)
    _, again = take_counters(model)
    assert torch.equal(again, torch.zeros_like(again))  # read: the next window starts empty


def test_no_drops_without_token_dropping():
    model = build_model(tiny_spec(tiny_moe(capacity_factor=0.5, drop_tokens=False)), V, PAD).train()
    model(*batch(seed=3))
    record = routing_metrics(*take_counters(model))
    assert record["moe/dropped/layer_0"] == record["moe/dropped/layer_1"] == 0


def collapse_onto_expert_0(model, margin: float) -> None:
    """A nearly flat router that always picks expert 0: with the attention LayerNorm's bias at c, every gate
    input has mean c over its features (the normalized part has mean 0), so a gate row of margin / (c H) gives
    expert 0 the logit `margin` and the others 0, for every token."""
    c = 3.0
    for i, block in model.moe_blocks().items():
        layer = model.bert.encoder.layer[i]
        with torch.no_grad():
            layer.attention.output.LayerNorm.weight.fill_(1.0)
            layer.attention.output.LayerNorm.bias.fill_(c)
            wg = block.deepspeed_moe.gate.wg.weight
            wg.zero_()
            wg[0] = margin / (c * wg.shape[1])


@pytest.mark.parametrize("kind", ["kl_uniform", "switch"])
def test_a_collapsed_router_shows_in_idle_experts_and_drops_while_kl_uniform_stays_near_zero(kind):
    model = build_model(tiny_spec(tiny_moe(balance_loss=kind, capacity_factor=1.25)), V, PAD).train()
    collapse_onto_expert_0(model, margin=0.05)
    probs_calls = {i: 0 for i in model.moe_blocks()}
    for i, block in model.moe_blocks().items():
        def counted(x, i=i, compute=block._router_probs):
            probs_calls[i] += 1
            return compute(x)
        block._router_probs = counted
    ids, mask = batch(seed=5)
    out = model(ids, attention_mask=mask, labels=ids)
    assert set(probs_calls.values()) == {1}  # the balance loss and the telemetry share one computation
    record = routing_metrics(*take_counters(model))
    capacity = math.ceil(ids.numel() / E * 1.25)
    for i in model.moe_blocks():
        assert record[f"moe/load/layer_{i}"] == [1.0, 0.0, 0.0, 0.0]  # every token's top-1 choice: expert 0
        assert record[f"moe/idle_experts/layer_{i}"] == E - 1 and record[f"moe/max_load/layer_{i}"] == 1.0
        assert record[f"moe/dropped/layer_{i}"] == pytest.approx(1 - capacity / ids.numel())
        # ... yet the router is nearly flat, per token and on average: what kl_uniform measures
        assert record[f"moe/entropy/layer_{i}"] > 0.999 and record[f"moe/mean_entropy/layer_{i}"] > 0.999
    if kind == "kl_uniform":
        assert 0 < out.aux_loss < 1e-3  # KL(mean probs || uniform): the collapse costs almost nothing
    else:
        assert out.aux_loss > 1.03  # switch: E * sum_e (mean prob_e)(load_e), 1 at balance


def test_the_drop_capacity_is_deepspeeds_without_a_host_read():
    """The routing telemetry's capacity from the shapes equals DeepSpeed's `_capacity` (a device tensor) for token
    counts and factors where float32 rounding decides, the minimum included."""
    import itertools

    from deepspeed.moe.sharded_moe import _capacity

    from tcd_ds.models.deepspeed_moe import drop_capacity

    for tokens, experts, factor, minimum in itertools.product((1, 7, 100, 1000, 4096), (1, 3, 8, 64),
                                                              (0.1, 1.0, 1.1, 1.25, 2.0), (0, 4, 200)):
        expected = int(_capacity(torch.zeros(tokens, experts), torch.tensor(factor), torch.tensor(minimum)))
        assert drop_capacity(tokens, experts, factor, minimum) == expected, (tokens, experts, factor, minimum)
