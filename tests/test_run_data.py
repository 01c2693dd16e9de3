"""``xfer run --data DIR --model M`` and ``xfer compare --data`` end to end, through the CLI,
on folders of PNG images generated here: reference models on every backend, a
keras.applications backbone on Keras, user factories, and the model errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from xfer import _config
from xfer.cli import main
from xfer.cli.run import data_run_text

FACTORIES = '''
import xfer


def full(num_classes, input_shape, backend):
    """A whole model with head.** units, on any backend (--no-head)."""
    return xfer.models.small_cnn(num_classes, input_shape[-1], width=4, dropout=0.0,
                                 backend=backend)


def torch_backbone(input_shape):
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(input_shape[-1], 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def not_a_model():
    return 3
'''


@pytest.fixture
def folder(tmp_path):
    """Three classes of 8 RGB images of 12x12, each class its own brightness."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, name in enumerate(("circle", "square", "star")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 60, (12, 12, 3)) + 90 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "userfactories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userfactories"
    sys.modules.pop("userfactories", None)


def _backend(kit) -> str:
    return kit.id.partition("-")[0]


def _run(capsys, *args) -> tuple[int, dict | str]:
    status = main(["run", "--quiet", "--quick", *args])
    out = capsys.readouterr()
    return status, (json.loads(out.out) if "--format" in args and status == 0 else out.err)


def test_xfer_run_on_an_image_folder_with_a_reference_model(kit, folder, capsys):
    args = ["--backend", _backend(kit), "--data", str(folder), "--model", "small_cnn"]
    status, report = _run(capsys, *args, "--format", "json")
    assert status == 0, report
    assert report["data"]["classes"] == ["circle", "square", "star"]
    assert report["data"]["counts"]["star"] == {"train": 6, "val": 2}
    assert report["data"]["image_shape"] == [12, 12, 3]
    assert report["data"]["normalisation"].startswith("pixels / 255")
    assert report["weights"] == "random" and report["model"] == "small_cnn"
    stages = report["history"]["stages"]
    assert [s["name"] for s in stages] == ["head", "finetune"]
    assert (
        all(s["changed"] == [] for s in stages) and stages[0]["kept"] == 12
    )  # base tensors, BN statistics too
    assert np.isfinite(stages[-1]["epochs"][-1]["val_loss"])
    # The text (made from the same report) says the same, and the normalisation.
    text = data_run_text(report)
    assert "3 classes, 18 training and 6 validation images of 12x12x3" in text
    assert "normalised: pixels / 255" in text and "circle 6/2, square 6/2, star 6/2" in text


@pytest.mark.backends("torch", "flax")
def test_xfer_run_on_an_image_folder_with_resnet18(kit, folder, capsys):
    args = ["--backend", _backend(kit), "--data", str(folder), "--model", "resnet18"]
    status, report = _run(capsys, *args, "--format", "json")
    assert status == 0, report
    assert report["model"] == "resnet18" and report["data"]["image_shape"] == [12, 12, 3]
    stages = report["history"]["stages"]
    assert all(s["changed"] == [] for s in stages) and stages[0]["kept"] > 0
    assert np.isfinite(stages[-1]["epochs"][-1]["val_loss"])


# One engine: the whole MobileNetV2 takes the longest of this file (keras-torch: no compile).
@pytest.mark.backends("keras-torch")
def test_xfer_run_on_a_keras_applications_backbone(kit, folder, capsys):
    status, report = _run(
        capsys,
        *("--backend", "keras", "--data", str(folder), "--model", "keras:MobileNetV2"),
        *("--image-size", "32", "--format", "json"),
    )
    assert status == 0, report
    head, finetune = report["history"]["stages"]
    # The preset's head stage trains xfer's head only: the whole MobileNetV2 stays as it was.
    assert head["n_trainable"] == 1280 * 3 + 3 and head["changed"] == []
    assert head["n_frozen"] > 2_000_000 and finetune["n_frozen"] == 0
    assert report["data"]["normalisation"].startswith("pixels / 255")  # random weights
    # What --weights imagenet feeds instead (the download itself needs the network).
    from xfer.backends.keras.models import imagenet_preprocessing

    preprocess, said = imagenet_preprocessing("MobileNetV2")
    assert said.startswith("keras.applications.mobilenet_v2.preprocess_input")
    np.testing.assert_allclose(preprocess(np.array([0.0, 0.5, 1.0])), [-1.0, 0.0, 1.0], atol=1e-6)


@pytest.mark.backends("keras-jax")
def test_imagenet_weights_without_the_network_fail_in_one_line(kit, folder, capsys, monkeypatch):
    # A proxy that refuses every connection: what a machine without the network meets.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    status, err = _run(
        capsys,
        *("--backend", "keras", "--data", str(folder), "--model", "keras:MobileNetV2"),
        *("--image-size", "32", "--weights", "imagenet"),
    )
    assert status == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("xfer run: keras:MobileNetV2 --weights imagenet: the weights could ")
    assert "leave out --weights" in line


def test_xfer_run_on_a_factory_model(kit, folder, factories, capsys):
    backend = _backend(kit)
    args = ["--backend", backend, "--data", str(folder), "--format", "json"]
    status, report = _run(capsys, *args, "--model", f"{factories}:full", "--no-head")
    assert status == 0, report
    assert report["history"]["stages"][0]["n_trainable"] == 4 * 3 + 3  # small_cnn's dense, width 4
    if backend == "torch":
        # A backbone of the user's: xfer's head for the three classes (--head is the default).
        status, report = _run(capsys, *args, "--model", f"{factories}:torch_backbone")
        assert status == 0, report
        head = report["history"]["stages"][0]
        assert head["n_trainable"] == 4 * 3 + 3 and head["kept"] == 6 and head["changed"] == []


@pytest.mark.parametrize(
    "model, message",
    [
        ("nosuchpackage.nets:build", "the module 'nosuchpackage.nets' does not import"),
        ("{f}:missing", "has no 'missing'; expected a function returning a native model"),
        ("{f}:not_a_model", "returned a builtins.int: expected a native model"),
        ("resnet-18", "expected a reference model (small_cnn, resnet18"),
        ("keras:MobileNetV2", "keras.applications models run on Keras: pass --backend keras"),
    ],
)
@pytest.mark.backends("torch")
def test_a_model_that_cannot_be_built_is_one_line(kit, folder, factories, capsys, model, message):
    status, err = _run(
        capsys, "--backend", "torch", "--data", str(folder), "--model", model.format(f=factories)
    )
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], err


# Two backends in one session: Keras's two engines (CI's keras-torch session has both), or
# torch beside flax where both are installed.
@pytest.mark.backends("torch", "keras-torch")
def test_xfer_compare_on_an_image_folder(kit, folder, tmp_path, capsys):
    backend = _backend(kit)
    # A second backend where one is installed (Keras brings its other engine itself).
    others = [b for b in ("torch", "flax") if b != backend and not _config.missing(b)]
    backends = [backend] if backend == "keras" else [backend, *others[:1]]
    args = [f"--backend={b}" for b in backends]
    out = tmp_path / "report"
    assert main(["compare", *args, "--data", str(folder), "--quick", "--quiet",
                 "--out", str(out), "--format", "json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    if len(result["histories"]) < 2:
        pytest.skip("one backend installed: nothing to compare")
    assert result["verdict"] == "agree" and result["largest"]["relative"] < 1e-4
    assert "images" in (out / "report.md").read_text()


@pytest.mark.backends("torch")
def test_the_readme_data_example_is_what_a_fresh_run_prints(kit, tmp_path, monkeypatch, capsys):
    """The README's `xfer run --data` block (scripts/readme_numbers.py wrote it), re-run."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- readme_numbers:run-data -->\n(.*?)<!-- /", readme, re.S)
    assert block, "README.md has no readme_numbers:run-data block"
    commands = re.findall(r"^\$ xfer (.*)$", block.group(1), re.M)
    assert commands[0] == "digits digits" and commands[1].startswith("run --backend torch --data")
    monkeypatch.chdir(tmp_path)
    assert main(commands[0].split()) == 0
    assert main([*commands[1].split(), "--format", "json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data_line = re.search(r"^data: .*$", block.group(1), re.M).group(0)
    assert "data: digits, 10 classes, 240 training and 60 validation images" in data_line
    rows = re.findall(r"^\w+\s+\d+\s+(\d\.\d+)\s+(\d\.\d+)\s+(\d\.\d+)", block.group(1), re.M)
    fresh = [
        (s["epochs"][-1]["loss"], s["epochs"][-1]["val_loss"], s["epochs"][-1]["val_accuracy"])
        for s in report["history"]["stages"]
    ]
    assert len(rows) == len(fresh) == 2
    # The head-only stage reproduces to 1e-4 on any CPU. The unfrozen stage trains a randomly
    # initialised CNN for 20 epochs, which amplifies float reduction order (thread count, the
    # CPU's SIMD kernels): measured 0.800 / 0.833 / 0.867 val acc with 1, 2 threads and another
    # x86 CPU, loss within 0.015, and on an AVX2-only AMD EPYC (Zen 3) loss 0.2827 and val loss
    # 0.4669 against the README's 0.2942 / 0.5171. So it is held to 0.03 loss, 0.1 val loss and
    # 5 of the 60 images, which a wrong BN policy, optimiser or split still breaks (another BN
    # policy on this job: val loss 1.00 to 2.26).
    tolerances = ((0.005, 0.005, 0.005), (0.03, 0.1, 5 / 60))
    for readme_row, now, tolerance in zip(rows, fresh, tolerances, strict=True):
        for said, got, within in zip(map(float, readme_row), now, tolerance, strict=True):
            assert got == pytest.approx(said, abs=within), (
                f"README says {readme_row}, a fresh run gives {now}; "
                "rerun scripts/readme_numbers.py"
            )


@pytest.mark.backends("torch")
def test_xfer_run_data_starts_from_a_weights_file_of_the_whole_model(kit, folder, tmp_path, capsys):
    from xfer import job, save_weights

    images = job.load_data({"path": str(folder)})
    path = tmp_path / "start.safetensors"
    save_weights(job.data_model("torch", "small_cnn", images, seed=5), path)
    args = ["--backend", "torch", "--data", str(folder), "--format", "json"]
    status, loaded = _run(capsys, *args, "--weights", str(path))
    assert status == 0 and loaded["weights"] == "file" and loaded["weights_path"] == str(path)
    status, fresh = _run(capsys, *args)
    assert status == 0 and fresh["weights"] == "random"
    first = [r["history"]["stages"][0]["epochs"][0]["loss"] for r in (loaded, fresh)]
    assert first[0] != first[1]  # seed 5's weights, not seed 0's
    other = tmp_path / "other.safetensors"
    save_weights(job.data_model("torch", "resnet18", images), other)
    status, err = _run(capsys, *args[:-2], "--weights", str(other))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
