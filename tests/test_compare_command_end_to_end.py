"""``xfer compare`` end to end, as a user runs it on a fresh install (the ``parity`` session).

The real ``xfer`` console script in a subprocess, with an empty HOME, XFER_CACHE and
KERAS_HOME, over torch, keras-jax, keras-torch (Keras's other engine runs in compare's own
subprocess) and flax; ``--format json`` is parsed. Runs when XFER_PARITY=1 (nox -s parity).

- the default model (small_cnn, pretrained on the source digits by the first backend);
- ``--model resnet18``: a narrow ResNet-18 from fresh seeded weights on the digits upsampled
  to 16x16, with the preset's BN policies (frozen, then affine: moving statistics);
- ``--model resnet50``: xfer.models.resnet50 (keras.applications' layout, 23.5M
  parameters) on a folder of 32x32 images (``--data``), the real backbone of docs/convert.md;
- the whole main job (40 epochs), which the README says agrees;
- and runs that must fail: ``--tolerance 0`` exits 1 and names a pair; and with the one
  array writer's contiguity step removed (the bug of issue 11: safetensors 0.8 scrambles a
  transposed view), the handoff to Keras's other engine is caught.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from xfer._config import LABELS
from xfer.compare import DEFAULT_TOLERANCE

pytestmark = pytest.mark.skipif(
    os.environ.get("XFER_PARITY") != "1", reason="compare end to end runs in `nox -s parity`"
)
BACKENDS = set(LABELS)


def _compare(
    tmp_path, *options: str, quick: bool = True, **extra_env: str
) -> tuple[int, dict, str]:
    exe = shutil.which("xfer")
    assert exe, "the xfer console script is not on PATH: pip install -e '.[all]'"
    home = tmp_path / "home"
    for name in ("home", "cache", "keras"):
        (tmp_path / name).mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XFER_CACHE": str(tmp_path / "cache"),
        "KERAS_HOME": str(tmp_path / "keras"),
        "KERAS_BACKEND": "jax",  # keras-torch runs in compare's subprocess
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        # Passed on only when set, to test a source checkout without installing it.
        **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ},
        **extra_env,
    }
    args = [exe, "compare", "--backend", "torch", "--backend", "keras", "--backend", "flax"]
    args += [*(["--quick"] if quick else []), "--format", "json"]
    args += ["--out", str(tmp_path / "report"), *options]
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.strip(), f"no JSON on stdout; stderr: {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.returncode, json.loads(done.stdout), done.stderr


# small_cnn: test_the_whole_main_job_agrees_across_the_four_backends runs it for 40 epochs.
@pytest.mark.parametrize("model", ["resnet18"])
def test_compare_agrees_across_the_four_backends(tmp_path, model):
    status, result, stderr = _compare(tmp_path, "--model", model)
    print(f"\n{model}: {result['verdict']}, largest {result['largest']}")
    assert status == 0, stderr[-2000:]
    assert result["verdict"] == "agree" and result["first_divergence"] is None
    assert set(result["backends"]) == BACKENDS
    assert result["tolerance"] == DEFAULT_TOLERANCE
    assert result["largest"]["relative"] <= DEFAULT_TOLERANCE
    assert set(result["largest_per_stage"]) == {"head", "finetune"}
    assert result["frozen_tensors_kept"] is True
    losses = {b: m["finetune"]["val_loss"] for b, m in result["backends"].items()}
    assert max(losses.values()) - min(losses.values()) < 1e-2 and min(losses.values()) > 0
    assert (tmp_path / "report" / "report.md").read_text().count("**AGREE**") == 1


def test_compare_agrees_on_resnet50_at_a_small_image_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "mid", "bright")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 80, (32, 32, 3)) + 80 * c
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    data = ["--data", str(tmp_path / "images"), "--val-fraction", "0.25"]
    # The default preset (head on the frozen base, then fine-tuning with BN affine): a
    # random 50-layer base trained whole with batch statistics on 9 images blows up to
    # losses of 1e25, where rounding alone parts the backends.
    status, result, stderr = _compare(tmp_path, *data, "--model", "resnet50")
    print(f"\nresnet50: {result['verdict']}, largest {result['largest']}")
    assert status == 0, stderr[-2000:]
    assert result["verdict"] == "agree" and set(result["backends"]) == BACKENDS
    assert result["largest"]["relative"] <= DEFAULT_TOLERANCE
    assert result["frozen_tensors_kept"] is True


def test_compare_fails_past_its_tolerance_and_names_the_pair(tmp_path):
    status, result, stderr = _compare(tmp_path, "--tolerance", "0")
    assert status == 1
    assert result["verdict"] == "diverged" and result["tolerance"] == 0
    first = result["first_divergence"]
    assert set(first["pair"]) <= BACKENDS and first["relative"] > 0
    assert f"{first['pair'][0]} vs {first['pair'][1]} diverged in stage" in stderr
    assert "**DIVERGED**" in (tmp_path / "report" / "report.md").read_text()


def test_the_whole_main_job_agrees_across_the_four_backends(tmp_path):
    """What the README says of `xfer compare` on the main job, 40 epochs."""
    status, result, stderr = _compare(tmp_path, quick=False)
    print(f"\nmain job: {result['verdict']}, largest {result['largest']}")
    assert status == 0, stderr[-2000:]
    assert result["verdict"] == "agree" and set(result["backends"]) == BACKENDS


def test_a_scrambled_weights_handoff_is_caught(tmp_path):
    """Remove the contiguity step of xfer's one array writer, as the compare handoff once
    lacked it: the start weights reach Keras's other engine in the wrong element order on
    safetensors 0.8, and compare must exit 1 naming that engine."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import numpy as np\nimport xfer.files\n"
        "xfer.files.canonical_array = lambda array: np.asarray(array)\n"
    )
    path = os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])
    status, result, stderr = _compare(tmp_path, PYTHONPATH=path)
    assert status == 1, "compare passed with the contiguity step removed"
    assert result["verdict"] == "diverged"
    assert "keras-torch" in result["first_divergence"]["pair"], result["first_divergence"]
