"""The benchmark harness runs and writes well-formed output (no timing asserts), and the fast paths it measures
keep the MLM loss and its gradients those of HF's full-head `BertForMaskedLM`."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
from transformers import BertForMaskedLM

from conftest import REPO
from tcd_ds.data.mlm import masked_positions
from tcd_ds.models.build import build_model
from tcd_ds.spec import ModelSpec, MoESpec

from benchmarks.variants import with_weight_copy

V, B, T = 40, 3, 12
SHAPE = dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position=T, dropout=0.0,
             attention_dropout=0.0)


def mlm_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[2, -4:] = 0
    labels = torch.where(torch.rand(B, T, generator=g) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    return ids, mask, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masked_head_loss_and_gradients_equal_hf_full_head():
    torch.manual_seed(0)
    ours = build_model(ModelSpec(**SHAPE), V, pad_token_id=0)
    reference = BertForMaskedLM(ours.config)  # plain HF: head at every token, HF's own loss
    reference.load_state_dict(ours.state_dict())
    ids, mask, labels = mlm_batch(1)
    positions = masked_positions(labels)
    assert positions.tolist() == [i for i, y in enumerate(labels.reshape(-1).tolist()) if y != -100]

    out = ours(input_ids=ids, attention_mask=mask, labels=labels, masked_positions=positions)
    assert out.logits.shape == (len(positions), V)
    loss = out.loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out.logits, labels.reshape(-1)[positions]))
    want = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    loss.backward()
    want.backward()
    got, expected = grads(ours), grads(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # Without positions, the head is HF's: full logits.
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                               reference(input_ids=ids, attention_mask=mask).logits)


def test_masked_head_on_the_moe_student_equals_its_full_head_loss():
    torch.manual_seed(0)
    moe = MoESpec(num_experts=4, layers="every", min_capacity=0, drop_tokens=False)
    model = build_model(ModelSpec(**SHAPE, moe=moe), V, pad_token_id=0)
    ids, mask, labels = mlm_batch(2)
    full = model(input_ids=ids, attention_mask=mask).logits.reshape(-1, V)
    labelled = labels.reshape(-1) != -100
    by_hand = torch.nn.functional.cross_entropy(full[labelled], labels.reshape(-1)[labelled])
    positions = masked_positions(labels)
    picked = model(input_ids=ids, attention_mask=mask, masked_positions=positions).logits
    torch.testing.assert_close(picked, full[positions])
    torch.testing.assert_close(torch.nn.functional.cross_entropy(picked, labels.reshape(-1)[positions]), by_hand)


def test_weight_copy_baseline_copies_the_expert_weights_with_the_same_results():
    """The expert-count bench's before-issue-23 baseline: each experts forward copies the layer's expert weights
    (which the packed forward does not), over the same parameters, with the same outputs and gradients."""
    torch.manual_seed(0)
    moe = MoESpec(num_experts=4, layers="every", min_capacity=0, drop_tokens=False)
    model = build_model(ModelSpec(**SHAPE, moe=moe), V, pad_token_id=0)
    ids, mask, labels = mlm_batch(3)
    params = dict(model.named_parameters())
    clones = []

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: clones.append(t) or t, lambda t: t):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logits.sum().backward()
        return logits.detach(), grads(model)

    storages = {p.untyped_storage().data_ptr() for p in params.values()}
    weight_size = min(b.deepspeed_moe.experts.weight.numel() // 2 for b in model.moe_blocks().values())

    def saved_weight_copies() -> int:  # weight-sized tensors kept for backward that are not the parameters
        copies = [t for t in clones if t.numel() == weight_size and t.untyped_storage().data_ptr() not in storages]
        clones.clear()
        return len(copies)

    packed = run()
    assert saved_weight_copies() == 0
    with_weight_copy(model)
    assert dict(model.named_parameters()) == params  # same names, same objects
    copied = run()
    assert saved_weight_copies() == 2 * len(model.moe_blocks()), "each layer keeps a copy of both projections"
    torch.testing.assert_close(copied[0], packed[0], rtol=1e-6, atol=1e-6)
    for name in packed[1]:
        torch.testing.assert_close(copied[1][name], packed[1][name], rtol=1e-6, atol=1e-6, msg=name)


def forward_flops_by_hand(s: dict, head_tokens: float, layers: int, moe: bool) -> float:
    """Matrix products of one forward, written out: per token and layer q, k, v, o (4 x 2H^2), scores and
    context (2 x 2TH), FFN (2 x 2HI) or a top-1 MoE FFN (the same plus the gate, 2HE); the MLM head, a
    transform (2H^2) and the decoder (2HV), at `head_tokens` tokens."""
    h, i, t, tokens = s["hidden"], s["intermediate"], s["seq_len"], s["micro_batch"] * s["seq_len"]
    total = 0
    for layer in range(layers):
        gate = 2 * h * s["experts"] if moe and layer in s["moe_layers"] else 0
        total += tokens * (4 * 2 * h * h + 2 * 2 * t * h + 2 * 2 * h * i + gate)
    return total + head_tokens * (2 * h * h + 2 * h * s["vocab"])


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", "--out", str(out), "--cache-dir", str(cache_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_quick_bench_json_is_well_formed(quick_bench):
    r, _ = quick_bench
    assert r["world_size"] == 2 and r["preset"] == "quick" and r["clocks"] == ["wall", "cpu"]
    variants = ("hf", "dense_full_head", "dense", "moe", "tcd")
    rounds = r["rounds"]
    for clock in r["clocks"]:
        s = r["seconds"][clock]
        for v in (*variants, "teacher_full", "teacher_cut", "relations"):
            assert len(s[v]) == rounds and all(t > 0 and math.isfinite(t) for t in s[v]), (clock, v)
        for v in variants:
            step = r["steps"][clock][v]
            assert step["seconds"] == pytest.approx(statistics.median(s[v]))
            assert step["tokens_per_s"] == pytest.approx(2 * r["tokens_per_rank_per_step"] / step["seconds"])
        # Ratios are taken within a round, from the raw seconds.
        ratios = r["ratios"][clock]
        assert ratios["tcd_over_moe"]["rounds"] == pytest.approx([s["tcd"][i] / s["moe"][i] for i in range(rounds)])
        assert ratios["dense_over_hf"]["rounds"] == pytest.approx([s["hf"][i] / s["dense"][i] for i in range(rounds)])
        assert ratios["dense_over_hf"]["median"] == pytest.approx(statistics.median(ratios["dense_over_hf"]["rounds"]))
        assert ratios["dense_over_hf"]["best"] == pytest.approx(min(s["hf"]) / min(s["dense"]))
    assert all(0 < share < 1.5 for shares in r["core_share"].values() for share in shares)

    # Model FLOPs, against the formula written out by hand for the tiny shapes.
    shapes, masked, tokens = r["shapes"], r["masked_tokens_per_rank_per_step"], r["tokens_per_rank_per_step"]
    assert tokens == shapes["micro_batch"] * shapes["seq_len"] and 0 < masked < tokens
    flops = r["flops_per_step_per_rank"]
    assert flops["dense"] == pytest.approx(3 * forward_flops_by_hand(shapes, masked, shapes["layers"], moe=False))
    assert flops["hf"] == pytest.approx(3 * forward_flops_by_hand(shapes, tokens, shapes["layers"], moe=False))
    teacher = forward_flops_by_hand(shapes, 0, r["teacher_layers"], moe=False)
    student = forward_flops_by_hand(shapes, masked, shapes["layers"], moe=True)
    assert flops["tcd"] == pytest.approx(3 * student + teacher)
    s, peak = r["seconds"]["cpu"], r["matmul_flops"]["cpu"]["square"]
    assert r["ratios"]["cpu"]["mfu_dense"]["rounds"] == pytest.approx(
        [flops["dense"] / s["dense"][i] / peak[i] for i in range(rounds)])

    # The fast paths kept the loss: ours against HF's full-head forward on the same weights and draws.
    for check in r["mlm_loss_check"].values():
        ours, reference = check.values()
        assert math.isfinite(ours) and ours == pytest.approx(reference, rel=1e-5)

    targets = {t["key"]: t for t in r["targets"]}
    assert set(targets) == {"tcd_over_moe", "dense_over_hf", "relation_share", "mfu_dense", "mfu_moe", "mfu_tcd",
                            "scaling_tcd"}
    for key, t in targets.items():
        assert t["clock"] == ("wall" if key == "scaling_tcd" else "cpu")
        value = r["ratios"][t["clock"]][key]["median"]
        assert t["value"] == value and value > 0
        assert t["met"] is (value <= t["bound"] if t["kind"] == "max" else value >= t["bound"])

    phases = {"teacher forward", "student forward", "relation losses (forward)", "backward (student and relations)",
              "optimizer step", "other", "total"}
    assert set(r["breakdown"]["tcd"]) == phases
    assert set(r["breakdown"]["moe"]) == phases - {"teacher forward", "relation losses (forward)"}
    for clock in r["clocks"]:
        assert set(r["relations_ms"][clock]) == {f"{n}/{scope}" for n in (8, 16) for scope in ("local", "global")}
    for part in ("state", "step"):
        assert len(r["memory_mib"][part]) == 2 and set(r["memory_mib"][part][0]) == {"hf", "dense", "moe", "tcd"}
    assert [rec["world_size"] for rec in r["scaling"]] == [1, 2]
    assert all(r["profiles"][v] for v in ("hf", "dense", "moe", "tcd"))


def test_quick_bench_markdown_states_each_target(quick_bench):
    r, md = quick_bench
    assert md.startswith("Command: `DS_ACCELERATOR=cpu python -m benchmarks.bench --quick")
    for t in r["targets"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {t['target']} |"))
        assert ("**missed**" in row) is (not t["met"])

