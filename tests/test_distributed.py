"""What a distributed run refuses, before anything trains or joins a process group, on every
backend (the 2-process runs themselves: tests/test_distributed_torch.py)."""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from xfer import _config
from xfer import select as S
from xfer.cli import main
from xfer.distributed import World, check_batch_sizes

LAUNCHED = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def _data(n=16):
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8, 3), "float32"), np.arange(n) % 4


def _launched(monkeypatch, **changes):
    for name, value in {**LAUNCHED, **changes}.items():
        monkeypatch.setenv(name, value)


def _unchanged(model):
    return xfer.export_state(model), {k: v.copy() for k, v in xfer.snapshot(model).items()}


def _assert_unchanged(model, before):
    state, tensors = before
    assert xfer.export_state(model) == state
    after = xfer.snapshot(model)
    assert all(np.array_equal(after[k], v) for k, v in tensors.items())


def test_the_shards_of_a_batch_cover_it_once_in_order():
    for n, size in [(16, 2), (5, 2), (7, 3), (4, 4)]:
        parts = [World(r, size).shard(n) for r in range(size)]
        covered = np.concatenate([np.arange(n)[p] for p in parts])
        assert covered.tolist() == list(range(n))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_a_batch_smaller_than_the_world_is_refused():
    check_batch_sizes([2, 2], World(0, 2))
    with pytest.raises(ValueError, match="at least 3 examples, one per process.*has 2"):
        check_batch_sizes([16, 2], World(0, 3))


@pytest.mark.parametrize("setting", ["yes", 1, None])
def test_a_bad_distributed_setting_is_refused_by_name(kit, setting):
    with pytest.raises(ValueError, match="distributed must be 'auto', True or False"):
        xfer.TransferPipeline(kit.model(), [xfer.Stage("all")], distributed=setting)


def test_distributed_true_without_a_launcher_says_how_to_launch(kit, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node N"):
        xfer.TransferPipeline(kit.model(), [xfer.Stage("all")], distributed=True)


def test_a_launcher_environment_without_rank_is_refused(kit, monkeypatch):
    _launched(monkeypatch)
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="RANK not set"):
        xfer.TransferPipeline(kit.model(), [xfer.Stage("all")])


@pytest.mark.backends("keras-jax", "keras-torch", "flax")
def test_keras_and_flax_refuse_a_launch_across_processes_before_training(kit, monkeypatch):
    _launched(monkeypatch)
    model = kit.model()
    before = _unchanged(model)
    pipe = xfer.TransferPipeline(model, [xfer.Stage("head", train=S.path("head.**"))])
    with pytest.raises(ValueError, match="built for the torch backend only.*distributed=False"):
        pipe.fit(_data())
    _assert_unchanged(model, before)
    # distributed=False trains in this one process, launcher or not.
    history = xfer.TransferPipeline(model, [xfer.Stage("all")], distributed=False).fit(_data())
    assert history.processes == 1


def test_devices_that_this_process_does_not_have_are_refused_before_training(kit):
    model = kit.model()
    before = _unchanged(model)
    pipe = xfer.TransferPipeline(model, [xfer.Stage("all")], devices=2)
    with pytest.raises(ValueError, match="devices=2, but the .* backend can shard a batch over 1"):
        pipe.fit(_data())
    _assert_unchanged(model, before)


@pytest.mark.parametrize("devices", [0, -1, 1.5, True, "2"])
def test_a_bad_number_of_devices_is_refused_by_name(kit, devices):
    with pytest.raises(ValueError, match="devices must be a positive integer or None"):
        xfer.TransferPipeline(kit.model(), [xfer.Stage("all")], devices=devices)


def test_devices_with_a_launcher_is_one_too_many(kit, monkeypatch):
    _launched(monkeypatch)
    with pytest.raises(ValueError, match="devices=2 and a launcher's 2 processes"):
        xfer.TransferPipeline(kit.model(), [xfer.Stage("all")], devices=2)


@pytest.mark.backends("torch")
def test_torch_refuses_a_last_batch_too_small_to_split_before_joining(kit, monkeypatch):
    _launched(monkeypatch, WORLD_SIZE="4")
    model = kit.model()
    before = _unchanged(model)
    pipe = xfer.TransferPipeline(model, [xfer.Stage("all")], batch_size=8)
    with pytest.raises(ValueError, match="with 4 processes every batch needs at least 4"):
        pipe.fit(_data(18))  # batches of 8, 8 and 2
    _assert_unchanged(model, before)
    import torch.distributed

    assert not torch.distributed.is_initialized()


def test_the_cli_refuses_an_incomplete_launcher_environment_in_one_line(kit, monkeypatch, capsys):
    backend = _config.flavour(kit.id).backend
    _launched(monkeypatch)
    monkeypatch.delenv("LOCAL_RANK")
    assert main(["run", "--backend", backend, "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LOCAL_RANK not set" in err[0], err


def test_the_cli_refuses_devices_it_does_not_have_in_one_line(kit, capsys):
    backend = _config.flavour(kit.id).backend
    assert main(["run", "--backend", backend, "--devices", "2", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "devices=2, but the" in err[0], err
