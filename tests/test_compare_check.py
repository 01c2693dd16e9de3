"""The agreement check of ``xfer compare`` (xfer.compare) and its report (xfer.cli.report),
on hand-built histories and on real training runs of the session's backend."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from xfer import compare
from xfer.cli import report
from xfer.pipeline import EpochRecord, History, StageRecord

# The check's mechanics at a tolerance tighter than the default (1e-2, set for how far
# float32 rounding grows on a long job on some CPUs): the differences below are built for it.
TIGHT = 1e-4


def _history(backend: str, head: list[float], finetune: list[float], acc: float = 0.5):
    """Two stages; each epoch's validation loss is its training loss + 0.1."""

    def stage(name, losses):
        epochs = [EpochRecord(i + 1, x, x + 0.1, acc, 0.01) for i, x in enumerate(losses)]
        return StageRecord(name, 10, 90, 4, [], epochs)

    return History(backend, [stage("head", head), stage("finetune", finetune)])


AGREEING = {
    "torch": _history("torch", [1.6, 1.4], [1.3, 1.2]),
    "keras-jax": _history("keras-jax", [1.6 + 4e-6, 1.4], [1.3, 1.2 - 2e-6]),
    "flax": _history("flax", [1.6, 1.4 + 1e-6], [1.3, 1.2]),
}


def test_backends_within_tolerance_agree_and_the_largest_difference_is_named():
    verdict = compare.check(AGREEING, TIGHT)
    assert verdict.status == "agree" and verdict.exit_status == 0 and verdict.first is None
    assert verdict.largest.pair == "keras-jax vs torch"
    assert verdict.largest.stage == "head" and verdict.largest.epoch == 1
    assert verdict.largest.relative == pytest.approx(4e-6 / (1.6 + 4e-6), rel=1e-3)
    assert verdict.largest_per_stage["finetune"].relative == pytest.approx(2e-6 / 1.2, rel=1e-3)
    assert "agree to within tolerance 0.0001" in verdict.summary()


def test_one_backend_off_is_named_with_its_stage_epoch_and_values_and_exits_1():
    off = {**AGREEING, "keras-torch": _history("keras-torch", [1.6, 38.46], [1.3, 1.2])}
    verdict = compare.check(off, TIGHT)
    assert verdict.status == "diverged" and verdict.exit_status == 1
    first = verdict.first
    assert (first.pair, first.stage, first.epoch, first.metric) == (
        "keras-torch vs torch",
        "head",
        2,
        "loss",
    )
    assert first.relative == pytest.approx((38.46 - 1.4) / 38.46)
    assert verdict.summary() == (
        "keras-torch vs torch diverged in stage 'head', epoch 2: loss 38.46 vs 1.4 "
        "(relative 0.96 > tolerance 0.0001)"
    )
    data = verdict.to_dict()
    assert data["verdict"] == "diverged" and data["first_divergence"]["pair"] == [
        "keras-torch",
        "torch",
    ]
    assert data["largest_per_stage"]["finetune"]["relative"] < 1e-5


def test_a_real_disagreement_of_8e_2_is_caught_and_a_looser_tolerance_lets_it_pass():
    off = {**AGREEING, "flax": _history("flax", [1.6, 1.4], [1.3 * 1.08, 1.2])}
    assert compare.check(off, TIGHT).first.stage == "finetune"
    assert compare.check(off, tolerance=0.1).status == "agree"


def test_the_first_divergence_in_training_order_wins_over_the_largest():
    off = {
        "torch": _history("torch", [1.6, 1.4], [1.3, 1.2]),
        "flax": _history("flax", [1.6, 1.4 * 1.01], [1.3, 1.2 * 2]),
    }
    verdict = compare.check(off, TIGHT)
    assert (verdict.first.stage, verdict.first.epoch) == ("head", 2)
    assert (verdict.largest.stage, verdict.largest.epoch) == ("finetune", 2)


def test_validation_accuracy_counts_and_near_zero_values_compare_against_the_floor():
    off = {
        "torch": _history("torch", [1.6, 1.4], [1.3, 1.2], acc=0.5),
        "flax": _history("flax", [1.6, 1.4], [1.3, 1.2], acc=0.51),
    }
    first = compare.check(off, TIGHT).first
    assert (first.stage, first.metric, first.epoch) == ("head", "val acc", 2)
    assert compare.relative_difference(0.0, 5e-7) == pytest.approx(5e-5)  # tiny: not a ratio of 1
    assert compare.relative_difference(0.0, 2e-6) > TIGHT


def test_a_nan_never_passes_as_agreement():
    assert compare.relative_difference(math.nan, 1.0) == math.inf
    off = {**AGREEING, "flax": _history("flax", [1.6, math.nan], [1.3, 1.2])}
    assert compare.check(off, TIGHT).first.pair == "flax vs torch"


def test_one_backend_is_nothing_to_compare_and_exits_0():
    verdict = compare.check({"torch": AGREEING["torch"]}, TIGHT)
    assert verdict.status == "nothing to compare" and verdict.exit_status == 0
    assert verdict.largest is None and "nothing to compare" in verdict.summary()


def test_histories_of_different_runs_and_bad_tolerances_are_refused_by_name():
    short = _history("flax", [1.6], [1.3, 1.2])
    with pytest.raises(ValueError, match=r"flax and torch did not run the same .*head x1"):
        compare.check({"torch": AGREEING["torch"], "flax": short})
    for bad in (-1e-4, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite number >= 0"):
            compare.check(AGREEING, tolerance=bad)


def test_final_metrics_are_per_backend_and_stage():
    metrics = compare.final_metrics(AGREEING)
    assert metrics["torch"]["finetune"] == {"loss": 1.2, "val_loss": 1.3, "val_accuracy": 0.5}
    assert set(metrics) == set(AGREEING)


def test_the_report_marks_the_divergence_in_markdown_and_on_the_plot(tmp_path):
    off = {**AGREEING, "keras-torch": _history("keras-torch", [1.6, 38.46], [1.3, 1.2])}
    written = report.write_compare_report(off, tmp_path, "compare", compare.check(off, TIGHT))
    text = (tmp_path / "report.md").read_text()
    assert "**DIVERGED**: keras-torch vs torch diverged in stage 'head', epoch 2" in text
    assert report.divergence_epoch(off, compare.check(off, TIGHT).first) == 2
    plot = tmp_path / "loss_curves.png"
    if plot in written:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        clean = tmp_path / "clean"
        report.write_compare_report(AGREEING, clean, "compare")
        # The marker and its annotation change the image.
        assert (clean / "loss_curves.png").read_bytes() != plot.read_bytes()
        assert "**AGREE**" in (clean / "report.md").read_text()


def test_a_perturbed_start_on_real_training_is_caught(kit):
    """The same backend twice, once from a start with the head scaled by 1.5: real training
    gives different numbers, and the check names that pair in the first stage."""
    from xfer import job

    backend = kit.id.partition("-")[0]
    start = job.start_weights(backend, None, seed=0)
    perturbed = {k: v * 1.5 if k.startswith("head.") else v for k, v in start.items()}
    options = dict(preset="keras_guide", bn=None, seed=0, quick=True)
    same, _ = job.transfer(backend, start, **options)
    again, _ = job.transfer(backend, {k: np.array(v) for k, v in start.items()}, **options)
    off, _ = job.transfer(backend, perturbed, **options)
    assert compare.check({"a": same, "b": again}, TIGHT).status == "agree"
    verdict = compare.check({"a": same, "b-perturbed": off}, TIGHT)
    assert verdict.exit_status == 1
    assert (verdict.first.pair, verdict.first.stage, verdict.first.epoch) == (
        "b-perturbed vs a",
        "head",
        1,
    )
    assert verdict.first.relative > 1e-3  # far past float32 noise, not a near miss
    json.dumps(verdict.to_dict())  # what --format json prints


def test_accuracies_are_compared_in_absolute_terms_against_their_own_tolerance():
    """Two of 796 validation images flipping at the decision boundary (0.687 vs 0.690,
    losses equal) is float32 rounding, not a disagreement; two points apart is one."""
    near = {
        "torch": _history("torch", [1.6, 1.4], [1.3, 1.2], acc=0.6872),
        "flax": _history("flax", [1.6, 1.4], [1.3, 1.2], acc=0.6897),
    }
    verdict = compare.check(near, TIGHT)
    assert verdict.status == "agree", verdict.summary()
    assert verdict.largest_accuracy_gap.absolute == pytest.approx(0.0025)
    assert "accuracies within 0.0025" in verdict.summary()
    far = {**near, "flax": _history("flax", [1.6, 1.4], [1.3, 1.2], acc=0.7072)}
    verdict = compare.check(far, TIGHT)
    assert verdict.status == "diverged" and verdict.first.metric == "val acc"
    assert "(apart 0.02 > accuracy tolerance 0.005)" in verdict.summary()
    assert compare.check(far, accuracy_tolerance=0.05).status == "agree"
    assert verdict.to_dict()["accuracy_tolerance"] == 0.005
    with pytest.raises(ValueError, match="accuracy_tolerance must be a finite number >= 0"):
        compare.check(near, accuracy_tolerance=-1)
