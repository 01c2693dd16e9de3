"""The user's images (xfer.data.images): class folders and .npz, the seeded stratified
split, and every bad input, as an error naming the file or value (one line on the CLI).

No framework is needed: the loader is neutral, and the CLI refuses bad data before any
model is built.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xfer import _config
from xfer.cli import main
from xfer.data import images

# The CLI refuses bad data before any model is built, on whichever backend is installed.
BACKEND = next(b for b in _config.BACKENDS if not _config.missing(b))


def _folder(root, classes=("cat", "dog", "emu"), n=10, size=(12, 12), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (*size, 3) if mode == "RGB" else size
            pixels = rng.integers(0, 40, shape) + 60 * c
            Image.fromarray(pixels.astype(np.uint8), mode).save(root / name / f"{i}.png")
    return root


def test_a_class_folder_tree_loads_sorted_classes_stratified_and_seeded(tmp_path):
    root = _folder(tmp_path / "data", classes=("dog", "cat", "emu"))
    data = images.load(root, val_fraction=0.2, seed=3)
    assert data.classes == ("cat", "dog", "emu")  # sorted, as ImageFolder orders them
    assert data.counts() == {"cat": (8, 2), "dog": (8, 2), "emu": (8, 2)}
    x, y = data.train
    assert x.shape == (24, 12, 12, 3) and x.dtype == np.float32 and y.dtype == np.int64
    # pixels / 255: "dog" (written first, label 1) in [0, 40), "cat" (label 0) in [60, 100)
    assert x[y == 1].max() < 40 / 255 + 1e-6 and x[y == 0].min() >= 60 / 255 - 1e-6
    assert data.normalisation == images.NORMALISATION
    again = images.load(root, val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again.val[0], data.val[0])
    other = images.load(root, val_fraction=0.2, seed=4)
    assert not np.array_equal(other.val[0], data.val[0])
    assert data.describe()["counts"]["dog"] == {"train": 8, "val": 2}


def test_image_size_resizes_and_color_converts(tmp_path):
    root = _folder(tmp_path / "data", classes=("a", "b"), n=3, size=(10, 14))
    data = images.load(root, image_size=(8, 6), color="gray", val_fraction=0.5)
    assert data.image_shape == (8, 6, 1)


def test_an_npz_loads_and_renumbers_its_labels(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((10, 4, 4), np.uint8) + 255, y=np.array([3, 7] * 5))
    data = images.load(path, val_fraction=0.2)
    assert data.classes == ("3", "7") and data.image_shape == (4, 4, 1)
    assert set(data.train[1].tolist()) == {0, 1} and float(data.train[0].max()) == 1.0


def test_corrupt_files_are_skipped_with_one_warning_that_counts_them(tmp_path):
    root = _folder(tmp_path / "data", classes=("a", "b"), n=4)
    (root / "a" / "broken.png").write_bytes(b"not a png")
    (root / "b" / "truncated.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image files \(e.g. .*broken.png\)"):
        data = images.load(root, val_fraction=0.25)
    assert data.skipped == 2 and sum(t + v for t, v in data.counts().values()) == 8


def _bad(root):
    """Each bad input, as (what to write under root, the path to pass, CLI options, message)."""

    def corrupt():
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
            (root / name / "x.png").write_bytes(b"junk")

    def mixed_sizes():
        _folder(root, classes=("a",), n=2, size=(8, 8))
        _folder(root, classes=("b",), n=2, size=(9, 8))

    def gray_beside_rgb():
        _folder(root, classes=("a",), n=2, mode="L")
        _folder(root, classes=("b",), n=2, mode="RGB")

    def npz(**arrays):
        return lambda: (root.mkdir(), np.savez(root / "d.npz", **arrays))

    return {
        "missing dir": (lambda: None, "nowhere", "no such folder or file"),
        "empty folder": (lambda: root.mkdir(), "", "no class folders"),
        "images but no class folders": (
            lambda: Image.new("L", (4, 4)).save(root / "x.png") if root.mkdir() is None else 0,
            "",
            "1 images lie in it directly, e.g. x.png",
        ),
        "one class": (lambda: _folder(root, classes=("only",), n=3), "", "one class folder (only)"),
        "a class with no images": (
            lambda: (_folder(root, classes=("a", "b"), n=2), (root / "c").mkdir()),
            "",
            "c: a class folder with no PNG/JPEG images",
        ),
        "all corrupt": (corrupt, "", "none of the 2 image files could be read"),
        "mixed sizes": (mixed_sizes, "", "is 8x8,"),
        "gray beside rgb": (gray_beside_rgb, "", "pass --color rgb or --color gray"),
        "npz without y": (npz(x=np.zeros((4, 2, 2))), "d.npz", "no array y (it has x)"),
        "npz lengths": (
            npz(x=np.zeros((4, 2, 2)), y=np.arange(3)),
            "d.npz",
            "x has 4 images but y 3 labels",
        ),
        "npz float labels": (
            npz(x=np.zeros((4, 2, 2)), y=np.zeros(4)),
            "d.npz",
            "y must be integer labels",
        ),
        "npz string images": (
            npz(x=np.array([["a"]] * 4), y=np.arange(4)),
            "d.npz",
            "x must be numeric images",
        ),
    }


CASES = list(_bad(None))


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_an_error_naming_the_file_and_the_fix(tmp_path, case, capsys):
    root = tmp_path / "data"
    write, name, message = _bad(root)[case]
    write()
    path = root / name if name else root
    with pytest.raises((ValueError, FileNotFoundError), match=None) as error:
        images.load(path)
    assert message in str(error.value)
    # The CLI: one line naming it, exit 2, before any model is built.
    assert main(["run", "--backend", BACKEND, "--quiet", "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xfer run: ") and message in err[0]
    if case == "mixed sizes":
        assert "--image-size" in err[0] and "is 9x8" in err[0]


def test_bad_data_options_are_one_line(tmp_path, capsys):
    for args, message in (
        (["--val-fraction", "1.5"], "argument --val-fraction: expected a number in (0, 1)"),
        (["--image-size", "0x3"], "argument --image-size: image size must be N or HxW"),
        (["--image-size", "8"], "--image-size apply to your images: pass --data DIR too"),
        (["--model", "resnet18"], "--model resnet18 needs --data DIR"),
    ):
        with pytest.raises(SystemExit) if "argument" in message else _no_exit():
            status = main(["run", "--backend", BACKEND, "--quiet", *args])
            assert status == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_digits_command_writes_class_folders_that_load(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["digits", str(out), "--per-class", "3"]) == 0
    data = images.load(out, val_fraction=1 / 3)
    assert data.classes == tuple(map(str, range(10))) and data.image_shape == (8, 8, 1)
    assert data.counts()["7"] == (2, 1)
    assert main(["digits", str(out)]) == 2  # refuses to mix a second draw into the first
    assert "exists" in capsys.readouterr().err
