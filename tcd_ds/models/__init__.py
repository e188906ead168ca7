"""The models: a dense BERT teacher and an MoE BERT student.

- `modeling_moe_bert.py`: the MoE architecture in plain PyTorch (torch and transformers only), the file every
  converted student ships for `trust_remote_code`; `register_auto_classes()` maps `moe_bert` to it.
- `bert.py`: the training-time head shared by both models (MLM logits at the masked positions only).
- `deepspeed_moe.py`: the student's training class, the same layout with DeepSpeed-MoE FFNs (expert parallelism).
- `configs.py`: run spec -> HF config; `build.py`: run spec -> training model; `param_groups.py`: ZeRO groups.

Importing this package (or the modeling file) does not import DeepSpeed.
"""

from tcd_ds.models.modeling_moe_bert import register_auto_classes

__all__ = ["register_auto_classes"]
