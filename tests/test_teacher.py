"""The frozen teacher: found in HF dirs and our run dirs, checked against the student, truncated, never trained."""

import pytest
import torch
import yaml
from deepspeed.accelerator import get_accelerator
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertForMaskedLM, PreTrainedTokenizerFast

from tcd_ds.distill.relations import RelationDistiller
from tcd_ds.distill.taps import TapPlan, Taps, encoder_layers
from tcd_ds.distill.teacher import check_teacher_compatible, load_teacher
from tcd_ds.models.build import build_model
from tcd_ds.models.configs import moe_bert_config
from tcd_ds.rundir import Checkpoint
from tcd_ds.spec import DistillSpec, ModelSpec, MoESpec

DENSE = ModelSpec(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, max_position=16)
DEVICE = get_accelerator().current_device_name()


def tokenizer(words: int = 45) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate([*specials, *(f"w{i}" for i in range(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def student_config(spec: ModelSpec = DENSE, tok=None):
    tok = tok or tokenizer()
    moe = spec.model_copy(update={"moe": MoESpec(num_experts=2, layers="every_other")})
    return moe_bert_config(moe, len(tok), tok.pad_token_id)


def dense_teacher(seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return build_model(DENSE, vocab_size=50, pad_token_id=0)


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "hf"
    dense_teacher(0).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def run_dir(tmp_path):
    """Our run layout: spec.yaml, tokenizer/, checkpoints/<tag>/{mp_rank_00_model_states.pt, manifest.json},
    checkpoints/latest."""
    path = tmp_path / "run"
    (path / "checkpoints").mkdir(parents=True)
    (path / "spec.yaml").write_text(yaml.safe_dump({"run_dir": str(path), "model": DENSE.model_dump(mode="json")}))
    tokenizer().save_pretrained(path / "tokenizer")
    for seed, tag in [(2, "step_2"), (4, "step_4")]:
        (path / "checkpoints" / tag).mkdir()
        states = {"module": dense_teacher(seed).state_dict(), "ds_version": "0.19.8", "global_steps": seed}
        torch.save(states, path / "checkpoints" / tag / "mp_rank_00_model_states.pt")
        Checkpoint(path, tag).write_manifest({})
    (path / "checkpoints" / "latest").write_text("step_4")
    return path


def distill(teacher, **kw) -> DistillSpec:
    return DistillSpec(teacher=str(teacher), **kw)


def assert_same_encoder(teacher, reference: BertForMaskedLM, layers: int):
    got = dict(teacher.module.named_parameters())
    want = {k: v for k, v in reference.bert.named_parameters() if not k.startswith("pooler.")}
    want = {k: v for k, v in want.items() if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < layers}
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name].cpu(), value), name


def test_hf_teacher_is_truncated_frozen_and_computes_the_same_layers(hf_dir):
    teacher = load_teacher(distill(hf_dir), student_config(), tokenizer(), layers_needed=2, device=DEVICE)
    full = BertForMaskedLM.from_pretrained(hf_dir).eval()

    assert len(encoder_layers(teacher)) == 2 and teacher.module.config.num_hidden_layers == 2
    assert teacher.module.pooler is None and not hasattr(teacher.module, "cls")
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert_same_encoder(teacher, full, layers=2)

    input_ids = torch.randint(5, 50, (2, 8))
    attention_mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        out = teacher(input_ids=input_ids.to(DEVICE), attention_mask=attention_mask.to(DEVICE)).last_hidden_state
        want = full(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5)


def test_teacher_dtype_is_applied(hf_dir):
    teacher = load_teacher(distill(hf_dir, teacher_dtype="bf16"), student_config(), tokenizer(), 1, DEVICE)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


def test_teacher_stays_bitwise_unchanged_through_a_distillation_backward(hf_dir):
    spec = distill(hf_dir, num_positions=8)  # trunk and residual_inner over all layers
    config = student_config()
    plan = TapPlan.from_spec(spec, config.num_hidden_layers)
    teacher = load_teacher(spec, config, tokenizer(), plan.layers_needed(), DEVICE)
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    torch.manual_seed(3)
    student = build_model(DENSE.model_copy(update={"moe": MoESpec(num_experts=2)}), 50, 0).to(DEVICE)

    distiller = RelationDistiller(spec, plan, num_heads=config.num_attention_heads)
    input_ids = torch.randint(5, 50, (2, 8), device=DEVICE)
    attention_mask = torch.ones(2, 8, dtype=torch.long, device=DEVICE)
    with Taps(student, plan) as s_taps, Taps(teacher, plan) as t_taps:
        with torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=attention_mask)
        student(input_ids=input_ids, attention_mask=attention_mask)
        losses = distiller(s_taps.captures, t_taps.captures, attention_mask, torch.Generator(DEVICE).manual_seed(0))
        distiller.weighted_sum(losses).backward()

    assert set(losses) == {"trunk", "residual_inner"} and all(v > 0 for v in losses.values())
    assert student.bert.encoder.layer[1].output.dense.deepspeed_moe.gate.wg.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    "where, tag, weights_of",
    [
        ("run", None, "step_4"), ("run", "step_2", "step_2"),
        ("checkpoints", None, "step_4"), ("checkpoints/step_2", None, "step_2"),
    ],
)
def test_run_dir_teacher_loads_the_named_checkpoint(run_dir, where, tag, weights_of):
    path = run_dir if where == "run" else run_dir / where
    teacher = load_teacher(distill(path, teacher_tag=tag), student_config(), tokenizer(), 3, DEVICE)
    assert_same_encoder(teacher, dense_teacher(int(weights_of.removeprefix("step_"))), layers=3)


def test_check_reads_configs_only_but_verifies_a_run_checkpoint(hf_dir, run_dir):
    (hf_dir / "model.safetensors").unlink()
    assert check_teacher_compatible(distill(hf_dir), student_config(), tokenizer(), 3).num_hidden_layers == 3
    # A run's checkpoint is verified against its manifest when located: an incomplete one is refused before
    # launch, not when its weights are read after the process group exists.
    victim = run_dir / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt"
    victim.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"incomplete checkpoint .*{victim}.*truncated"):
        check_teacher_compatible(distill(run_dir), student_config(), tokenizer(), 3)
    assert check_teacher_compatible(distill(run_dir, teacher_tag="step_2"), student_config(), tokenizer(), 3)


def test_a_teacher_of_another_width_is_accepted(hf_dir, run_dir):
    """Relations compare N x N cosine matrices, each in its model's own width; per-head relations need the
    head count to match, nothing else does."""
    wider = student_config(DENSE.model_copy(update={"hidden_size": 64, "intermediate_size": 128}))
    more_heads = student_config(DENSE.model_copy(update={"num_heads": 8}))
    for teacher in (hf_dir, run_dir):
        assert check_teacher_compatible(distill(teacher), wider, tokenizer(), 3).hidden_size == 32
        assert check_teacher_compatible(distill(teacher), more_heads, tokenizer(), 3).num_attention_heads == 4
        with_attention = distill(teacher, attention={"enabled": True})
        assert check_teacher_compatible(with_attention, wider, tokenizer(), 3).hidden_size == 32
        with pytest.raises(ValueError, match="num_attention_heads: teacher has 4, student has 8"):
            check_teacher_compatible(with_attention, more_heads, tokenizer(), 3)


@pytest.mark.parametrize("source", ["hf", "run"])
def test_mismatches_are_rejected_naming_the_field(hf_dir, run_dir, source):
    teacher = distill(hf_dir if source == "hf" else run_dir)
    tok = tokenizer()
    cases = [
        (student_config(tok=tokenizer(55)), tokenizer(55), 1, "vocab_size: teacher has 50, student has 60"),
        (student_config(DENSE.model_copy(update={"num_layers": 4})), tok, 1,
         "num_hidden_layers: teacher has 3, student has 4"),
        (student_config(), tok, 4, "num_hidden_layers: teacher has 3, the distilled layers need 4"),
    ]
    for config, student_tok, layers_needed, message in cases:
        with pytest.raises(ValueError, match=message):
            check_teacher_compatible(teacher, config, student_tok, layers_needed)
        with pytest.raises(ValueError, match=message):
            load_teacher(teacher, config, student_tok, layers_needed, DEVICE)

    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({**tok.get_vocab(), "w3": 999, "zz": 8}, unk_token="[UNK]")),
        pad_token="[PAD]",
    )
    with pytest.raises(ValueError, match=r"tokenizer: vocabularies differ in 3 \(token, id\) entries"):
        check_teacher_compatible(teacher, student_config(), other, 1)


def test_unusable_sources_are_rejected(tmp_path, hf_dir, run_dir):
    with pytest.raises(ValueError, match="teacher_tag"):
        check_teacher_compatible(distill(hf_dir, teacher_tag="step_2"), student_config(), tokenizer(), 1)
    with pytest.raises(ValueError, match="neither an HF directory"):
        check_teacher_compatible(distill(tmp_path), student_config(), tokenizer(), 1)
    with pytest.raises(ValueError, match="teacher_tag: .* unknown tag 'step_9'"):
        check_teacher_compatible(distill(run_dir, teacher_tag="step_9"), student_config(), tokenizer(), 1)
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    spec["model"]["moe"] = {"num_experts": 2}
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="the teacher must be dense"):
        check_teacher_compatible(distill(run_dir), student_config(), tokenizer(), 1)
