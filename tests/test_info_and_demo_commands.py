"""The command line: ``xfer info`` and the main job ``xfer demo``."""

from __future__ import annotations

import json

from xfer.cli import main


def test_info_reports_backends_as_json(capsys):
    assert main(["info", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["backends"]) == {"torch", "keras", "flax"}


def test_demo_keeps_every_promised_tensor_and_learns(kit, capsys):
    backend = kit.id.partition("-")[0]
    assert main(["demo", "--backend", backend, "--format", "json"]) == 0
    stages = json.loads(capsys.readouterr().out)[backend]
    assert [s["stage"] for s in stages] == ["pretrain", "head", "finetune"]
    head, finetune = stages[1], stages[2]
    assert head["kept"] == 12 and head["changed"] == []  # 2 convs x2, 2 BN x (2 params + 2 stats)
    assert finetune["kept"] == 4 and finetune["changed"] == []  # BN "affine": statistics only
    assert head["n_frozen"] == 840 and finetune["n_frozen"] == 0
    assert finetune["accuracy"] > 0.5  # four classes: chance is 0.25


def test_progress_draws_a_bar_per_stage_and_lines_for_the_rest(monkeypatch):
    import io
    import sys

    from xfer.cli.progress import TerminalProgress
    from xfer.pipeline import EpochProgress

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    progress = TerminalProgress()
    for epoch in (1, 2, 3):
        progress(EpochProgress("head", epoch, 3))
    progress("probing torch")
    progress.close()
    text = err.getvalue()
    assert "head:" in text and "2/3" in text and "epoch" in text
    assert "  ... probing torch" in text
