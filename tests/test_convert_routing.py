"""The DeepSpeed-free MoE layer of converted students: its routing against DeepSpeed's own MoE layer and against
a token-by-token loop written out by hand."""

import math
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from tcd_ds.models.deepspeed_moe import DeepSpeedMoEFeedForward
from tcd_ds.models.modeling_moe_bert import MoEBertConfig, MoEFeedForward, expert_ffn, kl_uniform_balance_loss
from test_converted_experts import per_expert

H, I, E = 8, 16, 4


def config(**moe) -> MoEBertConfig:
    return MoEBertConfig(hidden_size=H, intermediate_size=I, num_attention_heads=2, num_experts=E, **moe)


def skewed_inputs(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Hidden states sharing a common direction, so that a gate aligned with it sends most tokens to one expert."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, H, generator=g) + 2.0


def pair(cfg: MoEBertConfig, seed: int = 0) -> tuple[MoEFeedForward, DeepSpeedMoEFeedForward]:
    """The plain layer and DeepSpeed's (ep_size 1), with the same weights; expert 0's gate row favours the
    inputs' common direction."""
    torch.manual_seed(seed)
    plain = MoEFeedForward(cfg)
    with torch.no_grad():
        plain.deepspeed_moe.gate.wg.weight[0] += 1.0
    deepspeed = DeepSpeedMoEFeedForward(cfg)
    deepspeed.load_state_dict(per_expert(plain.state_dict()), strict=True)  # the files' per-expert names
    return plain, deepspeed


def run(layer, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    layer.token_mask = token_mask.reshape(-1).long()
    with torch.no_grad():
        return layer(x).reshape(-1, H)


def routing_by_hand(layer: MoEFeedForward, x: torch.Tensor, token_mask: torch.Tensor) -> tuple[list[int], list[float]]:
    """Each token's top-1 expert and probability, in float64, one token at a time (-1 for padding)."""
    wg = layer.deepspeed_moe.gate.wg.weight.detach().double()
    experts, probs = [], []
    for token, real in zip(x.reshape(-1, H).double(), token_mask.reshape(-1).tolist()):
        p = torch.softmax(wg @ token, dim=0)
        experts.append(int(p.argmax()) if real else -1)
        probs.append(p.max().item())
    return experts, probs


def test_eval_output_equals_deepspeed_when_no_expert_overflows():
    cfg = config(eval_capacity_factor=E, min_capacity=0)  # capacity = all tokens: nothing can be dropped
    plain, deepspeed = pair(cfg)
    plain.eval(), deepspeed.eval()
    x = skewed_inputs(3, 7)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[-1, -2:] = 0
    out = run(plain, x, mask)
    torch.testing.assert_close(out, run(deepspeed, x, mask), rtol=0, atol=1e-6)
    assert torch.all(out[-2:] == 0) and torch.all(out[:-2].abs().sum(-1) > 0)


@pytest.mark.parametrize("kind", ["switch", "kl_uniform"])
def test_balance_loss_equals_the_training_layers(kind):
    """What fine-tuning adds to the task loss is what pre-training did: DeepSpeed's `l_aux` for `switch`, the
    training layer's KL to uniform for `kl_uniform`; padding excluded from the routing in both."""
    plain, deepspeed = pair(config(balance_loss=kind, eval_capacity_factor=1.0))
    plain.eval(), deepspeed.eval()
    x = skewed_inputs(3, 7) * torch.linspace(0.2, 1.0, H)  # uneven, but not every token to expert 0
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[-1, -3:] = 0
    run(plain, x, mask), run(deepspeed, x, mask)
    assert plain.balance_loss.item() == pytest.approx(deepspeed.balance_loss.item(), rel=1e-6)
    assert plain.balance_loss.item() > (1.0 if kind == "switch" else 0.0) + 1e-3  # not balanced: could be off


def test_kl_uniform_balance_loss_by_hand():
    # mean routing probabilities over the real tokens: (0.5, 0.25, 0.25); KL to uniform = sum p log(3 p)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]])
    expected = 0.5 * math.log(1.5) + 2 * 0.25 * math.log(0.75)
    assert kl_uniform_balance_loss(probs, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_capacity_and_drop_counts_equal_deepspeed(training):
    """25 tokens, 4 experts, factor 2.4: 25 / 4 * float32(2.4) = 15.000001, so DeepSpeed's capacity is 16 where
    exact arithmetic gives 15. Which overflowing tokens DeepSpeed keeps is random; how many is not."""
    factor = {"capacity_factor": 2.4, "eval_capacity_factor": 99.0} if training else {"eval_capacity_factor": 2.4}
    cfg = config(**factor, min_capacity=0, eval_drop_tokens=True)  # DeepSpeed's eval always drops
    plain, deepspeed = pair(cfg)
    plain.train(training), deepspeed.train(training)
    assert math.ceil(25 / 4 * 2.4) == 15 and plain.deepspeed_moe.gate.capacity(25) == 16
    x, mask = skewed_inputs(5, 5), torch.ones(5, 5, dtype=torch.long)
    experts, _ = routing_by_hand(plain, x, mask)
    counts = torch.bincount(torch.tensor(experts), minlength=E)
    assert counts.max() > 16, "the premise: at least one expert overflows"
    for layer in (plain, deepspeed):
        out = run(layer, x, mask)
        kept = out.abs().sum(-1) > 0
        kept_per_expert = torch.bincount(torch.tensor(experts)[kept], minlength=E)
        assert torch.equal(kept_per_expert, counts.clamp(max=16)), type(layer)


@pytest.mark.parametrize("noise", [None, "Jitter", "RSample"])
def test_eval_keeps_the_first_tokens_of_each_expert_in_batch_order(noise):
    """The documented deterministic eval with `eval_drop_tokens`: a loop over tokens in row-major order, each
    taken by its expert while that expert has room; padding takes no room; the gate noise of training is off."""
    cfg = config(eval_capacity_factor=0.5, min_capacity=2, noisy_gate_policy=noise, eval_drop_tokens=True)
    plain, _ = pair(cfg)
    plain.eval()
    x = skewed_inputs(4, 6, seed=1)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 1] = mask[2, 4:] = 0  # padding early in the batch, where it would otherwise use up capacity
    capacity = max(math.ceil(24 / E * 0.5), 2)  # 3
    experts, probs = routing_by_hand(plain, x, mask)
    expected = torch.zeros(24, H)
    taken = [0] * E
    weights = plain.deepspeed_moe.experts.stacked()
    with torch.no_grad():
        for s, (e, p) in enumerate(zip(experts, probs)):
            if e >= 0 and taken[e] < capacity:
                expected[s] = p * expert_ffn(x.reshape(-1, H)[s], *(w[e] for w in weights))
                taken[e] += 1
    assert sum(taken) < int(mask.sum()), "the premise: some tokens are dropped"
    torch.testing.assert_close(run(plain, x, mask), expected, rtol=0, atol=1e-6)
