"""bf16 trains like fp32 where precision decides: the MLM loss of bf16 logits and the relation rows (gathered,
their gradients summed) are fp32. (Gradient accumulation and reduction: tests/test_ds_config.py.)"""

import torch
import torch.nn.functional as F

from tcd_ds.distill.relations import relation_loss, rows_at, sample_positions
from tcd_ds.models.build import build_model
from tcd_ds.spec import ModelSpec


def test_the_mlm_loss_of_a_bf16_model_is_fp32():
    torch.manual_seed(0)
    model = build_model(ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, dropout=0.0,
                                  attention_dropout=0.0), vocab_size=50, pad_token_id=0).bfloat16()
    ids = torch.randint(5, 50, (2, 12))
    positions = torch.tensor([1, 4, 13, 20])
    out = model(input_ids=ids, labels=ids, masked_positions=positions)
    want = F.cross_entropy(out.logits.double(), ids.reshape(-1)[positions])
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - want.item()) < 1e-5  # bf16 would round a loss near 4 to a step of 0.016


def test_relation_rows_of_bf16_captures_are_fp32_and_give_bf16_gradients():
    capture = torch.randn(2, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    positions = sample_positions(None, 5, torch.Generator().manual_seed(0), num_tokens=12)
    assert len(set(positions.tolist())) == 5 and positions.max() < 12
    rows = rows_at({"trunk": [capture]}, positions)
    assert rows.dtype == torch.float32
    loss = relation_loss(rows, torch.randn(1, 5, 16))
    loss.backward()
    assert loss.dtype == torch.float32 and capture.grad.dtype == torch.bfloat16 and capture.grad.abs().sum() > 0
