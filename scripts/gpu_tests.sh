#!/usr/bin/env bash
# The CUDA tests (pytest -m gpu: tests/unit/test_gpu.py) on a GPU machine that has PyTorch but
# not this project's stack, such as an offline H200 (Python 3.12, no network, no Ray):
#
#   here:  scripts/gpu_tests.sh --wheels        # the locked diffusers, transformers, peft, regex -> .whl/
#   there: scripts/gpu_tests.sh                 # installs .whl/*.whl, runs the tests
#
# Ray is not needed by these tests: where it is missing, a stub stands in for the two names the
# deployments import (ray.is_initialized, ray.serve.metrics; metrics stay off). Results go to
# $OUT (default gpu-test-results/): versions.txt, gpu-tests.log, gpu-tests.xml.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--wheels" ]; then
  pins=$(grep -iE '^(diffusers|transformers|peft|regex)==' constraints.txt)  # regex: transformers' minimum
  # shellcheck disable=SC2086
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $pins
fi
OUT=${OUT:-gpu-test-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import ray" 2>/dev/null; then
  stub=$(mktemp -d)
  mkdir -p "$stub/ray/serve"
  echo "def is_initialized(): return False" >"$stub/ray/__init__.py"
  touch "$stub/ray/serve/__init__.py" "$stub/ray/serve/metrics.py"
  export PYTHONPATH=$stub:${PYTHONPATH:-}
fi
python3 - <<'PY' | tee "$OUT/versions.txt"
import platform, torch, diffusers, transformers, peft
print(f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, "
      f"gpu {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY
python3 -m pytest -m gpu tests/unit/test_gpu.py -v -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" \
  2>&1 | tee "$OUT/gpu-tests.log"
exit "${PIPESTATUS[0]}"
