"""xfer's one file writer: atomic, fsynced, and arrays in the element order they have."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from xfer import files


def awkward_arrays() -> dict[str, np.ndarray]:
    """Arrays whose memory is not laid out as C order, as adapters hand them out."""
    base = np.arange(24, dtype="float32").reshape(2, 3, 4)
    return {
        "transposed": base.transpose(2, 0, 1),  # torch OIHW -> HWIO is a view like this
        "fortran": np.asfortranarray(np.arange(12, dtype="float64").reshape(3, 4)),
        "negative_stride": np.arange(10, dtype="int64")[::-2],
        "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
        "big_endian_transposed": np.arange(6, dtype=">i4").reshape(2, 3).T,
        "zero_d": np.array(3.5, dtype="float32"),
        "empty": np.zeros((0, 3), "float32"),
    }


def test_awkward_arrays_round_trip_bit_identical(tmp_path):
    arrays = awkward_arrays()
    path = tmp_path / "a.safetensors"
    digest = files.write_arrays(path, arrays, {"format": "test"})
    loaded = load_file(str(path))
    assert set(loaded) == set(arrays)
    for key, array in arrays.items():
        got = loaded[key]
        assert got.shape == array.shape, key
        assert got.dtype == array.dtype.newbyteorder("="), key
        np.testing.assert_array_equal(got, array, err_msg=key)
    files.verify_digest(path, digest)


def test_safetensors_alone_may_scramble_a_transposed_array(tmp_path):
    """The hazard the writer guards against: without ``canonical_array`` the round trip
    above fails on safetensors 0.8 (issue #825). If a later safetensors fixes it, this
    test says so and the guard stays harmless."""
    from safetensors.numpy import save_file

    transposed = np.arange(24, dtype="float32").reshape(2, 3, 4).transpose(2, 0, 1)
    path = tmp_path / "raw.safetensors"
    save_file({"t": transposed}, str(path))
    if np.array_equal(load_file(str(path))["t"], transposed):
        pytest.skip("this safetensors writes non-contiguous arrays correctly")
    # The writer, on the same array, is right.
    files.write_arrays(path, {"t": transposed})
    np.testing.assert_array_equal(load_file(str(path))["t"], transposed)


def test_canonical_array_keeps_shape_values_and_zero_d():
    for key, array in awkward_arrays().items():
        out = files.canonical_array(array)
        assert out.flags.c_contiguous and out.dtype.isnative, key
        assert out.shape == array.shape, key
        np.testing.assert_array_equal(out, array, err_msg=key)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    files.write_text(path, "old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.md"]


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    files.write_json(tmp_path / "m.json", {"a": 1})
    # The file, then the rename, then (POSIX) the directory entry.
    assert events[:2] == ["fsync", "replace"]
    if os.name == "posix":
        assert events[2:] == ["fsync"]


def test_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        files.write_text(tmp_path / "nope" / "x.md", "x")
    assert os.listdir(tmp_path) == []


def test_verify_digest_catches_a_flipped_bit_and_a_truncation(tmp_path):
    path = tmp_path / "w.safetensors"
    digest = files.write_arrays(path, {"w": np.ones((4, 4), "float32")})
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(files.CorruptFile, match="not the file that was written"):
        files.verify_digest(path, digest)
    path.write_bytes(bytes(data[:-8]))
    with pytest.raises(files.CorruptFile):
        files.verify_digest(path, digest)


def test_nothing_else_in_xfer_writes_safetensors_or_renames_files():
    """One writer: no other module calls save_file or os.replace (the compare handoff once
    did, and a transposed view went to disk scrambled)."""
    root = os.path.dirname(files.__file__)
    backends = os.path.join(os.path.dirname(root), "backends")
    offenders = []
    for top in (root, backends):
        for directory, _, names in os.walk(top):
            for name in names:
                if not name.endswith(".py") or os.path.join(directory, name) == files.__file__:
                    continue
                text = open(os.path.join(directory, name), encoding="utf-8").read()
                for needle in ("save_file", "os.replace", "os.rename"):
                    if needle in text:
                        offenders.append(f"{name}: {needle}")
    assert offenders == []


def test_a_written_file_gets_the_mode_of_a_plain_open_or_of_the_file_it_replaces(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = files.write_text(tmp_path / "report.md", "x")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600
    os.chmod(written, 0o640)
    files.write_text(written, "y")
    assert written.stat().st_mode & 0o777 == 0o640
