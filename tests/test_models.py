"""Teacher and student models in one process: shapes, hook paths, balance losses against hand computations.

An ep_size-1 DeepSpeed MoE runs without torch.distributed; the process-group paths are in test_models_dist.py.
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, BertForMaskedLM
from transformers.models.bert.modeling_bert import BertLayer

from tcd_ds.models import register_auto_classes
from tcd_ds.models.batched_experts import named_tensors
from tcd_ds.models.build import build_model
from tcd_ds.models.deepspeed_moe import DeepSpeedMoEBertForMaskedLM
from tcd_ds.models.modeling_moe_bert import MoEBertConfig, MoEBertForMaskedLM
from tcd_ds.models.param_groups import moe_param_groups
from tcd_ds.spec import ModelSpec, MoESpec

V, H, L, HEADS, I, P, E = 20, 8, 2, 2, 16, 12, 4  # vocab, hidden, layers, heads, intermediate, positions, experts
PAD = 0


def tiny_spec(moe: MoESpec | None = None, num_layers: int = L) -> ModelSpec:
    return ModelSpec(
        hidden_size=H, num_layers=num_layers, num_heads=HEADS, intermediate_size=I, max_position=P,
        dropout=0.0, attention_dropout=0.0, moe=moe,
    )


def tiny_moe(**overrides) -> MoESpec:
    return MoESpec(**{"num_experts": E, "layers": "every", "min_capacity": 0, **overrides})


def batch(seed: int = 0, pad_last: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if pad_last:
        ids[-1, -pad_last:] = PAD
        mask[-1, -pad_last:] = 0
    return ids, mask


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


# By hand, for V=20, H=8, L=2, I=16, P=12, 2 token types:
EMBEDDINGS = 20 * 8 + 12 * 8 + 2 * 8 + 2 * 8  # words, positions, token types, LayerNorm = 288
ATTENTION = 4 * (8 * 8 + 8) + 2 * 8  # q, k, v, output dense; LayerNorm = 304
FFN = (8 * 16 + 16) + (16 * 8 + 8)  # intermediate.dense, output.dense = 280
FFN_NORM = 2 * 8
MLM_HEAD = (8 * 8 + 8) + 2 * 8 + 20  # transform dense, LayerNorm, output bias (decoder weight tied) = 108
MOE_FFN = 4 * 8 + 4 * FFN  # gate (no bias) + 4 experts = 1152


def test_dense_teacher_matches_spec():
    model = build_model(tiny_spec(), vocab_size=V, pad_token_id=PAD)
    assert isinstance(model, BertForMaskedLM)  # HF's class, with the head run at the masked tokens in training
    assert model.state_dict().keys() == BertForMaskedLM(model.config).state_dict().keys()
    assert count(model) == EMBEDDINGS + L * (ATTENTION + FFN + FFN_NORM) + MLM_HEAD == 1596
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    layer = model.bert.encoder.layer[1]
    assert layer.intermediate.dense.weight.shape == (I, H)
    assert layer.output.dense.weight.shape == (H, I)
    assert layer.attention.self.num_attention_heads == HEADS
    assert model.bert.embeddings.position_embeddings.weight.shape == (P, H)
    assert model.config.hidden_act == "gelu" and model.config.pad_token_id == PAD


def test_student_replaces_the_chosen_ffns():
    spec = tiny_spec(tiny_moe(layers="every_other"), num_layers=4)  # MoE in layers 1 and 3
    model = build_model(spec, vocab_size=V, pad_token_id=PAD)
    assert isinstance(model, DeepSpeedMoEBertForMaskedLM) and model.config.moe_layers == [1, 3]
    assert count(model) == EMBEDDINGS + 4 * (ATTENTION + FFN_NORM) + 2 * FFN + 2 * MOE_FFN + MLM_HEAD
    for i, layer in enumerate(model.bert.encoder.layer):
        assert isinstance(layer.output.dense, MoE) == (i in (1, 3))
        assert isinstance(layer.intermediate, nn.Identity) == (i in (1, 3))
    experts = named_tensors(model.bert.encoder.layer[1].output.dense.deepspeed_moe.experts)
    weights = [experts[f"deepspeed_experts.{e}.dense_in.weight"] for e in range(E)]
    assert len(experts) == 4 * E
    assert all(not torch.equal(weights[0], w) for w in weights[1:]), "experts must not start as copies"


def test_student_and_teacher_share_hook_paths_and_their_meaning():
    """Same module paths; at each, `output.dense` is the FFN branch before the residual add + LayerNorm."""
    teacher = build_model(tiny_spec(), V, PAD).eval()
    student = build_model(tiny_spec(tiny_moe(layers=[1])), V, PAD).eval()
    hook_paths = [
        f"bert.encoder.layer.{i}{suffix}"
        for i in range(L)
        for suffix in ("", ".attention.self", ".attention.self.query", ".attention.self.key",
                       ".attention.self.value", ".attention.output.dense", ".output.dense")
    ]
    ids, mask = batch(pad_last=2)
    for model in (teacher, student):
        modules = dict(model.named_modules())
        assert all(isinstance(modules[f"bert.encoder.layer.{i}"], BertLayer) for i in range(L))
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            modules[path].register_forward_hook(lambda m, a, out, path=path: seen.__setitem__(path, out))
            for path in hook_paths
        ] + [
            modules[f"bert.encoder.layer.{i}.attention.output"].register_forward_hook(
                lambda m, a, out, i=i: seen.__setitem__(f"attn_out.{i}", out))
            for i in range(L)
        ]
        with torch.no_grad():
            model(ids, attention_mask=mask)
        for h in hooks:
            h.remove()
        for i in range(L):
            branch = seen[f"bert.encoder.layer.{i}.output.dense"]
            assert branch.shape == (*ids.shape, H)
            norm = modules[f"bert.encoder.layer.{i}.output.LayerNorm"]
            expected = norm(branch + seen[f"attn_out.{i}"])
            torch.testing.assert_close(seen[f"bert.encoder.layer.{i}"], expected)


def gate_inputs(model: DeepSpeedMoEBertForMaskedLM, ids, mask) -> dict[int, torch.Tensor]:
    """Run the model, capturing each MoE layer's input (the tokens the gate routes)."""
    seen = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach()))
        for i, block in model.moe_blocks().items()
    ]
    model(ids, attention_mask=mask, labels=ids)
    for h in hooks:
        h.remove()
    return seen


def routing_probs(model: DeepSpeedMoEBertForMaskedLM, layer: int, x: torch.Tensor) -> torch.Tensor:
    """softmax(x W_g^T) in float64, one row per token."""
    wg = model.moe_blocks()[layer].deepspeed_moe.gate.wg.weight.double()
    return (x.reshape(-1, H).double() @ wg.T).softmax(dim=-1)


def test_kl_uniform_balance_loss_is_kl_of_mean_routing_probs_to_uniform():
    model = build_model(tiny_spec(tiny_moe(balance_loss="kl_uniform")), V, PAD).train()
    ids, mask = batch(pad_last=3)
    real = mask.reshape(-1).bool()
    inputs = gate_inputs(model, ids, mask)
    kls = []
    for i, x in inputs.items():
        p = routing_probs(model, i, x)[real].mean(dim=0)  # padding is not routed
        kls.append(sum(p[e] * torch.log(E * p[e]) for e in range(E)))
    expected = torch.stack(kls).mean()
    assert expected > 0
    aux_loss = model(ids, attention_mask=mask).aux_loss
    torch.testing.assert_close(aux_loss.double(), expected, rtol=1e-5, atol=1e-7)
    aux_loss.backward()
    assert all(b.deepspeed_moe.gate.wg.weight.grad.abs().sum() > 0 for b in model.moe_blocks().values())


def test_switch_balance_loss_and_counts_without_token_dropping():
    model = build_model(tiny_spec(tiny_moe(balance_loss="switch", drop_tokens=False)), V, PAD).train()
    ids, mask = batch(seed=1)
    inputs = gate_inputs(model, ids, mask)
    num_tokens = ids.numel()
    l_aux = []
    for i, x in inputs.items():
        p = routing_probs(model, i, x)
        counts = torch.bincount(p.argmax(dim=-1), minlength=E)
        assert torch.equal(model.moe_blocks()[i].expert_counts, counts)
        assert counts.sum() == num_tokens
        l_aux.append(E * sum(p[:, e].mean() * counts[e] / num_tokens for e in range(E)))
    aux_loss = model(ids, attention_mask=mask).aux_loss
    torch.testing.assert_close(aux_loss.double(), torch.stack(l_aux).mean(), rtol=1e-5, atol=1e-7)


def test_padding_takes_no_expert_and_gets_no_moe_output():
    model = build_model(tiny_spec(tiny_moe(drop_tokens=False)), V, PAD).train()
    ids, mask = batch(pad_last=4)
    outputs = {}
    hooks = [
        b.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
        for i, b in model.moe_blocks().items()
    ]
    out = model(ids, attention_mask=mask, labels=ids)
    for h in hooks:
        h.remove()
    assert torch.isfinite(out.loss)
    for i, block in model.moe_blocks().items():
        assert block.expert_counts.sum() == mask.sum()
        assert torch.all(outputs[i][-1, -4:] == 0)
        assert torch.all(outputs[i][0].abs().sum(-1) > 0)


def test_student_mlm_loss_and_gradients_reach_every_routed_expert():
    model = build_model(tiny_spec(tiny_moe(drop_tokens=False)), V, PAD).train()
    ids, mask = batch(seed=2)
    labels = ids  # every position labelled, so every routed token's expert output reaches the loss
    out = model(ids, attention_mask=mask, labels=labels)
    logits = out.logits.reshape(-1, V)
    mlm = nn.functional.cross_entropy(logits, labels.reshape(-1))
    assert model.config.balance_weight == 0.01 and out.aux_loss > 0
    torch.testing.assert_close(out.loss, mlm + 0.01 * out.aux_loss)  # HF's MoE contract: the weighted aux is in
    out.loss.backward()
    for block in model.moe_blocks().values():
        grads = named_tensors(block.deepspeed_moe.experts, grads=True)
        for e in range(E):
            grad = grads[f"deepspeed_experts.{e}.dense_in.weight"]
            assert torch.isfinite(grad).all()
            assert (grad.abs().sum() > 0) == (block.expert_counts[e] > 0)


def test_config_and_model_round_trip_through_auto_classes(tmp_path):
    moe = tiny_moe(layers=[0], noisy_gate_policy="RSample", balance_loss="kl_uniform", capacity_factor=2,
                   drop_tokens=False)  # with drops, DeepSpeed picks the dropped tokens at random
    spec = tiny_spec(moe)
    model = build_model(spec, V, PAD).eval()
    model.save_pretrained(tmp_path)
    register_auto_classes()
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MoEBertConfig
    fields = ("moe_layers", "num_experts", "ep_size", "capacity_factor", "eval_capacity_factor", "min_capacity",
              "drop_tokens", "noisy_gate_policy", "balance_loss", "balance_weight", "hidden_size", "vocab_size")
    assert {f: getattr(config, f) for f in fields} == {f: getattr(model.config, f) for f in fields}
    assert (config.moe_layers, config.noisy_gate_policy, config.capacity_factor) == ([0], "RSample", 2.0)

    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MoEBertForMaskedLM  # explicit registration: the DeepSpeed-free class, whatever was imported
    training = DeepSpeedMoEBertForMaskedLM.from_pretrained(tmp_path).eval()
    ids, mask = batch(pad_last=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
        torch.testing.assert_close(training(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    experts = [n for n, p in training.named_parameters() if is_moe_param(p)]  # DeepSpeed's tags survive loading
    assert experts == ["bert.encoder.layer.0.output.dense.deepspeed_moe.experts.weight",
                       "bert.encoder.layer.0.output.dense.deepspeed_moe.experts.bias"]


@pytest.mark.parametrize("moe", [None, tiny_moe(layers=[1])], ids=["dense", "moe"])
def test_param_groups_cover_every_parameter_once(moe):
    model = build_model(tiny_spec(moe), V, PAD)
    groups = moe_param_groups(model, weight_decay=0.1)
    assert all(g["name"] for g in groups)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    by_id = {id(p): (n, p) for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name, _ = by_id[id(p)]
            no_decay = name.endswith("bias") or "LayerNorm" in name
            assert g["weight_decay"] == (0.0 if no_decay else 0.1), name
            assert g.get("moe", False) == (".deepspeed_moe.experts." in name), name
    assert any(g.get("moe") for g in groups) == (moe is not None)
