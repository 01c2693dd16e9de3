"""The main job on the user's images and model (``xfer run --data DIR --model M``): load
and split the data, build the model for its classes, check everything, then run the
preset's stages, as :func:`xfer.job.run` does on the embedded digits. The data and model
parts are :func:`xfer.job.load_data` and :func:`xfer.job.data_model`, which ``xfer compare
--data`` (:func:`xfer.job.transfer_on_backends`) shares.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

from xfer.data import images as images_data
from xfer.export import check_export_path
from xfer.job import data_model, export_after, load_data, pipeline_for, transfer_pipeline
from xfer.pipeline import History
from xfer.weights import load_weights


def _imagenet_ready(model: str, images: images_data.ImageData) -> images_data.ImageData:
    """``images`` as a keras.applications model's ImageNet weights expect them (Keras only:
    see ``xfer.backends.keras.models.imagenet_preprocessing``)."""
    from xfer.backends.keras.models import imagenet_preprocessing

    preprocess, said = imagenet_preprocessing(model.partition(":")[2])
    (tx, ty), (vx, vy) = images.train, images.val
    return dataclasses.replace(
        images, train=(preprocess(tx), ty), val=(preprocess(vx), vy), normalisation=said
    )


@dataclasses.dataclass
class DataRunResult:
    backend: str
    preset: str
    bn: str | None
    model: str  # as --model named it
    weights: str  # "random" (seeded), "imagenet" (downloaded by Keras) or "file"
    weights_path: str | None  # the file of --weights PATH
    data: dict  # xfer.data.images.ImageData.describe(): classes, counts, normalisation
    history: History
    recalibrate: str | None = None  # as xfer.job.RunResult.recalibrate
    export: str | None = None  # the ONNX file written (xfer run --export)


def run_on_data(
    backend: str,
    data: dict,
    *,
    model: str = "small_cnn",
    head: bool | None = None,
    weights: str | os.PathLike | None = None,
    resume: bool = False,
    export: str | os.PathLike | None = None,
    **options: Any,
) -> DataRunResult:
    """The main job on the user's images and model: load and split ``data`` (see
    :func:`load_data`), build ``model`` for its classes (see :func:`data_model`), check
    everything, then run the preset's stages. Nothing trains before all of it is checked.

    Args:
        backend: the framework to run on.
        data: ``{"path": DIR or .npz, "image_size": (h, w), "color": ..., "val_fraction": ...}``.
        model, head: see :func:`data_model`.
        weights: ``"imagenet"`` (a ``keras:`` model), or a file of neutral weights of the
            whole model (``xfer.save_weights``); ``None``: seeded random weights.
        resume: continue the run saved in ``checkpoint_dir``.
        export: an ``.onnx`` file to write the trained model to (:func:`export_after`).
        **options: ``preset``, ``bn``, ``seed``, ``progress``, ``quick``,
            ``checkpoint_dir``, ``cache``, ``device``, ``devices``, ``precision``,
            ``recalibrate``, as for
            :func:`transfer_pipeline`.

    Example:
        >>> result = run_on_data("torch", {"path": "my_images/"}, quick=True)   # doctest: +SKIP
        >>> result.data["classes"], result.history.ok                            # doctest: +SKIP
        (['cats', 'dogs'], True)
    """
    bound = inspect.signature(transfer_pipeline).bind(backend, **options)
    bound.apply_defaults()
    arguments = bound.arguments
    images = load_data(data, arguments["seed"])
    download = "imagenet" if weights == "imagenet" else None
    net = data_model(backend, model, images, seed=arguments["seed"], head=head, weights=download)
    if weights is not None and download is None:
        load_weights(net, weights)  # a file of this model's neutral weights
    if download and images.normalisation == images_data.NORMALISATION:
        images = _imagenet_ready(model, images)
    pipe = pipeline_for(
        net,
        arguments["preset"],
        arguments["bn"],
        arguments["seed"],
        arguments["quick"],
        arguments["progress"],
        checkpoint_dir=arguments["checkpoint_dir"],
        cache=arguments["cache"],
        device=arguments["device"],
        devices=arguments["devices"],
        precision=arguments["precision"],
        recalibrate=arguments["recalibrate"],
    )
    pipe.check(images.train, images.val, resume=resume)
    if export is not None:
        check_export_path(export, backend)
    history = pipe.fit(images.train, images.val, resume=resume)
    origin = "random" if weights is None else (download or "file")
    path = os.fspath(weights) if origin == "file" else None
    return DataRunResult(
        backend,
        arguments["preset"],
        arguments["bn"],
        model,
        origin,
        path,
        images.describe(),
        history,
        arguments["recalibrate"],
        export_after(net, history, export, images.train[0].shape[1:]),
    )
