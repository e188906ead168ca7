"""Fine-tuning converted models (`tcd-ds finetune`, on transformers.Trainer): a tiny teacher and a tiny MoE
student learn a task they can learn, the student's logged loss holds its balance term, adapters train only what
they should, weight decay spares biases and LayerNorm, a constant predictor is flagged, the MoE options reach the
model, and local task files of each format load. (The classifier's encoder against the converted model's:
tests/test_convert.py; its balance loss against DeepSpeed's: tests/test_convert_routing.py.)"""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from conftest import REPO
from tcd_ds.cli.finetune import main as finetune_main
from tcd_ds.downstream.adapters import add_adapters
from tcd_ds.downstream.finetune import LossTally, collate, encode, load_classifier, make_trainer
from tcd_ds.downstream.spec import FinetuneSpec
from tcd_ds.downstream.tasks import GLUE, Example, TaskError, glue_task, load_task
from tcd_ds.hf.convert import convert
from tcd_ds.models import register_auto_classes
from tcd_ds.resources import BUNDLED


@pytest.fixture(scope="module")
def converted(teacher_run, tcd_run, tmp_path_factory) -> dict[str, Path]:
    register_auto_classes()  # AutoConfig of a converted student, here as in `tcd-ds finetune`
    root = tmp_path_factory.mktemp("hf")
    return {"teacher": convert(teacher_run, root / "teacher"), "tcd": convert(tcd_run, root / "tcd")}


def write_task(directory: Path, splits: dict[str, list[str]], header: str, task_yaml: str, suffix: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        (directory / f"{split}{suffix}").write_text("".join(line + "\n" for line in [header, *lines] if line))
    (directory / "task.yaml").write_text(task_yaml)
    return directory


def keyword_splits(train_label: int | None = None) -> dict[str, list[str]]:
    """Eight random Wikipedia words with "excellent" (label 1) or "terrible" (label 0) inserted somewhere: learnable
    from the words alone, whatever the model learnt in pre-training. `train_label` relabels train: one class only."""
    words = [w for line in (BUNDLED / "wiki/validation.txt").open() for w in line.split() if w.isalpha()][:3000]
    rng = random.Random(0)
    splits = {}
    for split, n in (("train", 256), ("dev", 128), ("test", 128)):
        lines = []
        for _ in range(n):
            label = rng.randrange(2)
            sentence = rng.sample(words, 8)
            sentence.insert(rng.randrange(9), "excellent" if label else "terrible")
            lines.append(f"{' '.join(sentence)}\t{label if train_label is None or split != 'train' else train_label}")
        splits[split] = lines
    return splits


KEYWORD_YAML = "name: keyword\ntrain: train.tsv\ndev: dev.tsv\ntest: test.tsv\ntext_fields: [sentence]\n" \
               "metrics: [accuracy, f1]\n"


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("keyword"), keyword_splits(), "sentence\tlabel", KEYWORD_YAML, ".tsv")


def settings(**fields) -> FinetuneSpec:
    """A fine-tuning spec for the in-process helpers, which take the model and task as arguments."""
    return FinetuneSpec(model="unused", task="unused", **fields)


def finetune_cli(*args) -> int:
    """`tcd-ds finetune`'s main(), in this process."""
    return finetune_main([str(a) for a in args])


@pytest.mark.parametrize("model, seeds", [("teacher", [1]), ("tcd", [1, 2])])
def test_converted_models_learn_a_learnable_task(converted, keyword_task, tmp_path, model, seeds):
    """Through `tcd-ds finetune` at its defaults but a smaller batch (the task is small): well above chance on
    test with the epoch picked on the held-out slice; an MoE student's logged loss is task + 0.01 x balance."""
    out = tmp_path / "keyword.json"
    assert finetune_cli(converted[model], "--task", keyword_task, "--seeds", *seeds, "--batch-size", 16,
                        "--lr", 1e-3, "--out", out) == 0
    result = json.loads(out.read_text())
    assert result["seeds"] == seeds and [run["seed"] for run in result["runs"]] == seeds
    assert result["selection"] == "heldout" and result["heldout_examples"] == 26  # 10% of 256
    assert result["train_examples"] == 230 and result["report_split"] == "test"
    for run in result["runs"]:
        assert run["scores"]["test"]["accuracy"] >= 0.9, run  # chance is 0.5
        assert run["constant_predictions"] == [] and len(run["epochs"]) == FinetuneSpec.model_fields['epochs'].default
        picked = run["epochs"][run["best_epoch"] - 1]
        assert picked["heldout"]["accuracy"] == max(e["heldout"]["accuracy"] for e in run["epochs"])
        assert run["scores"]["dev"] == picked["dev"]
        for epoch in run["epochs"]:
            if model == "tcd":
                assert run["balance_weight"] == pytest.approx(0.01)  # the run spec's, kept on by default
                assert 0.3 < epoch["train_balance_loss"] < 4.0  # switch l_aux: 1 = uniform (less with padding)
                assert epoch["train_total_loss"] == pytest.approx(
                    epoch["train_loss"] + 0.01 * epoch["train_balance_loss"], rel=1e-5)
            else:
                assert run["balance_weight"] is None and "train_balance_loss" not in epoch
                assert epoch["train_total_loss"] == pytest.approx(epoch["train_loss"], rel=1e-6)
    test = result["summary"]["test"]["accuracy"]
    scores = [run["scores"]["test"]["accuracy"] for run in result["runs"]]
    assert test["mean"] == pytest.approx(sum(scores) / len(scores))
    if len(scores) == 2:
        assert test["std"] == pytest.approx(abs(scores[0] - scores[1]) / math.sqrt(2))


def adapter_and_head_parameters(config, bottleneck: int, num_labels: int) -> int:
    """What adapter mode trains, counted from the architecture: two adapters per layer, every LayerNorm (the
    embeddings' and two per layer), the pooler and the classifier."""
    h, layers = config.hidden_size, config.num_hidden_layers
    adapters = layers * 2 * (h * bottleneck + bottleneck + bottleneck * h + h)
    layer_norms = (1 + 2 * layers) * 2 * h
    return adapters + layer_norms + (h * h + h) + (h * num_labels + num_labels)


def test_adapter_mode_trains_the_counted_parameters_without_the_balance_loss(converted, keyword_task, tmp_path):
    out = tmp_path / "off.json"
    assert finetune_cli(converted["tcd"], "--task", keyword_task, "--mode", "adapter", "--seeds", 1, "--epochs", 1,
                        "--adapter-size", 8, "--balance-weight", 0, "--max-train-examples", 32, "--selection", "last",
                        "--adapter_lr", 1e-3, "--out", out) == 0
    result = json.loads(out.read_text())
    run = result["runs"][0]
    assert result["mode"] == "adapter" and result["config"]["max_train_examples"] == 32
    assert result["train_examples"] == 32 and result["heldout_examples"] == 0 and run["best_epoch"] == 1
    assert run["balance_weight"] is None and "train_balance_loss" not in run["epochs"][0]
    assert math.isfinite(run["epochs"][0]["train_loss"]) and 0 <= run["scores"]["test"]["accuracy"] <= 1
    config = AutoConfig.from_pretrained(converted["tcd"])
    assert run["trainable_parameters"] == adapter_and_head_parameters(config, 8, 2)
    assert run["trainable_parameters"] < run["parameters"] / 10


def test_the_lr_grid_selects_the_learning_rate_that_learns_on_the_heldout_slice(converted, keyword_task, tmp_path):
    """At lr 1e-9 the model cannot leave chance, at 1e-3 it learns: the held-out slice picks 1e-3, and only its runs
    are reported; every lr's runs stay in the results."""
    out = tmp_path / "grid.json"
    assert finetune_cli(converted["teacher"], "--task", keyword_task, "--seeds", 1, "--batch-size", 16,
                        "--lr", 1e-9, 1e-3, "--out", out) == 0
    result = json.loads(out.read_text())
    assert result["lrs"] == [1e-9, 1e-3] and result["selected_lr"] == 1e-3
    grid = result["lr_grid"]
    assert grid["0.001"]["heldout"]["mean"] >= 0.9 > grid["1e-09"]["heldout"]["mean"]
    assert [run["lr"] for run in result["all_runs"]] == [1e-9, 1e-3] and [r["lr"] for r in result["runs"]] == [1e-3]
    assert result["summary"]["test"]["accuracy"]["mean"] == result["runs"][0]["scores"]["test"]["accuracy"]
    predictions, labels = result["runs"][0]["predictions"], result["labels"]
    assert len(predictions) == len(labels) == 128  # the test split, in its order: the reported accuracy is theirs
    assert sum(p == y for p, y in zip(predictions, labels)) / 128 == result["runs"][0]["scores"]["test"]["accuracy"]


def test_a_grid_needs_the_heldout_selection(converted, keyword_task, capsys):
    assert finetune_cli(converted["teacher"], "--task", keyword_task, "--selection", "dev") == 2
    assert "lr: a grid of 3 learning rates is selected on the held-out slice" in capsys.readouterr().err


def test_a_model_that_predicts_one_class_is_flagged(converted, tmp_path):
    """Train labels all 0: the model learns to answer 0 whatever the input, and the result says so."""
    task = write_task(tmp_path / "zeros", keyword_splits(train_label=0), "sentence\tlabel", KEYWORD_YAML, ".tsv")
    out = tmp_path / "zeros.json"
    assert finetune_cli(converted["teacher"], "--task", task, "--seeds", 1, "--epochs", 2, "--batch-size", 16,
                        "--max-train-examples", 64, "--selection", "dev", "--lr", 1e-3, "--out", out) == 0
    result = json.loads(out.read_text())
    assert result["runs"][0]["constant_predictions"] == ["dev", "test"] and result["constant_prediction_seeds"] == [1]
    assert result["runs"][0]["scores"]["test"]["f1"] == 0.0  # never the positive class


def test_adapters_start_as_the_pretrained_model_and_train_alone(converted, keyword_task):
    """Zero-initialised adapters change nothing at first; a training step then moves adapters, layer norms and
    the head only, never a pre-trained weight of the encoder."""
    task = load_task(str(keyword_task))
    torch.manual_seed(0)
    model = load_classifier(converted["tcd"], task, settings(), torch.device("cpu")).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted["tcd"])
    batch = collate(tokenizer, encode(tokenizer, task.splits["train"][:16], 64), False, torch.device("cpu"))
    before = model(**batch).logits
    add_adapters(model, bottleneck=8)
    assert torch.allclose(model(**batch).logits, before, atol=1e-6)

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters()
                       if n.startswith(("adapters.", "classifier.", "bert.pooler.")) or "LayerNorm" in n}
    assert len([n for n in trained if n.startswith("adapters.")]) == 2 * 2 * 4  # 2 layers x 2 places x 4 tensors
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, initial[n])}
    assert any(n.startswith("adapters.") and n.endswith("up.weight") for n in changed)
    assert changed <= trained
    assert not torch.allclose(model.eval()(**batch).logits, before)  # the hooks are in the forward pass


def test_weight_decay_spares_biases_and_layer_norms(converted, keyword_task, tmp_path):
    task = load_task(str(keyword_task))
    config = FinetuneSpec(model=str(converted["tcd"]), task=str(keyword_task), mode="adapter", adapter_size=8)
    model = load_classifier(converted["tcd"], task, config)
    tokenizer = AutoTokenizer.from_pretrained(converted["tcd"])
    trainer = make_trainer(model, tokenizer, task, config, 1, torch.device("cpu"), str(tmp_path), [], {},
                           LossTally())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {group["weight_decay"]: {names[id(p)] for p in group["params"]}
              for group in trainer.create_optimizer().param_groups}
    assert set(groups) == {config.weight_decay, 0.0}
    assert groups[0.0] == {n for n, p in model.named_parameters()
                           if p.requires_grad and (n.endswith(".bias") or ".LayerNorm." in n)}
    assert groups[config.weight_decay] | groups[0.0] == {n for n, p in model.named_parameters() if p.requires_grad}


def test_moe_options_freeze_the_router_and_set_the_eval_capacity(converted, keyword_task):
    task = load_task(str(keyword_task))
    model = load_classifier(converted["tcd"], task, settings(train_router=False, eval_capacity_factor=8.0))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"bert.encoder.layer.{i}.output.dense.deepspeed_moe.gate.wg.weight"
                      for i in model.config.moe_layers}
    gates = [block.deepspeed_moe.gate for block in model.moe_blocks().values()]
    assert model.config.eval_capacity_factor == 8.0 and all(g.eval_capacity_factor == 8.0 for g in gates)
    default = load_classifier(converted["tcd"], task, settings())
    assert all(p.requires_grad for p in default.parameters())
    assert default.config.eval_capacity_factor == AutoConfig.from_pretrained(converted["tcd"]).eval_capacity_factor


def test_local_task_files_of_each_format(tmp_path):
    pair_yaml = "name: pairs\ntrain: train{s}\ndev: dev{s}\ntext_fields: [a, b]\nlabel_field: y\nkind: regression\n" \
                "num_labels: 1\nmetrics: [pearson, spearman]\n"
    rows = ['{"a": "one", "b": "two", "y": 0.5}', '{"a": "three", "b": "four", "y": 2}']
    task = load_task(str(write_task(tmp_path / "jsonl", {"train": rows, "dev": rows}, "", pair_yaml.format(s=".jsonl"),
                                    ".jsonl")))
    assert [(e.texts, e.label) for e in task.splits["dev"]] == [(("one", "two"), 0.5), (("three", "four"), 2.0)]
    assert task.eval_splits() == ["dev"] and task.main_metric == "pearson"

    named = "name: named\ntrain: train.csv\ndev: dev.csv\ntext_fields: [text]\nlabels: [neg, pos]\nmetrics: [f1]\n"
    csv_rows = ['"quoted, with a comma",pos', "plain,neg"]
    task = load_task(str(write_task(tmp_path / "csv", {"train": csv_rows, "dev": csv_rows}, "text,label", named,
                                    ".csv")))
    assert [(e.texts, e.label) for e in task.splits["train"]] == [(("quoted, with a comma",), 1), (("plain",), 0)]

    bad = write_task(tmp_path / "bad", {"train": ["x\t7"], "dev": ["x\t1"]}, "sentence\tlabel",
                     "name: bad\ntrain: train.tsv\ndev: dev.tsv\ntext_fields: [sentence]\nmetrics: [accuracy]\n",
                     ".tsv")
    with pytest.raises(TaskError, match=r"train.tsv row 1: label '7' outside 0..1"):
        load_task(str(bad))
    with pytest.raises(TaskError, match="neither a task directory, a bundled task .* nor a GLUE task"):
        load_task("no_such_task")


@pytest.mark.parametrize("name", ["mrpc", "stsb", "mnli"])
def test_glue_tasks_map_the_hubs_columns_and_splits(name):
    """A DatasetDict shaped as `nyu-mll/glue` has the task (columns, label type, split names), built locally."""
    fields = GLUE[name]["text_fields"]
    label = [0.5, 4.25] if name == "stsb" else [1, 0]
    split = {**{f: [f"{f} one", f"{f} two"] for f in fields}, "label": label, "idx": [0, 1]}
    hub_splits = ["train", "validation_matched", "validation_mismatched"] if name == "mnli" else ["train", "validation"]
    task = glue_task(name, datasets.DatasetDict({s: datasets.Dataset.from_dict(split) for s in hub_splits}))
    assert list(task.splits) == (["train", "dev", "dev_mismatched"] if name == "mnli" else ["train", "dev"])
    assert task.splits["dev"][1] == Example(tuple(f"{f} two" for f in fields), label[1])
    assert task.spec.kind == ("regression" if name == "stsb" else "classification")
    assert task.main_metric == {"mrpc": "f1", "stsb": "pearson", "mnli": "accuracy"}[name]


def test_bundled_movie_review_task_loads_with_its_split():
    task = load_task(str(BUNDLED / "tasks" / "movie_reviews"))
    sizes = {split: len(examples) for split, examples in task.splits.items()}
    assert sizes == {"train": 8087, "dev": 978, "test": 1007}
    for examples in task.splits.values():
        assert 0.45 < sum(e.label for e in examples) / len(examples) < 0.55  # balanced, as the id split keeps it
    assert task.spec.metrics == ["accuracy", "f1"]


def test_pairs_are_encoded_with_segment_ids(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted["teacher"])
    (row,) = encode(tokenizer, [Example(("first part", "second part"), 1)], 64)
    sep = row["input_ids"].index(tokenizer.sep_token_id)
    assert row["token_type_ids"] == [0] * (sep + 1) + [1] * (len(row["input_ids"]) - sep - 1)


RAW = Path("/work/shared/data/raw")


@pytest.mark.skipif(not (RAW / "movieReviewSnippets_GroundTruth.txt").is_file(), reason="raw VADER files not here")
def test_bundled_task_files_are_what_the_builder_makes(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "build_tasks.py"), str(RAW), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("movie_reviews/train.tsv", "movie_reviews/dev.tsv", "movie_reviews/test.tsv",
                 "nyt_editorials/sentences.txt"):
        assert (tmp_path / name).read_bytes() == (BUNDLED / "tasks" / name).read_bytes(), name


def test_converted_student_fine_tunes_under_transformers_trainer(converted, keyword_task, tmp_path):
    """HF's MoE contract: the converted student's full forward signature lets `Trainer` pass `labels` and
    `token_type_ids`, and the loss it trains on is the task loss plus the weighted balance term."""
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from tcd_ds.models import register_auto_classes

    register_auto_classes()
    task = load_task(str(keyword_task))
    tokenizer = AutoTokenizer.from_pretrained(converted["tcd"])
    rows = encode(tokenizer, task.splits["train"][:64], max_length=32)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(converted["tcd"], num_labels=2)
    assert model.config.balance_weight > 0
    seen = []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            seen.append(sorted(inputs))
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            task_loss = torch.nn.functional.cross_entropy(outputs.logits, inputs["labels"])
            torch.testing.assert_close(loss, task_loss + model.config.balance_weight * outputs.aux_loss)
            return (loss, outputs) if return_outputs else loss

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=3,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    result = Recording(model=model, args=args, train_dataset=rows, processing_class=tokenizer).train()
    assert seen and all({"labels", "input_ids", "attention_mask"} <= set(keys) for keys in seen)
    assert math.isfinite(result.training_loss)
