"""The public operations, one per CLI command.

Each imports what it needs when it runs, so that `headstart info` or `check` never pays for NumPy
models, ONNX Runtime or PyTorch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.backbone import BackboneInfo, create_backbone, list_backbones
from headstart.bundle import REPORT_NAME, BundleContents, backbone_weights_files, read_bundle
from headstart.config import Progress, default_cache_dir
from headstart.data import Skipped, list_images, load_dataset, load_image
from headstart.errors import ConfigError, DataError, FileRefusedError, UnreadableImageError
from headstart.files import atomic_write_bytes, csv_bytes, display, output_file, output_folder
from headstart.triage import Triage, triage

if TYPE_CHECKING:
    from headstart.augment import AugmentConfig
    from headstart.cache import ExtractSummary
    from headstart.compare import Comparison, HeadName
    from headstart.gradcam import Explanations
    from headstart.model import EvaluationResult, ImageLike, Model, PathLike, Prediction, Predictions, UnknownOption
    from headstart.model_export import ExportFormat, ExportResult
    from headstart.suspects import SuspectSearch
    from headstart.training import train

__all__ = [
    "activations",
    "check",
    "check_labels",
    "compare",
    "augment_preview",
    "backbones",
    "demo",
    "evaluate",
    "explain",
    "export",
    "extract",
    "imagenet",
    "imagenet_grid",
    "predict",
    "report",
    "save_predictions",
    "save_predictions_csv",
    "save_predictions_parquet",
    "serve",
    "train",
]


def check(data: PathLike, val_split: float = 0.2, seed: int = 0, progress: Progress | None = None) -> Triage:
    """Every problem in a dataset with its fix: what `train` would skip, convert, or warn about, and whether it can train."""
    return triage(data, val_split, seed, progress=progress)


def check_labels(
    data: PathLike,
    backbone: str = "efficientnet_lite0",
    model: PathLike | None = None,
    seed: int = 0,
    cache_dir: PathLike | None = None,
    progress: Progress | None = None,
) -> SuspectSearch:
    """The images most likely mislabelled, from out-of-fold predictions of a cross-validated head (cleanlab).

    With `model`, its backbone (name, stage, weights file) and head settings are used instead of `backbone`.

    Raises:
        DataError: the data cannot be read, or a class has fewer than 2 usable images.
        ConfigError: `model` has a fine-tuned backbone, whose features are not cached.
    """
    from headstart.suspects import suspects_for_data

    if model is None:
        return suspects_for_data(data, backbone, cache_dir, seed, progress)
    config = read_bundle(Path(model), load_weights=False).config
    if len(config.backbones) > 1:
        raise ConfigError(
            f"{display(model)} is an ensemble ({config.backbone_name}); give one of its backbones with --backbone instead of --model."
        )
    (recorded,) = config.backbones
    if recorded.finetuned_from is not None:
        raise ConfigError(
            f"{display(model)} has a fine-tuned backbone; give --backbone {recorded.name} (its pretrained weights) instead of --model."
        )
    (weights,) = backbone_weights_files(Path(model), config)  # the folder's own copy, never a path it names elsewhere
    return suspects_for_data(data, recorded.name, cache_dir, seed, progress, recorded.layer, config.head, weights)


def compare(
    data: PathLike,
    backbones: Sequence[str] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
    ensembles: bool = True,
    heads: Sequence[HeadName] = ("linear", "mlp"),
    layers: Sequence[int | None] = (None,),
    folds: int = 5,
    seed: int = 0,
    csv: PathLike | None = None,
    html: PathLike | None = None,
    train_best: bool = False,
    out: PathLike | None = None,
    force: bool = False,
    cache_dir: PathLike | None = None,
    progress: Progress | None = None,
) -> Comparison:
    """A leaderboard of backbones (and their ensemble) x heads x layers by k-fold cross-validated accuracy (see `compare.compare`).

    Writes every row to `csv`, a page with a bar chart to `html`, and with `train_best`
    trains the winner with `train` and saves it to `out`. Output paths are checked
    before any work starts.

    Raises:
        ConfigError: an output path that is not a new .csv/.html file outside the data, or `train_best` without `out`.
        BundleError: `out` is a folder of other files (pass `force`).
    """
    from headstart.bundle import check_output_folder
    from headstart.compare import Comparison, write_csv, write_html
    from headstart.compare import compare as compare_rows

    inputs = [Path(data).expanduser()]
    csv_path = output_file(Path(csv), ".csv", inputs, force) if csv is not None else None
    html_path = output_file(Path(html), ".html", inputs, force) if html is not None else None
    if train_best != (out is not None):
        raise ConfigError("--train-best saves the winner to --out: give both, or neither.")
    if out is not None:
        check_output_folder(Path(out), force)
    board = compare_rows(data, backbones, ensembles, heads, layers, folds, seed, cache_dir, progress=progress)
    written = Comparison(board, write_csv(board, csv_path) if csv_path else None, write_html(board, html_path) if html_path else None)
    if out is None:
        return written
    from headstart.training import train

    best = board.best
    model = train(
        data,
        backbone=best.backbone,
        head=best.head,
        layer=best.layer,
        seed=seed,
        out=out,
        force=force,
        cache_dir=cache_dir,
        progress=progress,
    )
    return Comparison(board, written.csv, written.html, model, Path(out))


def extract(
    data: PathLike,
    backbone: str = "efficientnet_lite0",
    layer: int | None = None,
    weights: PathLike | None = None,
    ray: bool = False,
    address: str | None = None,
    cache_dir: PathLike | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> ExtractSummary:
    """Compute the backbone's features of every image in `data` into the feature cache, here or on a Ray cluster;
    `train` (and `compare`, `check --labels`) on the same photos then reads them and runs no image through the backbone.

    Args:
        data: a folder with one sub-folder per class (or train/ and val/), or a CSV of path,label: the
            images `train` would read. With `ray`, also a URI that pyarrow's filesystems read
            (`s3://bucket/photos/`, `gs://bucket/photos/`): every image under it, recursively.
        backbone, layer, weights: as for `train`; an ensemble ("a+b") fills each member's cache.
        ray: compute on Ray (`pip install 'headstart[ray]'`): each Ray worker runs headstart's decoding and
            ONNX engine, so the features are those a local run computes.
        address: the Ray cluster (`ray://HEAD:10001`, or `auto` on one of its nodes); default `$RAY_ADDRESS`,
            else a local Ray on this machine's CPUs.
        cache_dir: the feature cache (default: `default_cache_dir()`); with `ray`, on the machine running this.
        batch_size: images per forward pass (default 32), or with `ray` per Ray task (default 64).

    Raises:
        DataError: no images found, or the URI cannot be listed.
        ConfigError: `address` without `ray`, a URI without `ray`, Ray not installed, or a cluster that cannot be reached.
    """
    from headstart.backbone import create_backbones, ensemble_name
    from headstart.cache import CachedExtraction, ExtractSummary, FeatureCache, extract_with_cache
    from headstart.cluster import BATCH_SIZE, Listing, RayExtraction, extract_on_ray, is_uri, list_inputs, ray_session
    from headstart.data import read_source
    from headstart.pipeline import available_cpus

    started = time.perf_counter()
    _check_address(ray, address)
    if isinstance(data, str) and is_uri(data):
        if not ray:
            raise ConfigError(f"{display(data)}: a URI is read on Ray workers; add --ray.")
        listing = list_inputs([data])
        listed_skipped = listing.missing
    else:
        records, val, listed_skipped = read_source(Path(data).expanduser())
        listing = Listing.local([r.path for r in records + (val or [])])
    if not listing.locations:
        raise _no_readable_images([data], listed_skipped, "Put each class's images in its own sub-folder (e.g. photos/cats/*.jpg).")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    nets = create_backbones(backbone, weights, layer, cache_root=root)
    caches = [FeatureCache(root, net) for net in nets]
    paths = [listing.path(k) for k in range(len(listing.locations))]  # as each image is reported
    counts: list[tuple[int, int]] = []
    reasons: dict[Path, str] = {}
    with ray_session(address) if ray else nullcontext(available_cpus()) as n_cpus:
        for net, cache in zip(nets, caches, strict=True):
            if ray:
                run: RayExtraction | CachedExtraction = extract_on_ray(
                    net, listing, cache, root, n_cpus, batch_size or BATCH_SIZE, progress
                )
            else:
                run = extract_with_cache(net, paths, cache, batch_size or 32, progress)
            counts.append((run.n_extracted, run.n_cached))
            for s in run.skipped:
                reasons.setdefault(s.path, s.reason)
    skipped = listed_skipped + [Skipped(path, reasons[path]) for path in dict.fromkeys(paths) if path in reasons]
    return ExtractSummary(
        backbone=ensemble_name(nets),
        directories=tuple(c.directory for c in caches),
        n_images=len(listing.locations),
        n_extracted=max(n for n, _ in counts),
        n_cached=min(n for _, n in counts),
        n_copies=max(0, len(listing.locations) - max(n for n, _ in counts) - min(n for _, n in counts) - len(skipped)),
        skipped=skipped,
        seconds=round(time.perf_counter() - started, 2),
        n_cpus=n_cpus,
        ray=ray,
    )


def info(model: PathLike) -> BundleContents:
    """What a model folder holds, read from its JSON and the safetensors header; no weights are loaded."""
    return read_bundle(Path(model), load_weights=False)


def predict(
    model: PathLike | Model,
    images: Sequence[ImageLike],
    top_k: int = 3,
    progress: Progress | None = None,
    unknown: UnknownOption = "auto",
    tta: bool = False,
    ray: bool = False,
    address: str | None = None,
) -> Predictions:
    """Top-k predictions for image files, folders (searched recursively), PIL images or RGB arrays; unreadable files are skipped.

    `unknown`: "auto" (default) marks images past the model's unknown threshold, a number past that score, "off" none.
    `tta`: average each image's probabilities with its mirror image's (test-time augmentation).
    `ray`: compute the backbones' features on a Ray cluster (`pip install 'headstart[ray]'`; see `extract` for `address`):
    for many images, files and folders only, which may also be URIs that pyarrow reads (`s3://bucket/photos/`).

    Raises:
        DataError: none of the images could be read (the message gives the first reason).
        ConfigError: `ray` with images in memory or with `tta`, or `address` without `ray`.
    """
    _check_address(ray, address)
    model = _loaded(model)
    if ray:
        result = _predict_on_ray(model, images, top_k, progress, unknown, tta, address)
    else:
        result = model.predict(images, top_k, progress, unknown, tta)
    if not result.predictions:
        raise _no_readable_images([i for i in images if isinstance(i, str | Path)], result.skipped)
    return result


def _check_address(ray: bool, address: str | None) -> None:
    if address is not None and not ray:
        raise ConfigError("--address names the Ray cluster to compute on: give --ray too.")


def _predict_on_ray(
    model: Model, images: Sequence[ImageLike], top_k: int, progress: Progress | None, unknown: UnknownOption, tta: bool, address: str | None
) -> Predictions:
    from headstart.cluster import list_inputs, predict_on_ray, ray_session
    from headstart.model import Predictions

    if tta:
        raise ConfigError("--tta is not available with --ray; leave one of them out.")
    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}.")
    inputs = [i for i in images if isinstance(i, str | os.PathLike)]
    if len(inputs) != len(images):
        raise ConfigError("With ray, give image files, folders or URIs; images in memory are predicted here: leave out ray.")
    listing = list_inputs(inputs)
    if not listing.locations:
        return Predictions([], listing.missing)
    with ray_session(address) as n_cpus:
        predictions, skipped = predict_on_ray(model, listing, n_cpus, top_k, unknown, progress=progress)
    return Predictions(predictions, listing.missing + skipped)


def evaluate(model: PathLike | Model, data: PathLike, progress: Progress | None = None, tta: bool = False) -> EvaluationResult:
    """Accuracy, per-class precision/recall/F1 and confusion matrix on labelled images (`tta`: see `predict`).

    Raises:
        DataError: none of the images could be read (the message names `data` and gives the first reason).
    """
    model = _loaded(model)
    result = model.evaluate(data, progress, tta)
    if result.evaluation.n_images == 0:
        raise _no_readable_images([data], result.skipped, f"`headstart check {data}` lists each problem with its fix.")
    return result


def export(
    model: PathLike | Model,
    out: PathLike | None = None,
    format: ExportFormat = "onnx",
    int8: bool = False,
    calibration: PathLike | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> ExportResult:
    """Write the model as one ONNX or TFLite file (uint8 RGB pixels in, probabilities out), checked on its validation photos.

    `out` defaults to the model folder's name with `.onnx`, `.int8.onnx`, `.tflite` or `.int8.tflite`, beside it.
    int8 calibrates on `calibration`'s photos, or else on the model's recorded validation photos.
    """
    from headstart.model_export import export as export_model

    if calibration is not None and not int8:
        raise ConfigError("--calibration sets the int8 ranges: give it with --int8.")
    folder = Path(model) if isinstance(model, str | Path) else None
    suffix = f".{format}"
    if out is None:
        if folder is None:
            raise ConfigError("Give the file to write (out=...) when exporting a model held in memory.")
        if not folder.resolve().name:
            raise ConfigError(f"{folder}: not a model folder; give the folder `headstart train --out` wrote.")
        out = folder.resolve().with_name(folder.resolve().name + (".int8" if int8 else "") + suffix)
    inputs = [Path(p) for p in (folder, calibration) if p is not None]
    path = output_file(Path(out), suffix, inputs, force)
    return export_model(_loaded(model), path, format, int8, Path(calibration) if calibration is not None else None, progress)


def serve(model: PathLike, host: str = "127.0.0.1", port: int = 8000, report: bool = True) -> None:
    """Serve the model over HTTP until interrupted: POST /predict, GET /info, /health, /report (unless `report` is off), and a page at /."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"Serving needs {', '.join(missing)}, which is not installed: pip install 'headstart[serve]'")
    from headstart import server

    server.run(Path(model), host, port, report=report)


def imagenet(
    images: Sequence[PathLike],
    backbone: str = "efficientnet_lite0",
    weights: PathLike | None = None,
    top_k: int = 5,
    progress: Progress | None = None,
) -> Predictions:
    """The backbone's own ImageNet-1k top-k classes for each image (its pretrained classifier kept on).

    Raises:
        ConfigError: `top_k` is below 1.
        DataError: none of the images could be read (the message gives the first reason).
    """
    import numpy as np

    from headstart.backbone import imagenet_class_names
    from headstart.engine import TorchEngine
    from headstart.features import extract_features
    from headstart.model import Prediction, Predictions

    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}.")
    net = create_backbone(backbone, weights)
    paths, missing = list_images(list(images))
    # Full-resolution decoding: reduced JPEG decoding flips the ImageNet top-1 of a few large photos (bench/decode.py).
    extraction = extract_features(TorchEngine(net, net.imagenet_logits), paths, progress=progress, reduced_decode=False)
    names = imagenet_class_names()
    logits = extraction.features - extraction.features.max(1, keepdims=True)
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    predictions = [Prediction.from_probabilities(paths[i], row, names, top_k) for i, row in zip(extraction.kept, proba)]
    if not predictions:
        raise _no_readable_images(images, missing + extraction.skipped)
    return Predictions(predictions, missing + extraction.skipped)


def save_predictions_csv(predictions: Sequence[Prediction], path: PathLike, force: bool = False) -> Path:
    """Write one row per image: path, label, probability, then label_2, probability_2, ... (atomically);
    then unknown (true/false) and unknown_score when the model has an unknown detector.

    Paths are written as their bytes on disk, so non-UTF-8 file names read back as the same files.
    """
    k = max((len(p.top_k) for p in predictions), default=1)
    header = ["path", "label", "probability"] + [f"{c}_{i}" for i in range(2, k + 1) for c in ("label", "probability")]
    rows = [[str(p.path), *(f"{v:.6f}" if isinstance(v, float) else v for pair in p.top_k for v in pair)] for p in predictions]
    if any(p.unknown_score is not None for p in predictions):
        header += ["unknown", "unknown_score"]
        for row, p in zip(rows, predictions):
            row += [str(p.unknown).lower(), "" if p.unknown_score is None else f"{p.unknown_score:.6f}"]
    return atomic_write_bytes(output_file(Path(path), ".csv", force=force), csv_bytes(header, rows))


def save_predictions_parquet(predictions: Sequence[Prediction], path: PathLike, force: bool = False) -> Path:
    """Write the columns of `save_predictions_csv` as a Parquet file (atomically; needs pyarrow, which `headstart[ray]` brings).

    Probabilities and unknown scores are float32 and `unknown` boolean; a label beyond an image's classes is null.
    Paths are UTF-8 text, with the undecodable bytes of non-UTF-8 file names written as `\\xNN`.
    """
    import io

    from headstart import __version__

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("Writing Parquet needs pyarrow, which is not installed: pip install 'headstart[ray]', or write a .csv.") from None
    k = max((len(p.top_k) for p in predictions), default=1)
    columns: dict[str, pa.Array] = {
        "path": pa.array([os.fsencode(p.path).decode("utf-8", "backslashreplace") if p.path else None for p in predictions], pa.string())
    }
    for i in range(k):
        suffix = f"_{i + 1}" if i else ""
        columns[f"label{suffix}"] = pa.array([p.top_k[i][0] if i < len(p.top_k) else None for p in predictions], pa.string())
        columns[f"probability{suffix}"] = pa.array([p.top_k[i][1] if i < len(p.top_k) else None for p in predictions], pa.float32())
    if any(p.unknown_score is not None for p in predictions):
        columns["unknown"] = pa.array([p.unknown for p in predictions], pa.bool_())
        columns["unknown_score"] = pa.array([p.unknown_score for p in predictions], pa.float32())
    buffer = io.BytesIO()
    pq.write_table(
        pa.table(columns).replace_schema_metadata({"headstart_version": __version__}), buffer
    )  # the mark `output_file` looks for
    return atomic_write_bytes(output_file(Path(path), ".parquet", force=force), buffer.getvalue())


def save_predictions(predictions: Sequence[Prediction], path: PathLike, force: bool = False) -> Path:
    """`save_predictions_parquet` or `save_predictions_csv`, as the file name ends (.parquet or .csv)."""
    if Path(path).suffix.lower() == ".parquet":
        return save_predictions_parquet(predictions, path, force)
    return save_predictions_csv(predictions, path, force)


def augment_preview(
    data: PathLike,
    out: PathLike,
    augment: str | AugmentConfig = "light",
    backbone: str = "efficientnet_lite0",
    n_images: int = 4,
    n_variants: int = 5,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Save a PNG grid: a few training images as the model sees them in evaluation, then augmented.

    Returns the path written.

    Raises:
        ConfigError: `n_images` or `n_variants` is below 1.
    """
    import numpy as np

    from headstart.augment import AugmentConfig
    from headstart.augment import augment as augment_image
    from headstart.html_report import image_grid, save_figure
    from headstart.transforms import resize_and_crop

    if n_images < 1 or n_variants < 1:
        raise ConfigError(f"n_images and n_variants must be at least 1, got {n_images} and {n_variants}.")
    config = augment if isinstance(augment, AugmentConfig) else AugmentConfig.preset(augment)
    dataset = load_dataset(data, val_split=0.0)
    data_config = create_backbone(backbone).data_config
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset.train), size=min(n_images, len(dataset.train)), replace=False)
    rows, titles = [], []
    for index in sorted(picks.tolist()):
        record = dataset.train[index]
        image = load_image(record.path)
        rows.append([resize_and_crop(image, data_config)] + [augment_image(image, config, data_config, rng) for _ in range(n_variants)])
        titles.append([f"{display(record.label)}: original"] + [f"augmented {k + 1}" for k in range(n_variants)])
    return save_figure(image_grid(rows, titles), output_file(Path(out), ".png", force=force))


def report(model: PathLike, data: PathLike | None = None, out: PathLike | None = None, force: bool = False) -> Path:
    """(Re)build a model's HTML report, scored on its test split, its validation split, or labelled `data`.

    Writes `out` (default: `report.html` in the model folder) and returns its path.

    Raises:
        ConfigError: no labelled `data` was given and no recorded image was held out of the head's fit (it was
            refitted on every labelled image): such a report would headline a score on images the head has seen.
    """
    from headstart.html_report import build_report

    default = Path(model) / REPORT_NAME
    target = default if out is None or Path(out).resolve() == default.resolve() else output_file(Path(out), ".html", force=force)
    loaded = _loaded(model)
    s = loaded.summary
    if data is not None:
        dataset = load_dataset(data, val_split=0.0)
        records, scored_on = dataset.val or dataset.train, f"the labelled images of {display(str(data))}"
    elif s.test_images:
        records, scored_on = list(s.test_images), "the test split, held out of training and of every choice"
    elif s.refit:
        cross_validated = f" (cross-validated accuracy {s.validation.accuracy:.2%}, in metrics.json)" if s.validation else ""
        raise ConfigError(
            f"{display(str(model))}: its head was refitted on every labelled image, so none is left to score it honestly; "
            f"`train` wrote report.html from out-of-fold predictions{cross_validated}. Give held-out labelled images: "
            f"headstart report {display(str(model))} DATA."
        )
    else:
        records, scored_on = list(s.val_images), "the validation split"
        if not records:
            raise ConfigError(f"{model}: no validation images are recorded; give labelled images: headstart report {model} DATA.")
    scores = loaded.score([r for r in records if r.label in loaded.classes], held_out_only=True)
    if not scores.records:
        raise _no_readable_images([model], scores.skipped, f"Give labelled images: headstart report {model} DATA.")
    return build_report(loaded, scores, target, scored_on)


def explain(
    model: PathLike | Model, images: Sequence[PathLike], out: PathLike, class_name: str | None = None, progress: Progress | None = None
) -> Explanations:
    """Grad-CAM overlays for the predicted class (or `class_name`) of each image, one PNG each in `out`.

    An ensemble's PNG has one overlay per backbone, each from that backbone's share of the features.
    Each PNG is named `{stem}_gradcam.png` (`{stem}_2_gradcam.png`, ... when stems repeat; long stems shortened).
    Unreadable images are skipped and listed.

    Raises:
        ConfigError: `class_name` is not one of the model's classes.
        DataError: none of the images could be read (the message gives the first reason).
    """
    from headstart.gradcam import Explanations, existing_names, grad_cam_overlays, output_name
    from headstart.html_report import image_grid, save_figure
    from headstart.transforms import resize_and_crop

    folder = output_folder(Path(out))
    model = _loaded(model)
    if class_name is not None and class_name not in model.classes:
        raise ConfigError(f"Unknown class '{class_name}'. This model's classes: {', '.join(model.classes)}.")
    paths, skipped = list_images(list(images))
    written: list[Path] = []
    taken = existing_names(folder)
    cfg = model.data_configs[0]
    for done, path in enumerate(paths, start=1):
        try:
            image = load_image(path)
        except (UnreadableImageError, FileRefusedError) as e:
            skipped.append(Skipped(path, e.reason))
        else:
            proba = model.predict_proba([image])[0]
            index = model.classes.index(class_name) if class_name else int(proba.argmax())
            view = resize_and_crop(image, cfg)
            what = f"Grad-CAM for '{display(model.classes[index])}' (p={proba[index]:.2f})"
            (cams,) = grad_cam_overlays(model, [image], [index])
            titles = [f"{display(path.name)}: {what}"] if len(cams) == 1 else [f"{b.name}: {what}" for b in model.backbones]
            figure = image_grid([[view, *cams]], [[display(path.name), *titles]], cell_inches=3)
            written.append(save_figure(figure, folder / output_name(path.stem, "_gradcam.png", taken)))
        if progress:
            progress("Explaining", done, len(paths))
    if not written:
        raise _no_readable_images(images, skipped)
    return Explanations(written, skipped)


def activations(model_or_backbone: str | PathLike, image: PathLike, out: PathLike, n_channels: int = 8) -> Path:
    """A PNG grid of the first feature maps of each backbone stage for one image (shallow to deep)."""
    import torch

    from headstart.gradcam import existing_names, output_name, stage_activations
    from headstart.html_report import feature_map_grid, save_figure
    from headstart.transforms import preprocess

    folder = output_folder(Path(out))
    source = Path(model_or_backbone)
    net = _loaded(source).backbone if (source / "bundle.json").is_file() else create_backbone(str(model_or_backbone))
    path = Path(image)
    batch = torch.from_numpy(preprocess(load_image(path), net.data_config))[None]
    names = [f"{name} ({channels} ch)" for name, channels in net.stages]
    figure = feature_map_grid(stage_activations(net, batch, n_channels), names)
    return save_figure(figure, folder / output_name(path.stem, "_activations.png", existing_names(folder)))


def imagenet_grid(result: Predictions, out: PathLike, n_cols: int = 4, force: bool = False) -> Path:
    """A PNG grid of the images, each titled with its top-1 ImageNet class and probability."""
    from PIL import ImageOps

    from headstart.html_report import image_grid, save_figure

    if not result.predictions:
        raise ConfigError("No readable images to draw.")
    shown = [(p, p.path) for p in result.predictions if p.path is not None]
    views = [ImageOps.fit(load_image(path), (256, 256)) for _, path in shown]
    titles = [f"{display(p.label.split(',')[0])} ({p.probability:.2f})" for p, _ in shown]
    rows = [views[k : k + n_cols] for k in range(0, len(views), n_cols)]
    return save_figure(
        image_grid(rows, [titles[k : k + n_cols] for k in range(0, len(titles), n_cols)]), output_file(Path(out), ".png", force=force)
    )


def _no_readable_images(
    inputs: Sequence[PathLike], skipped: list[Skipped], fix: str = "Give image files (JPEG, PNG, ...) or folders holding them."
) -> DataError:
    """The error for inputs among which no image could be read (or none the head was not fitted on): what was skipped, and why."""
    from headstart.model import FITTED_REASON

    where = ", ".join(map(str, inputs[:3])) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
    if not skipped:
        return DataError(f"{where}: no images found. {fix}")
    if all(s.reason == FITTED_REASON for s in skipped):
        return DataError(
            f"{where}: the head was fitted on all {len(skipped)} of these images, so a score on them would flatter the model. "
            "Give labelled images it has not seen."
        )
    first = skipped[0]
    return DataError(f"{where}: no readable images; {len(skipped)} skipped (first: {first.path}: {first.reason}). {fix}")


def backbones() -> list[BackboneInfo]:
    """The backbones headstart knows, and whether each works offline."""
    return list_backbones()


def demo(out: PathLike = "headstart-demo", cache_dir: PathLike | None = None, progress: Progress | None = None) -> Model:
    """Fetch the flower photos, train the default model on them and save it to `out`."""
    from headstart.datasets import fetch_flowers
    from headstart.training import train

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    flowers = fetch_flowers(root, progress=progress)
    return train(flowers, cache_dir=root, out=out, progress=progress)


def _loaded(model: PathLike | Model) -> Model:
    from headstart.model import Model, load

    return model if isinstance(model, Model) else load(model)


def __getattr__(name: str) -> Any:
    if name == "train":  # the training pipeline (NumPy, ONNX Runtime) is imported when first used
        from headstart.training import train

        return train
    raise AttributeError(f"module 'headstart.api' has no attribute '{name}'")
