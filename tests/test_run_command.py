"""The embedded task, the presets, and the main job ``xfer run`` / ``xfer compare``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xfer import select as S
from xfer.cli import main
from xfer.data import digits
from xfer.pipeline import presets


def test_the_embedded_digits_ship_with_the_package():
    x, y = digits.digits()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y).tolist()[:3] == [178, 182, 177]


def test_the_transfer_task_has_new_classes_a_domain_shift_and_few_labels():
    task = digits.transfer_task(target_per_class=20, seed=0)
    (sx, sy), (tx, ty) = task.source_train, task.target_train
    assert set(sy.tolist()) == set(ty.tolist()) == {0, 1, 2, 3, 4}
    assert len(tx) == 100 and np.bincount(ty).tolist() == [20] * 5
    assert sx.mean() < 0.35 < tx.mean()  # ink inverted: the target is mostly bright
    assert len(task.target_val[0]) == 5 * 180 - 100 + sum(np.bincount(digits.digits()[1])[5:] - 180)
    again = digits.transfer_task(target_per_class=20, seed=0)
    np.testing.assert_array_equal(again.target_train[0], tx)
    with pytest.raises(ValueError, match="target_per_class"):
        digits.transfer_task(target_per_class=0)


def test_presets_build_the_recipes(kit):
    model = kit.model()
    guide = presets.keras_guide()
    assert [(s.name, s.bn, s.mode) for s in guide] == [
        ("head", "frozen", "inference"),
        ("finetune", "affine", None),
    ]
    assert [s.bn for s in presets.fine_tune()] == ["train", "train"]
    assert [repr(s.train) for s in presets.gradual(model)] == ["top(1)", "top(2)"]
    (stage,) = presets.discriminative(model, lr=1.0, decay=2.0)
    ((group, lr),) = stage.lr_groups
    assert lr == 0.5 and set(group.paths(xfer_units(model))) == set(
        S.path("base.**").paths(xfer_units(model))
    )
    with pytest.raises(ValueError, match="expected one of keras_guide, fine_tune"):
        presets.preset("ulmfit", model)


def xfer_units(model):
    from xfer._adapter import find_adapter

    return find_adapter(model).units(model)


def test_xfer_run_starts_from_the_shipped_weights_and_reports(kit, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XFER_CACHE", str(tmp_path))
    backend = kit.id.partition("-")[0]
    args = ["run", "--backend", backend, "--bn", "adapt", "--quick", "--format", "json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["source_weights"] == "shipped" and first["source_accuracy"] > 0.9
    stages = first["history"]["stages"]
    assert [s["name"] for s in stages] == ["head", "finetune"]
    assert all(s["changed"] == [] for s in stages) and stages[0]["kept"] == 8  # base params
    # The base's BN statistics adapt in the head stage, so nothing is cached.
    assert stages[0]["cache"].startswith("off: 'base.block1.bn' behaves differently")
    assert main([*args, "--cache", "off", "--device", "auto"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (
        second["source_weights"] == "shipped" and second["history"]["stages"][0]["cache"] == "off"
    )
    assert second["history"]["device"] == first["history"]["device"] in ("cpu", "cuda")
    assert [e["loss"] for e in second["history"]["stages"][1]["epochs"]] == [
        e["loss"] for e in stages[1]["epochs"]
    ]  # the same run again: the same numbers


def test_xfer_compare_writes_a_report(kit, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XFER_CACHE", str(tmp_path / "cache"))
    backend = kit.id.partition("-")[0]
    out = tmp_path / "report"
    assert (
        main(["compare", "--backend", backend, "--quick", "--out", str(out), "--format", "json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    # One backend (Keras: also its other engine, if installed).
    assert result["verdict"] in ("agree", "nothing to compare")
    assert set(result["backends"][kit.id]) == {"head", "finetune"}
    assert 0.0 < result["backends"][kit.id]["finetune"]["val_loss"] < 10.0
    text = (out / "report.md").read_text()
    assert "| finetune |" in text and "tolerance 0.01" in text


def test_xfer_run_checkpoints_and_resumes(kit, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XFER_CACHE", str(tmp_path / "cache"))
    backend = kit.id.partition("-")[0]
    ckpt = str(tmp_path / "ckpt")
    args = ["run", "--backend", backend, "--quick", "--format", "json", "--checkpoint", ckpt]
    assert main(args) == 0
    done = json.loads(capsys.readouterr().out)["history"]
    assert main([*args, "--resume"]) == 0  # every stage is saved: nothing left to train
    resumed = json.loads(capsys.readouterr().out)["history"]
    assert resumed == done
    assert main(args) == 1  # starting over would overwrite finished work
    assert "resume" in capsys.readouterr().err
    assert main(["run", "--backend", backend, "--resume"]) == 2


def test_xfer_run_recalibrate_says_when_and_checkpoints_it(kit, tmp_path, capsys):
    backend = kit.id.partition("-")[0]
    ckpt = str(tmp_path / "ckpt")
    args = ["run", "--backend", backend, "--quick", "--recalibrate", "--checkpoint", ckpt]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith(", BN statistics re-estimated after the last stage")
    manifest = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert [s.get("recalibrate") for s in manifest["stages"]] == [None, "after"]
    assert main(["run", "--backend", backend, "--quick", "--recalibrate", "before"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("re-estimated before the first stage")
    # Resuming with another --recalibrate is a different run: refused, by name.
    assert main([*args[:-3], "--recalibrate", "before", "--checkpoint", ckpt, "--resume"]) == 1
    assert "recalibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # argparse's usage error, in one line
        main(["run", "--backend", backend, "--recalibrate", "sometimes"])
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


@pytest.mark.backends("keras-jax", "keras-torch")
def test_xfer_compare_runs_keras_on_its_other_engine_too(kit, tmp_path, monkeypatch, capsys):
    from xfer import _config

    other = "torch" if kit.id == "keras-jax" else "jax"
    if not _config.is_installed(other):
        pytest.skip(f"{other} is not installed in this session")
    monkeypatch.setenv("XFER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    args = ["compare", "--backend", "keras", "--quick", "--out", str(out), "--format", "json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["histories"]) == {kit.id, f"keras-{other}"}
    # The same start weights and batches, two engines.
    assert result["verdict"] == "agree" and result["largest"]["relative"] < 1e-4
    assert sorted(result["largest"]["pair"]) == sorted([kit.id, f"keras-{other}"])
