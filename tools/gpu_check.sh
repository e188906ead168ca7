#!/usr/bin/env bash
# One call that says whether tcd-ds works on a CUDA machine (issue 21): one PASS/FAIL line per path.
#
#   tools/gpu_check.sh --prepare   here, with the package registry: fill .whl/ (git-ignored) with the wheels a bare
#                                  GPU image lacks (it has torch, transformers, accelerate, sentencepiece,
#                                  safetensors, pandas, pyarrow, ...): deepspeed (built, `pip wheel --no-deps`),
#                                  datasets, pydantic and what they need beyond the image, at the versions this
#                                  repository is tested with (a few MB)
#   tools/gpu_check.sh             on the GPU machine, offline: install .whl/, run every path (<= 8 minutes)
#   tools/gpu_check.sh --dry-run   on CPU, in the test suite: every path's command is checked to parse (its
#                                  --help, or the launcher's --dry-run), so the script cannot rot
#
# The paths are in benchmarks/gpu_check.py. Results (per-path logs, the lines, the benchmark) go to $OUT (default
# runs/gpu_check); gpu_check.md there is what BENCHMARKS.md gets from a run. Exit status: the failed paths' count.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODE=check
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac

# ------------------------------------------------------------------------------------------------ prepare
if [ "$MODE" = prepare ]; then
  mkdir -p .whl && rm -f .whl/*.whl
  # What the check needs beyond the image, pinned to the versions installed (and tested) here.
  PINS=$("$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The GPU machines' image (its package list) holds these; carried again, pandas and pyarrow alone (67 MB of wheels)
# would not fit the device's 64 MiB. A dependency of theirs is theirs: the walk stops at them.
IMAGE = {canonicalize_name(n) for n in """
    torch transformers accelerate sentencepiece safetensors tokenizers huggingface-hub hf-xet numpy pandas pyarrow
    einops ninja msgpack psutil py-cpuinfo nvidia-ml-py packaging pyyaml tqdm filelock fsspec requests aiohttp
    xxhash anyio click h11 httpx httpcore idna jinja2 markupsafe mpmath networkx sympy setuptools six
    python-dateutil typing-extensions""".split()}


def closure(names):
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen or name in IMAGE:
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


for name in sorted(closure(["deepspeed", "datasets", "pydantic"])):  # wandb: imported only when on
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
if [ "$MODE" = check ]; then
  mkdir -p "${OUT:-runs/gpu_check}"
  LOG=${OUT:-runs/gpu_check}/install.log
  ls .whl/*.whl > /dev/null 2>&1 || { echo "FAIL install: no wheels in .whl/ (run tools/gpu_check.sh --prepare)"; exit 1; }
  # --no-deps: the image's own packages stay as they are; a version it lacks shows in the paths that need it, and
  # pip check's notes go to the log.
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl > "$LOG" 2>&1 \
    && echo "PASS install (offline, $(ls .whl/*.whl | wc -l) wheels)" \
    || { echo "FAIL install: $(tail -1 "$LOG")"; exit 1; }
  "$PY" -m pip check >> "$LOG" 2>&1
  exec "$PY" -m benchmarks.gpu_check
fi
exec "$PY" -m benchmarks.gpu_check --dry-run
