"""The converted model's experts stored stacked, as they are computed: no forward copies their weights; outputs
and gradients equal the per-expert model's (tcd_ds before the change, from git); files keep DeepSpeed's per-expert
layout both ways (`from_pretrained` of directories written before, and with the shipped file alone;
`save_pretrained` after fine-tuning), and `load_state_dict` takes either layout."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from tcd_ds.hf.convert import AUTO_MAP, MODELING_FILE
from tcd_ds.models import modeling_moe_bert as plain_module
from tcd_ds.models import register_auto_classes
from tcd_ds.models.deepspeed_moe import DeepSpeedMoEBertForMaskedLM
from tcd_ds.models.modeling_moe_bert import EXPERT_TENSORS, MoEBertConfig, MoEBertForMaskedLM, MoEFeedForward
from test_batched_experts import large_tensors

REPO = Path(__file__).resolve().parents[1]
BEFORE_STACKED = "78f86de"  # the last commit whose converted model held one nn.Linear per expert
TINY = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            max_position_embeddings=16, moe_layers=[0, 2], num_experts=4, eval_capacity_factor=4.0, pad_token_id=0,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # stored once, as their sources
PER_EXPERT_KEYS = {f"bert.encoder.layer.{i}.output.dense.deepspeed_moe.experts.deepspeed_experts.{e}.{name}"
                   for i in TINY["moe_layers"] for e in range(TINY["num_experts"]) for name in EXPERT_TENSORS}


def per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the stacked expert tensors under DeepSpeed's per-expert names, written out by hand."""
    out = {}
    for key, value in state.items():
        name = next((n for n in EXPERT_TENSORS if key.endswith(f".experts.{n}")), None)
        if name is None:
            out[key] = value
        else:
            prefix = key[: -len(name)]
            out.update({f"{prefix}deepspeed_experts.{e}.{name}": v.clone() for e, v in enumerate(value)})
    return out


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    return ids, mask


@pytest.fixture
def before(tmp_path, monkeypatch):
    """modeling_moe_bert.py as it was before the experts were stacked, imported from git."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_STACKED}:tcd_ds/models/modeling_moe_bert.py"],
                            capture_output=True, check=False)
    if source.returncode != 0:
        pytest.skip(f"no git history to take the code of {BEFORE_STACKED} from")
    path = tmp_path / "modeling_moe_bert_before.py"
    path.write_bytes(source.stdout)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, path.stem, module)
    spec.loader.exec_module(module)
    assert hasattr(module, "stacked_experts"), "the premise: the per-expert model, stacked in each forward"
    return module


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "fallback"])
def test_outputs_and_gradients_equal_the_per_expert_models(grouped, before, monkeypatch):
    """Eval, and training with token drops (the same random choice), through `load_state_dict` of the per-expert
    weights: logits, loss and every gradient to 1e-6, on both compute paths."""
    if not grouped:
        for module in (plain_module, before):
            monkeypatch.setattr(module, "grouped_mm_supported", lambda device, dtype: False)
    config = {**TINY, "capacity_factor": 0.5}
    torch.manual_seed(0)
    old = before.MoEBertForMaskedLM(before.MoEBertConfig(**config))
    new = MoEBertForMaskedLM(MoEBertConfig(**config))
    new.load_state_dict(old.state_dict(), strict=True)
    ids, mask = batch()
    for training in (False, True):
        outputs = []
        for model in (old, new):
            model.train(training).zero_grad()
            torch.manual_seed(1)
            out = model(ids, attention_mask=mask, labels=ids)
            out.loss.backward()
            outputs.append((out, {n: p.grad for n, p in model.named_parameters()}))
        (out_old, grads_old), (out_new, grads_new) = outputs
        torch.testing.assert_close(out_new.logits, out_old.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(out_new.loss, out_old.loss, rtol=0, atol=1e-6)
        grads_new = per_expert(grads_new)
        assert grads_new.keys() == grads_old.keys()
        for name, grad in grads_old.items():
            torch.testing.assert_close(grads_new[name], grad, rtol=0, atol=1e-6, msg=name)


def test_a_directory_written_before_the_experts_were_stacked_loads_to_the_same_outputs(before, tmp_path):
    """Today's `from_pretrained` (registered Auto classes, and the shipped file alone under `trust_remote_code`) and
    the training class load a directory the per-expert model saved, to its logits."""
    torch.manual_seed(0)
    old = before.MoEBertForMaskedLM(before.MoEBertConfig(**TINY)).eval()
    directory = tmp_path / "converted_before"
    old.save_pretrained(directory)
    assert PER_EXPERT_KEYS <= load_file(directory / "model.safetensors").keys()
    ids, mask = batch()
    with torch.no_grad():
        expected = old(ids, attention_mask=mask).logits

    register_auto_classes()
    new, info = AutoModelForMaskedLM.from_pretrained(directory, output_loading_info=True)
    assert type(new) is MoEBertForMaskedLM
    assert not any(info.values()), info  # nothing missing, unexpected, mismatched or failing to convert
    training = DeepSpeedMoEBertForMaskedLM.from_pretrained(directory)
    with torch.no_grad():
        torch.testing.assert_close(new.eval()(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(training.eval()(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-5)

    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}))
    (directory / MODELING_FILE.name).write_bytes(MODELING_FILE.read_bytes())  # as the converter ships it now
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "batch.pt")
    script = ("import sys, torch\n"
              "sys.modules['tcd_ds'] = None  # not importable: the shipped file alone\n"
              "from transformers import AutoModelForMaskedLM\n"
              "model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
              "with torch.no_grad():\n"
              "    logits = model(**torch.load(sys.argv[2], weights_only=True)).logits\n"
              "torch.save({'logits': logits, 'module': type(model).__module__}, sys.argv[3])\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(directory), str(tmp_path / "batch.pt"),
                           str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    assert remote["module"].startswith("transformers_modules.")
    torch.testing.assert_close(remote["logits"], expected, rtol=0, atol=1e-6)


def test_fine_tuned_model_saves_the_per_expert_layout_that_loads_again(tmp_path):
    """A directory built by hand in the per-expert layout loads; after a step of fine-tuning, `save_pretrained`
    writes the tuned weights in that layout again (no stacked name), which loads to the same outputs."""
    torch.manual_seed(0)
    source = MoEBertForMaskedLM(MoEBertConfig(**TINY))
    start = tmp_path / "start"
    source.config.save_pretrained(start)
    by_hand = {k: v for k, v in per_expert(source.state_dict()).items() if k not in TIED}
    save_file(by_hand, start / "model.safetensors", metadata={"format": "pt"})

    register_auto_classes()
    model = AutoModelForSequenceClassification.from_pretrained(start, num_labels=2)
    for name, value in per_expert(model.state_dict()).items():
        if name.startswith("bert.encoder."):
            assert torch.equal(value, by_hand[name]), name
    ids, mask = batch()
    model.train()(ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    model.save_pretrained(tmp_path / "tuned")

    saved = load_file(tmp_path / "tuned" / "model.safetensors")
    assert {k for k in saved if ".experts." in k} == PER_EXPERT_KEYS
    tuned = per_expert(model.state_dict())
    assert saved.keys() == tuned.keys()
    for name, value in saved.items():
        assert torch.equal(value, tuned[name]), name
    assert not torch.equal(saved[min(PER_EXPERT_KEYS)], by_hand[min(PER_EXPERT_KEYS)]), "the step changed the experts"
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "tuned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits,
                                   model.eval()(ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_load_state_dict_takes_either_layout_and_refuses_a_missing_expert():
    torch.manual_seed(0)
    source = MoEBertForMaskedLM(MoEBertConfig(**TINY))
    stacked = source.state_dict()
    assert "bert.encoder.layer.0.output.dense.deepspeed_moe.experts.dense_in.weight" in stacked
    assert not PER_EXPERT_KEYS & stacked.keys()
    for state in (stacked, per_expert(stacked)):
        torch.manual_seed(1)
        target = MoEBertForMaskedLM(MoEBertConfig(**TINY))
        target.load_state_dict(state, strict=True)
        for name, value in target.state_dict().items():
            assert torch.equal(value, stacked[name]), name
    missing = max(PER_EXPERT_KEYS)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*Unexpected key"):
        target.load_state_dict({k: v for k, v in per_expert(stacked).items() if k != missing})


def test_experts_are_initialised_as_berts_linears_when_new_or_missing_from_the_file(tmp_path):
    """`from_config` (the protocol's from-scratch model) and a file without the experts: each expert's weights
    normal(0, initializer_range), distinct, biases zero, as HF initialised the former per-expert Linears."""
    register_auto_classes()
    config = MoEBertConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128})
    torch.manual_seed(0)
    fresh = AutoModelForMaskedLM.from_config(config)
    config.save_pretrained(tmp_path)
    state = {k: v for k, v in fresh.state_dict().items() if ".experts." not in k and k not in TIED}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {k for k in fresh.state_dict() if ".experts." in k}
    for model in (fresh, loaded):
        for block in model.moe_blocks().values():
            experts = block.deepspeed_moe.experts
            for weight in (experts.dense_in.weight, experts.dense_out.weight):
                assert abs(weight.std().item() - config.initializer_range) < 0.002
                assert not torch.equal(weight[0], weight[1])
            assert not experts.dense_in.bias.any() and not experts.dense_out.bias.any()


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "fallback"])
def test_converted_expert_forward_allocates_nothing_the_size_of_the_expert_weights(grouped, monkeypatch):
    """Few tokens, many experts: any tensor the size of one projection's weights is a copy of them. The former
    per-forward stack makes one (the check can fail)."""
    if not grouped:
        monkeypatch.setattr(plain_module, "grouped_mm_supported", lambda device, dtype: False)
    torch.manual_seed(0)
    layer = MoEFeedForward(MoEBertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                         num_experts=16, moe_layers=[0], min_capacity=1))
    experts = layer.deepspeed_moe.experts
    one_projection = experts.dense_in.weight.nbytes
    x = torch.randn(1, 4, 32, requires_grad=True)
    assert large_tensors(lambda: layer(x), one_projection) == []
    assert large_tensors(lambda: torch.stack(list(experts.dense_in.weight.unbind())), one_projection)
