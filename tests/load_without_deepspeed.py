"""Test helper: load a converted student where DeepSpeed cannot be imported, run it, report what was imported.

    python tests/load_without_deepspeed.py HF_DIR BATCH_FILE OUT_FILE (package | remote_code | plain)

`package`: `tcd_ds.models.register_auto_classes()`, then `AutoModelForMaskedLM.from_pretrained`. `remote_code`: tcd_ds is blocked
too, and the model comes from the modeling file shipped in HF_DIR (`trust_remote_code=True`). `plain`: tcd_ds
blocked, no remote code (a teacher). The tokenizer loads with `AutoTokenizer` alike, and
`AutoModelForSequenceClassification` with the same flag. BATCH_FILE holds `input_ids` and `attention_mask`;
OUT_FILE gets the eval logits, the classes and modules of both models, the largest difference between their
encoders' outputs, the classifier's balance loss (MoE only), and the imported modules of deepspeed and tcd_ds.
"""

import importlib.abc
import importlib.util
import sys

import torch


class Blocked(importlib.abc.MetaPathFinder):
    """Makes NAME look not installed: `import NAME` fails, and `importlib.util.find_spec(NAME)` (how transformers
    and accelerate ask whether a package is there) answers None."""

    def __init__(self, *names: str):
        self.names = names
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, package=None: (
            None if name.split(".")[0] in names else find_spec(name, package)
        )

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by {__file__})", name=fullname)
        return None


def main() -> None:
    hf_dir, batch_file, out_file, mode = sys.argv[1:]
    sys.meta_path.insert(0, Blocked("deepspeed") if mode == "package" else Blocked("deepspeed", "tcd_ds"))
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    if mode == "package":
        from tcd_ds.models import register_auto_classes

        register_auto_classes()
    trust = mode == "remote_code"
    model = AutoModelForMaskedLM.from_pretrained(hf_dir, trust_remote_code=trust).eval()
    AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust)
    classifier = AutoModelForSequenceClassification.from_pretrained(hf_dir, trust_remote_code=trust, num_labels=2)
    batch = torch.load(batch_file, weights_only=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logits = model(**inputs, output_hidden_states=True)
        classified = classifier.eval()(**inputs, output_hidden_states=True)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "tcd_ds"))
    torch.save({
        "logits": logits.logits, "class": type(model).__name__, "module": type(model).__module__,
        "classifier_class": type(classifier).__name__, "classifier_module": type(classifier).__module__,
        "encoder_difference": (logits.hidden_states[-1] - classified.hidden_states[-1]).abs().max().item(),
        "balance_loss": classified.aux_loss.item() if "aux_loss" in classified else None,
        "loaded": loaded,
    }, out_file)


if __name__ == "__main__":
    main()
