#!/usr/bin/env bash
# The GPU benchmark from a fresh clone: ResNet-50 at 224x224, stage 1 and stage 2 images/s of
# xfer and of each framework's own loop, fp32 and bf16, peak GPU memory, every backend
# (benchmarks/gpu.py); writes OUT/gpu.json and OUT/gpu.md.
#
#   bash benchmarks/gpu.sh                       # OUT=gpu-results
#   bash benchmarks/gpu.sh --out DIR --backends torch flax
#   WHEELS=DIR bash benchmarks/gpu.sh            # offline: install what is missing from DIR
#   bash benchmarks/gpu.sh --tiny --backends torch   # a tiny CPU run (what the tests run)
#
# It uses the machine's own CUDA builds of torch and JAX: a virtual environment in .venv-gpu
# with --system-site-packages, xfer installed there without touching them (--no-deps), and
# only what is missing (numpy, safetensors, tqdm, pillow, keras and its dependencies)
# installed beside. On a machine without internet, make the wheels elsewhere, e.g.
#   pip download -c constraints.txt keras safetensors tqdm pillow -d wheels
# and carry the directory (WHEELS=wheels). PYTHON=path skips the set-up and runs with that
# interpreter as it is (the tests do that).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    venv=${XFER_GPU_VENV:-.venv-gpu}
    [[ -x "$venv/bin/python" ]] || python3 -m venv --system-site-packages "$venv"
    PYTHON="$venv/bin/python"
    pip_from=()
    [[ -n "${WHEELS:-}" ]] && pip_from=(--no-index --find-links "$WHEELS")
    "$PYTHON" -m pip install -q --no-deps -e .
    missing=$("$PYTHON" - <<'EOF'
import importlib.util
wanted = {"numpy": "numpy", "safetensors": "safetensors", "tqdm": "tqdm", "PIL": "pillow",
          "keras": "keras"}
print(" ".join(pip for module, pip in wanted.items() if importlib.util.find_spec(module) is None))
EOF
)
    if [[ -n "$missing" ]]; then
        echo "installing: $missing"
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install -q "${pip_from[@]}" $missing
    fi
fi
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' || true
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())' || true
exec "$PYTHON" benchmarks/gpu.py "$@"
