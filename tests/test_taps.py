"""Taps capture exactly each location's tensors, recomputed here by calling BERT's submodules by hand."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from tcd_ds.distill.taps import TapPlan, Taps
from tcd_ds.spec import AttentionRelationSpec, DistillSpec, RelationSpec

HIDDEN, LAYERS, HEADS = 32, 3, 4


def tiny_bert(seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    return BertForMaskedLM(config).eval()


def batch():
    torch.manual_seed(7)
    input_ids = torch.randint(5, 50, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return input_ids, attention_mask


def by_hand(model: BertForMaskedLM, input_ids, attention_mask) -> list[dict[str, torch.Tensor]]:
    """Every tappable tensor of each layer, from the submodules called in BERT's order."""
    additive = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    h = model.bert.embeddings(input_ids=input_ids)
    out = []
    for layer in model.bert.encoder.layer:
        attn = layer.attention
        context = attn.self(h, attention_mask=additive)[0]
        projection = attn.output.dense(context)
        attention_output = attn.output.LayerNorm(projection + h)
        ffn = layer.output.dense(layer.intermediate(attention_output))
        new_h = layer.output.LayerNorm(ffn + attention_output)
        out.append(dict(
            trunk=new_h, projection=projection, ffn=ffn, context=context,
            query=attn.self.query(h), key=attn.self.key(h), value=attn.self.value(h),
        ))
        h = new_h
    return out


def plan(trunk=(), residual_inner=(), attention=(), vectors="context") -> TapPlan:
    return TapPlan(tuple(trunk), tuple(residual_inner), tuple(attention), vectors)


@pytest.mark.parametrize("vectors", ["context", "query", "key", "value"])
def test_captures_equal_submodule_outputs(vectors):
    model = tiny_bert(0)
    input_ids, attention_mask = batch()
    with Taps(model, plan(trunk=[0, 2], residual_inner=[1, 2], attention=[0, 1], vectors=vectors)) as taps:
        model(input_ids=input_ids, attention_mask=attention_mask)
        captures = {k: list(v) for k, v in taps.captures.items()}
    expected = by_hand(model, input_ids, attention_mask)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states

    assert list(captures) == ["trunk", "residual_inner", "attention"]
    for got, i in zip(captures["trunk"], [0, 2], strict=True):
        torch.testing.assert_close(got, expected[i]["trunk"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, hidden[i + 1], rtol=0, atol=0)
    want = [expected[1]["projection"], expected[1]["ffn"], expected[2]["projection"], expected[2]["ffn"]]
    for got, ref in zip(captures["residual_inner"], want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for got, i in zip(captures["attention"], [0, 1], strict=True):
        assert got.shape == (2, 6, HIDDEN)
        torch.testing.assert_close(got, expected[i][vectors], rtol=1e-5, atol=1e-5)


def test_disabled_locations_hook_nothing_and_remove_unhooks():
    model = tiny_bert(0)
    hooked = lambda: {name for name, m in model.named_modules() if m._forward_hooks}  # noqa: E731
    taps = Taps(model, plan(trunk=[1]))
    assert hooked() == {"bert.encoder.layer.1"}
    input_ids, attention_mask = batch()
    model(input_ids=input_ids, attention_mask=attention_mask)
    assert list(taps.captures) == ["trunk"] and len(taps.captures["trunk"]) == 1
    taps.clear()
    assert taps.captures["trunk"] == [None]
    taps.remove()
    assert hooked() == set()

    taps = Taps(model, plan(residual_inner=[0], attention=[2], vectors="key"))
    assert hooked() == {
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.2.attention.self.key",
    }
    taps.remove()


def test_second_forward_overwrites_its_slot():
    model = tiny_bert(0)
    input_ids, attention_mask = batch()
    with Taps(model, plan(trunk=[0])) as taps:
        model(input_ids=input_ids, attention_mask=attention_mask)
        model(input_ids=input_ids.flip(1), attention_mask=attention_mask)
        assert len(taps.captures["trunk"]) == 1
        expected = by_hand(model, input_ids.flip(1), attention_mask)[0]["trunk"]
        torch.testing.assert_close(taps.captures["trunk"][0], expected, rtol=1e-5, atol=1e-5)


def test_student_captures_carry_grad_teacher_captures_do_not():
    student, teacher = tiny_bert(0).train(), tiny_bert(1).requires_grad_(False)
    layout = plan(trunk=[0], residual_inner=[1], attention=[2])
    input_ids, attention_mask = batch()
    with Taps(student, layout) as s_taps, Taps(teacher, layout) as t_taps:
        student(input_ids=input_ids, attention_mask=attention_mask)
        with torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=attention_mask)
        s_all = [t for slots in s_taps.captures.values() for t in slots]
        t_all = [t for slots in t_taps.captures.values() for t in slots]
    assert len(s_all) == len(t_all) == 4
    assert all(t.requires_grad and t.grad_fn is not None for t in s_all)
    assert not any(t.requires_grad for t in t_all)


def test_plan_from_spec(tmp_path):
    spec = DistillSpec(
        teacher=str(tmp_path),
        trunk=RelationSpec(layers="all"),
        residual_inner=RelationSpec(enabled=False),
        attention=AttentionRelationSpec(enabled=True, layers=[2, 0, 2], vectors="value"),
    )
    resolved = TapPlan.from_spec(spec, num_layers=3)
    assert resolved == TapPlan(trunk=(0, 1, 2), residual_inner=(), attention=(0, 2), attention_vectors="value")
    assert resolved.layers_needed() == 3
    assert TapPlan.from_spec(spec.model_copy(update={"trunk": RelationSpec(layers=[1])}), 3).layers_needed() == 3
    no_attention = spec.model_copy(update={"attention": AttentionRelationSpec(enabled=False)})
    assert TapPlan.from_spec(no_attention, 2).layers_needed() == 2
    with pytest.raises(ValueError, match=r"distill\.attention\.layers"):
        TapPlan.from_spec(spec, num_layers=2)
