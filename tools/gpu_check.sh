#!/usr/bin/env bash
# One call that says whether tcd-ds works on a CUDA machine (issue 21): one PASS/FAIL line per path.
#
#   tools/gpu_check.sh --prepare   here, with the package registry: fill .whl/ (git-ignored) with the wheels a bare
#                                  GPU image lacks (it has torch, transformers, accelerate, sentencepiece,
#                                  safetensors): deepspeed (built, `pip wheel --no-deps`), datasets, pydantic, wandb
#                                  and their dependencies, at the versions this repository is tested with
#   tools/gpu_check.sh             on the GPU machine, offline: install .whl/, run every path (<= 8 minutes)
#   tools/gpu_check.sh --dry-run   on CPU, in the test suite: every path's command is checked to parse (its
#                                  --help, or the launcher's --dry-run), so the script cannot rot
#
# Results (per-path logs, the lines below, the benchmark) go to $OUT (default runs/gpu_check); gpu_check.md there
# is what BENCHMARKS.md gets from a run. Exit status: the number of failed paths.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python}
MODE=check
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac

# ------------------------------------------------------------------------------------------------ prepare
if [ "$MODE" = prepare ]; then
  mkdir -p .whl && rm -f .whl/*.whl
  # What the check needs beyond the image, pinned to the versions installed (and tested) here.
  PINS=$("$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

def closure(names):
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
                todo.append(canonicalize_name(req.name))
    return seen

image = closure(["torch", "transformers", "accelerate", "sentencepiece", "safetensors"])
for name in sorted(closure(["deepspeed", "datasets", "pydantic", "wandb"]) - image):
    print(f"{name}=={distribution(name).version}")
EOF
)
  DS_PIN=$(echo "$PINS" | grep '^deepspeed==')
  OTHERS=$(echo "$PINS" | grep -v '^deepspeed==')
  echo "[gpu_check] building $DS_PIN (no deps; against the local torch, ops JIT-built on the GPU machine)"
  "$PY" -m pip wheel --no-deps --no-build-isolation -q -w .whl "$DS_PIN" || exit 1
  echo "[gpu_check] downloading for CPython 3.12 / manylinux x86_64:" $OTHERS
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $OTHERS || exit 1
  du -sh .whl; ls .whl
  SIZE_MB=$(du -sm .whl | cut -f1)
  [ "$SIZE_MB" -le 60 ] || echo "[gpu_check] warning: .whl is ${SIZE_MB} MB (over the ~60 MB budget)"
  exit 0
fi

# ------------------------------------------------------------------------------------------------ check / dry run
OUT_DIR=${OUT:-runs/gpu_check}
LOGS=$OUT_DIR/logs
mkdir -p "$LOGS"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
       TOKENIZERS_PARALLELISM=false
if [ "$MODE" = check ]; then
  unset DS_ACCELERATOR  # a leftover CPU setting must not hide the GPU (tcd_ds refuses it anyway)
  WANT=cuda
  "$PY" -m pip install -q --no-index --find-links .whl .whl/*.whl > "$LOGS/install.log" 2>&1 \
    || { echo "FAIL install (see $LOGS/install.log)"; tail -3 "$LOGS/install.log"; }
else
  export DS_ACCELERATOR=cpu
  WANT=cpu
fi
START=$SECONDS
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
FAILED=0
SUMMARY=$OUT_DIR/gpu_check.md
: > "$SUMMARY"

# path NAME TIMEOUT_S CMD...: run it (on a dry run: the command's --help, or the launcher's --dry-run), one line.
path() {
  local name=$1 limit=$2; shift 2
  local log=$LOGS/$name.log t0=$SECONDS status
  if [ $((SECONDS - START + limit)) -gt "$BUDGET_S" ] && [ "$MODE" = check ]; then
    limit=$((BUDGET_S - SECONDS + START))
    [ "$limit" -gt 5 ] || { line "FAIL $name (no time left in the ${BUDGET_S} s budget)"; return; }
  fi
  if [ "$MODE" = dry ]; then
    set -- $(dry_form "$@")
  fi
  timeout "$limit" "$@" > "$log" 2>&1
  status=$?
  if [ $status -eq 0 ]; then
    line "PASS $name ($((SECONDS - t0)) s)"
  else
    line "FAIL $name ($((SECONDS - t0)) s, status $status): $(grep -v '^\s*$' "$log" | tail -1 | cut -c1-160)"
  fi
}
line() { echo "$1" | tee -a "$SUMMARY"; case $1 in FAIL*) FAILED=$((FAILED + 1)) ;; esac; }

# The form of a command that a CPU can check quickly: the launcher validates its spec and overrides
# (--dry-run), a check script runs as is, anything else shows its --help.
dry_form() {
  local args=("$@")
  case " ${args[*]} " in
    *" --dry-run-ok "*) echo "${args[@]/--dry-run-ok/}" ;;
    *launchers/pretrain.py*) echo "$PY launchers/pretrain.py ${args[*]#*launchers/pretrain.py} --dry-run" ;;
    *) echo "${args[0]} ${args[1]} $([ "${args[1]}" = -m ] && echo "${args[2]}") --help" ;;
  esac
}

DS_RUN=("$PY" -m deepspeed.launcher.runner --num_gpus 1)
TINY=(--data.cache_dir="$OUT_DIR/cache" --logging.progress_bar=False --logging.every=5 --train.dtype=bf16)
TEACHER=(launchers/pretrain.py --spec ds_configs/teacher_tiny.yaml --run_dir="$OUT_DIR/teacher" "${TINY[@]}"
         --train.steps=20 --train.eval_every=10 --checkpoint.every=10)
STUDENT=(launchers/pretrain.py --spec ds_configs/student_tiny_tcd.yaml --run_dir="$OUT_DIR/tcd" "${TINY[@]}"
         --model.moe.ep_size=1 --distill.teacher="$OUT_DIR/teacher" --distill.teacher_dtype=bf16 --train.steps=20
         --train.eval_every=10 --checkpoint.every=10 --train.steps_per_launch=10)
if [ "$MODE" = dry ]; then
  STUDENT=("${STUDENT[@]/--distill.teacher=*/}")  # no teacher run exists on a dry run: the student's spec alone
  STUDENT=("${STUDENT[@]/--distill.teacher_dtype=bf16/}")
  STUDENT=("${STUDENT[@]/ds_configs\/student_tiny_tcd.yaml/ds_configs/student_tiny_moe.yaml}")
fi

# metrics.jsonl of RUN holds steps 1..N, finite, with a validation; the run's final checkpoint exists.
finished() {
  "$PY" - "$@" <<'EOF'
import json, math, sys
from pathlib import Path
run, steps = Path(sys.argv[1]), int(sys.argv[2])
records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
assert sorted({r["step"] for r in records}) == list(range(5, steps + 1, 5)), [r["step"] for r in records]
assert all(math.isfinite(r["loss/mlm"]) for r in records) and any("val/loss/mlm" in r for r in records)
assert (run / "checkpoints" / f"step_{steps}").is_dir()
print("ok", records[-1])
EOF
}

path imports 120 "$PY" -c "
import deepspeed, datasets, pydantic, wandb, torch, transformers, tcd_ds
from deepspeed.accelerator import get_accelerator
name = get_accelerator().device_name()
assert name == '$WANT', name
print(torch.__version__, deepspeed.__version__, transformers.__version__, name,
      torch.cuda.get_device_name() if name == 'cuda' else 'cpu')" --dry-run-ok
path teacher_bf16 150 bash -c "$(printf '%q ' "${DS_RUN[@]}" "${TEACHER[@]}") && $(printf '%q ' finished_placeholder)"
