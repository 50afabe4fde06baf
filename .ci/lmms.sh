#!/usr/bin/env bash
# CI for the lmms-eval integration (the `lmms` extra), in its own venv: lmms-eval needs torchvision,
# and PyPI's torchvision does not import beside the CPU torch 2.13 wheel the main venv uses, so this
# venv takes torch 2.14.1 + torchvision 0.29.1 (CUDA builds that run on the CPU; pip serves them
# from this machine's disk; ~7 GB, ~4 minutes). Then vtprune (editable, test + lmms extras) and
# `pytest tests_lmms`. Exits non-zero on any failure; pytest's exit code 5 (no tests) is a failure.
#   VTPRUNE_LMMS_VENV=DIR        venv folder (default .ci-venv-lmms)
#   VTPRUNE_LMMS_REUSE_VENV=1    keep an existing venv instead of rebuilding it
#   VTPRUNE_LMMS_SCENES=N        scenes questions the tests evaluate (default 40)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VTPRUNE_LMMS_VENV:-.ci-venv-lmms}"
start=$(date +%s)
pip_install() {  # quiet unless it fails (pip prints a warning per package for this machine's local indexes)
  local log
  log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -40 >&2
    echo "lmms CI: pip install $* failed" >&2
    exit 1
  fi
  rm -f "$log"
}
if [ "${VTPRUNE_LMMS_REUSE_VENV:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  pip_install --upgrade pip
  pip_install torch==2.14.1 torchvision==0.29.1
  pip_install -e ".[test,lmms]" lmms-eval==0.7.3  # the lmms extra pins filelock < 4 (see pyproject.toml)
fi
echo "lmms CI: venv ready in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
# everything local: no hub, no telemetry
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$(mktemp -d)}"
set +e
"$VENV/bin/python" -m pytest tests_lmms -p no:cacheprovider -q -rfE
status=$?
set -e
echo "lmms CI: done in $(( $(date +%s) - start )) s"
if [ "$status" -eq 5 ]; then
  echo "lmms CI: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
