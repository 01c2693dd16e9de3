"""The user's own images: a folder with one sub-folder per class, or an ``.npz`` with
``x`` and ``y``, as channels-last float32 arrays with a seeded, stratified split.

Classes are the sorted sub-folder names, as torchvision's ``ImageFolder`` and Keras's
``image_dataset_from_directory`` order them, so label ``i`` means the same class to all
three. Images are decoded and resized with Pillow (nothing hand-parsed) and scaled from
8-bit pixels to [0, 1] (:data:`NORMALISATION`); an ``.npz`` of floats is taken as it is.
Nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg")
COLORS = ("rgb", "gray")
NORMALISATION = "pixels / 255 (8-bit images to [0, 1])"
# Pillow modes by the number of channels they decode to (the rest, e.g. CMYK, go to RGB).
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclasses.dataclass(frozen=True)
class ImageData:
    """Images and labels, split; ``classes[i]`` is the name of label ``i``."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    classes: tuple[str, ...]
    source: str  # the folder or file they came from
    normalisation: str
    skipped: int = 0  # unreadable image files left out

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train[0].shape[1:])

    def counts(self) -> dict[str, tuple[int, int]]:
        """Training and validation images per class name."""
        train = np.bincount(self.train[1], minlength=self.num_classes)
        val = np.bincount(self.val[1], minlength=self.num_classes)
        return {c: (int(t), int(v)) for c, t, v in zip(self.classes, train, val, strict=True)}

    def describe(self) -> dict:
        """What the run's report says of its data (json-ready)."""
        return {
            "source": self.source,
            "classes": list(self.classes),
            "counts": {c: {"train": t, "val": v} for c, (t, v) in self.counts().items()},
            "image_shape": list(self.image_shape),
            "normalisation": self.normalisation,
            "skipped": self.skipped,
        }


def parse_image_size(text: str) -> tuple[int, int]:
    """``--image-size``: ``N`` (square) or ``HxW``, in pixels.

    Example:
        >>> parse_image_size("32"), parse_image_size("24x32")
        ((32, 32), (24, 32))
    """
    parts = str(text).lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image size must be N or HxW in pixels (e.g. 32 or 24x32), got {text!r}.")
    return size


def load(
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    color: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> ImageData:
    """Load a class-folder tree or an ``.npz`` (``x``: images, ``y``: integer labels) and
    split it, per class, ``val_fraction`` to validation (seeded).

    Args:
        path: a folder with one sub-folder of PNG/JPEG images per class, or an ``.npz``.
        image_size: ``(height, width)`` to resize every image to (Pillow, bilinear);
            ``None``: the images must all be one size.
        color: ``"rgb"`` or ``"gray"`` to convert every image; ``None``: they must agree.
        val_fraction: the share of each class that validates, in (0, 1).
        seed: draws the split.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: what the folder or file holds cannot be a classification data set
            (the message names the file or class and the fix).

    Example:
        >>> data = load("my_images/", image_size=(32, 32))   # doctest: +SKIP
        >>> data.classes, data.train[0].shape                 # doctest: +SKIP
        (('cats', 'dogs'), (80, 32, 32, 3))
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), e.g. 0.2, got {val_fraction!r}.")
    if color is not None and color not in COLORS:
        raise ValueError(f"color must be one of {', '.join(COLORS)}, got {color!r}.")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such folder or file. Expected a folder with one sub-folder of "
            "images per class, or an .npz with arrays x and y."
        )
    if path.is_dir():
        x, y, classes, skipped = _folder(path, image_size, color)
        normalisation = NORMALISATION
    else:
        x, y, classes = _npz(path, image_size, color)
        normalisation = NORMALISATION if x.dtype == np.uint8 else "none (floats as in the .npz)"
        skipped = 0
    x = x.astype("float32") / 255.0 if x.dtype == np.uint8 else x.astype("float32")
    train, val = split(y, val_fraction, seed)
    if len(val) == 0:
        raise ValueError(
            f"{path}: too few images for a validation split ({len(y)}, --val-fraction "
            f"{val_fraction}): add images, or raise --val-fraction."
        )
    return ImageData(
        (x[train], y[train]), (x[val], y[val]), classes, str(path), normalisation, skipped
    )


def split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified split: of each class's images, ``round(val_fraction * n)``
    validate (at least one when the class has two or more), the rest train.

    Example:
        >>> y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
        >>> train, val = split(y, 0.2, seed=0)
        >>> len(train), len(val), y[val].tolist()
        (8, 2, [0, 1])
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.array(train, "int64")), np.sort(np.array(val, "int64"))


def _folder(root: Path, image_size, color) -> tuple[np.ndarray, np.ndarray, tuple, int]:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p.name for p in root.iterdir() if p.suffix.lower() in EXTENSIONS]
    if not classes:
        where = f" ({len(loose)} images lie in it directly, e.g. {loose[0]})" if loose else ""
        raise ValueError(
            f"{root}: no class folders{where}. Expected one sub-folder of PNG/JPEG images "
            "per class, e.g. DIR/cats/1.png and DIR/dogs/2.png."
        )
    if len(classes) == 1:
        raise ValueError(
            f"{root}: one class folder ({classes[0]}): a classifier needs two or more, "
            "one sub-folder of images per class."
        )
    images, labels, bad = [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise ValueError(
                f"{root / name}: a class folder with no PNG/JPEG images "
                f"({', '.join(EXTENSIONS)}): add images or remove the folder."
            )
        for file in files:
            try:
                with Image.open(file) as image:
                    image.load()
                    images.append((file, image.copy()))
            except (OSError, SyntaxError, ValueError):  # what Pillow raises on a bad file
                bad.append(file)
                continue
            labels.append(label)
    if not images:
        raise ValueError(
            f"{root}: none of the {len(bad)} image files could be read (e.g. {bad[0]}): "
            "are they PNG/JPEG images?"
        )
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image file{'s' * (len(bad) > 1)} (e.g. {bad[0]})",
            stacklevel=2,
        )
    color = color or _one_color(images)
    size = image_size or _one_size(images)
    arrays = []
    for _, image in images:
        image = image.convert("L" if color == "gray" else "RGB")
        if (image.height, image.width) != tuple(size):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(arrays), np.array(labels, "int64"), tuple(classes), len(bad)


def _one_color(images: list) -> str:
    gray = [f for f, i in images if i.mode in _GRAY_MODES]
    rgb = [f for f, i in images if i.mode not in _GRAY_MODES]
    if gray and rgb:
        raise ValueError(
            f"grayscale and color images are mixed (e.g. {gray[0]} is grayscale, {rgb[0]} "
            "is color): pass --color rgb or --color gray to convert them all."
        )
    return "gray" if gray else "rgb"


def _one_size(images: list) -> tuple[int, int]:
    first, image = images[0]
    for file, other in images[1:]:
        if other.size != image.size:
            raise ValueError(
                f"images of different sizes, height x width ({first} is "
                f"{image.height}x{image.width}, {file} is {other.height}x{other.width}): "
                "pass --image-size N (or HxW) to resize them all."
            )
    return image.height, image.width


def _npz(path: Path, image_size, color) -> tuple[np.ndarray, np.ndarray, tuple]:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: not a readable .npz ({error}). Expected a folder of class folders, "
            "or np.savez(path, x=images, y=labels)."
        ) from error
    missing = [k for k in ("x", "y") if k not in arrays.files]
    if missing:
        raise ValueError(
            f"{path}: no array {' or '.join(missing)} (it has {', '.join(arrays.files) or 'none'}). "
            "Expected np.savez(path, x=images (N, H, W[, C]), y=integer labels (N,))."
        )
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype.kind not in "uif" or not 1 <= x.shape[-1] <= 4:
        raise ValueError(
            f"{path}: x must be numeric images (N, H, W) or channels-last (N, H, W, C), "
            f"got {x.dtype} {x.shape}."
        )
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: y must be integer labels of shape (N,), got {y.dtype} {y.shape}."
        )
    if len(x) != len(y):
        raise ValueError(
            f"{path}: x has {len(x)} images but y {len(y)} labels: one label per image."
        )
    if image_size is not None or color is not None:
        raise ValueError(
            f"{path}: --image-size and --color apply to image folders; resize and convert "
            "the .npz's arrays before saving them."
        )
    labels = np.unique(y)
    if len(labels) < 2:
        raise ValueError(
            f"{path}: y has one class ({labels.tolist()}): a classifier needs two or more."
        )
    # Labels as given may skip values (e.g. 1, 3): renumbered in sorted order, named by value.
    return x, np.searchsorted(labels, y).astype("int64"), tuple(str(v) for v in labels)


def write_folders(
    x: np.ndarray, y: np.ndarray, classes: tuple[str, ...], directory: str | os.PathLike
) -> Path:
    """Write images in [0, 1] (channels-last, 1 or 3 channels) as 8-bit PNG files in one
    sub-folder per class (``directory/<class>/<index>.png``): the layout :func:`load` reads.

    Example:
        >>> import tempfile
        >>> x = np.zeros((4, 8, 8, 1), "float32")
        >>> root = write_folders(x, np.array([0, 0, 1, 1]), ("a", "b"), tempfile.mkdtemp())
        >>> load(root, val_fraction=0.5).counts()
        {'a': (1, 1), 'b': (1, 1)}
    """
    from PIL import Image

    root = Path(directory)
    pixels = np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, y, strict=True)):
        folder = root / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            folder / f"{index:05d}.png"
        )
    return root
