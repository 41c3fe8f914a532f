"""The `headstart` command: each command parses options, calls one api function and renders the result."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from headstart.model import UnknownOption

app = typer.Typer(
    help="Turn a folder of labelled photos into an image classifier, by transfer learning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Head(StrEnum):
    linear = "linear"
    mlp = "mlp"


class Strategy(StrEnum):
    linear = "linear"
    mlp = "mlp"
    finetune = "finetune"
    auto = "auto"


class Augment(StrEnum):
    none = "none"
    light = "light"
    strong = "strong"


Backbone = Annotated[str, typer.Option(help="efficientnet_lite0/1/2 or timm:<model>; see `headstart backbones`.")]
Weights = Annotated[Path | None, typer.Option(help="Backbone weights file (safetensors or state dict) instead of downloading.")]
Backbones = Annotated[
    str,
    typer.Option(
        "--backbone",
        help="efficientnet_lite0/1/2 or timm:<model>, or several joined by + for an ensemble (features concatenated), "
        "e.g. efficientnet_lite0+efficientnet_lite1; see `headstart backbones`.",
    ),
]
TrainWeights = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        help="Backbone weights file (safetensors or state dict) instead of downloading; for an ensemble, its one timm: member's.",
    ),
]


Force = Annotated[bool, typer.Option(help="Replace an existing output file that headstart did not write.")]
RayFlag = Annotated[bool, typer.Option("--ray", help="Compute on a Ray cluster (needs headstart\\[ray]); see --address.")]
RayAddress = Annotated[
    str | None,
    typer.Option(
        help="--ray: the cluster to run on, e.g. ray://HEAD:10001, or auto on one of its nodes "
        "\\[default: $RAY_ADDRESS, else a local Ray on this machine's CPUs].",
        show_default=False,
    ),
]


@app.callback()
def main(ctx: typer.Context, debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    ctx.obj = {"debug": debug}


@contextmanager
def handled(ctx: typer.Context) -> Iterator[None]:
    """Turn headstart's errors into one line and exit code 1 (tracebacks with --debug)."""
    from concurrent.futures.process import BrokenProcessPool

    from headstart.cli import render
    from headstart.errors import HeadstartError

    try:
        yield
    except (HeadstartError, OSError) as e:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        render.error(str(e) if isinstance(e, HeadstartError) else _os_error_line(e))
        raise typer.Exit(1) from None
    except (MemoryError, BrokenProcessPool):  # a decoding process that runs out of memory dies: its pool breaks
        if ctx.obj and ctx.obj.get("debug"):
            raise
        render.error(
            "Out of memory (the machine's, or a limit such as `ulimit -v` or a container's): give a smaller --batch-size, "
            "close other programs or raise the limit, and run again; files already written are complete."
        )
        raise typer.Exit(1) from None
    except ImportError as e:  # under an address-space limit: "libtorch_cuda.so: failed to map segment from shared object"
        if ctx.obj and ctx.obj.get("debug"):
            raise
        render.error(
            f"Could not load a library: {e}. Under a memory limit (`ulimit -v`, a container's), raise it; "
            "otherwise reinstall headstart. Run with --debug for the traceback."
        )
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        render.error("Interrupted. Files already written are complete; to continue a fine-tuning run, repeat the command with --resume.")
        raise typer.Exit(130) from None


def _os_error_line(e: OSError) -> str:
    """One line naming the file and the fix for an operating-system error (full disk, permissions, ...)."""
    where = f"{e.filename}: " if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}no space left on the device. Free some space, or write elsewhere (--out, --cache-dir or "
            "HEADSTART_CACHE_DIR), and run again; files already written are complete."
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}permission denied. Choose a folder you can write to, or fix the permissions, and run again."
    return f"{where}{e.strerror or e}. Run with --debug for the traceback."


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class (or train/ and val/), or a CSV of path,label.")],
    out: Annotated[Path, typer.Option(help="Folder to save the model in.")] = Path("model"),
    backbone: Backbones = "efficientnet_lite0",
    strategy: Annotated[
        Strategy | None,
        typer.Option(help="linear/mlp: that head on frozen features; finetune: then train the top blocks too; auto: choose."),
    ] = None,
    head: Annotated[Head | None, typer.Option(help="linear (softmax) or mlp (Dense 512 + dropout 0.5) \\[default: linear].")] = None,
    layer: Annotated[int | None, typer.Option(help="Pool an earlier stage's output instead of the final features, e.g. -2.")] = None,
    weights: TrainWeights = None,
    val_split: Annotated[float, typer.Option(help="Fraction of each class held out for validation.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split, training and augmentation.", min=0, max=2**32 - 1)] = 0,
    balanced: Annotated[bool, typer.Option(help="Weight classes inversely to their frequency.")] = False,
    unfreeze: Annotated[str, typer.Option(help="finetune: how many top blocks to train, or 'all'.")] = "2",
    epochs: Annotated[int, typer.Option(help="finetune: most epochs of the second phase.")] = 8,
    augment: Annotated[Augment, typer.Option(help="finetune: augmentation preset for training images.")] = Augment.strong,
    hflip: Annotated[bool | None, typer.Option("--hflip/--no-hflip", help="Random left-right flips.", show_default=False)] = None,
    vflip: Annotated[bool | None, typer.Option("--vflip/--no-vflip", help="Random upside-down flips.", show_default=False)] = None,
    rotation: Annotated[float | None, typer.Option(help="Max rotation, degrees.", show_default=False)] = None,
    shift: Annotated[float | None, typer.Option(help="Max shift, fraction of the side.", show_default=False)] = None,
    shear: Annotated[float | None, typer.Option(help="Max shear, degrees.", show_default=False)] = None,
    zoom: Annotated[float | None, typer.Option(help="Max zoom in or out, fraction.", show_default=False)] = None,
    min_crop: Annotated[
        float | None, typer.Option(help="Smallest area fraction of a random crop (1 = no crop).", show_default=False)
    ] = None,
    brightness: Annotated[float | None, typer.Option(help="Max brightness change, fraction.", show_default=False)] = None,
    contrast: Annotated[float | None, typer.Option(help="Max contrast change, fraction.", show_default=False)] = None,
    saturation: Annotated[float | None, typer.Option(help="Max saturation change, fraction.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="finetune: continue the interrupted run saved in --out.")] = False,
    force: Annotated[
        bool, typer.Option(help="Write into --out even if it holds other files (kept; only the model's own files are replaced).")
    ] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache folder \\[default: ~/.cache/headstart].")] = None,
    cache: Annotated[bool, typer.Option(help="Read and write the feature cache.")] = True,
    batch_size: Annotated[int, typer.Option(help="Images per backbone forward pass or training step.")] = 32,
    report: Annotated[bool, typer.Option(help="Also write OUT/report.html (curves, confusion matrix, Grad-CAM).")] = True,
    refit: Annotated[
        bool,
        typer.Option(help="Frozen heads: choose settings by cross-validation, score out-of-fold, refit on all labelled images."),
    ] = True,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.", min=2, max=100)] = 5,
    test_split: Annotated[float, typer.Option(help="Fraction of each class held out as a test split used for nothing else.")] = 0.0,
    tta: Annotated[bool, typer.Option(help="Also score the test split with test-time augmentation (each image and its mirror).")] = False,
) -> None:
    """Train a classifier on a folder of photos and save it."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx), render.progress_bar() as progress:
        model = api.train(
            data,
            backbone=backbone,
            strategy=strategy.value if strategy else None,
            head=head.value if head else None,
            layer=layer,
            weights=weights,
            val_split=val_split,
            seed=seed,
            balanced=balanced,
            unfreeze=_unfreeze(unfreeze),
            epochs=epochs,
            augment=_augment(
                augment,
                hflip=hflip,
                vflip=vflip,
                rotation=rotation,
                shift=shift,
                shear=shear,
                zoom=zoom,
                min_crop=min_crop,
                brightness=brightness,
                contrast=contrast,
                saturation=saturation,
            ),
            out=out,
            resume=resume,
            force=force,
            cache_dir=cache_dir,
            cache=cache,
            report=report,
            batch_size=batch_size,
            refit=refit,
            folds=folds,
            test_split=test_split,
            tta=tta,
            progress=progress,
        )
    render.training(model, out)


@app.command("augment-preview")
def augment_preview(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class, or a CSV of path,label.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("augment-preview.png"),
    augment: Annotated[Augment, typer.Option(help="Augmentation preset.")] = Augment.light,
    backbone: Backbone = "efficientnet_lite0",
    n_images: Annotated[int, typer.Option(min=1, help="How many training images (rows).")] = 4,
    n_variants: Annotated[int, typer.Option(min=1, help="How many augmented versions of each (columns after the original).")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the image choice and the augmentations.", min=0, max=2**32 - 1)] = 0,
    force: Force = False,
) -> None:
    """Save a grid of augmented training images: what the model sees while fine-tuning."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx):
        path = api.augment_preview(
            data, out, augment=augment.value, backbone=backbone, n_images=n_images, n_variants=n_variants, seed=seed, force=force
        )
    render.message(f"Wrote {path}.")


def _unfreeze(value: str) -> int | None:
    """'all' -> None (every block); else a positive count."""
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"expected a positive number of blocks or 'all', got {value!r}", param_hint="--unfreeze")
    return int(value)


def _augment(preset: Augment, min_crop: float | None, **overrides: Any) -> Any:
    from headstart.augment import AugmentConfig
    from headstart.errors import ConfigError

    try:
        return AugmentConfig.preset(preset.value, crop_scale=(min_crop, 1.0) if min_crop is not None else None, **overrides)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def check(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class (or train/ and val/), or a CSV of path,label.")],
    csv: Annotated[Path | None, typer.Option(help="Also write every problem to this CSV: path, problem, action, detail, fix.")] = None,
    val_split: Annotated[float, typer.Option(help="The validation fraction `train` would use.")] = 0.2,
    seed: Annotated[int, typer.Option(help="The split seed `train` would use (and the folds' of --labels).", min=0, max=2**32 - 1)] = 0,
    labels: Annotated[
        bool,
        typer.Option("--labels", help="Also list suspect labels: images a cross-validated head on frozen features says are mislabelled."),
    ] = False,
    backbone: Backbone = "efficientnet_lite0",
    model: Annotated[Path | None, typer.Option(help="--labels: use this model's backbone and head settings instead of --backbone.")] = None,
    labels_csv: Annotated[
        Path | None,
        typer.Option(help="Write every suspect label to this CSV: rank, path, given, suggested, probabilities (implies --labels)."),
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="--labels: feature cache folder \\[default: ~/.cache/headstart].")] = None,
    force: Force = False,
) -> None:
    """Find every problem in a dataset before training; exit code 1 when training cannot proceed."""
    from headstart import api
    from headstart.cli import render
    from headstart.files import output_file

    with handled(ctx), render.progress_bar() as progress:
        inputs = [data, *([model] if model is not None else [])]
        listing = output_file(csv, ".csv", inputs, force) if csv is not None else None  # checked before the long work
        suspects_listing = output_file(labels_csv, ".csv", inputs, force) if labels_csv is not None else None
        result = api.check(data, val_split=val_split, seed=seed, progress=progress)
    render.triage(result)
    if listing is not None:
        with handled(ctx):
            result.write_csv(listing)
    render.triage_verdict(result, csv)
    if (labels or suspects_listing is not None) and result.can_train:
        with handled(ctx), render.progress_bar() as progress:
            search = api.check_labels(data, backbone=backbone, model=model, seed=seed, cache_dir=cache_dir, progress=progress)
            if suspects_listing is not None:
                search.write_csv(suspects_listing)
        render.suspects(search, suspects_listing)
    elif labels or suspects_listing is not None:
        render.message("Suspect labels were not searched: fix what blocks training first.")
    raise typer.Exit(0 if result.can_train else 1)


@app.command()
def compare(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Folder with one sub-folder per class (or train/ and val/), or a CSV of path,label.")],
    backbone: Annotated[
        list[str] | None,
        typer.Option(
            help="Backbones to compare, repeatable or comma-separated; a+b is their ensemble \\[default: efficientnet_lite0,1,2]."
        ),
    ] = None,
    ensembles: Annotated[bool, typer.Option(help="Also score the ensemble of all the single backbones given.")] = True,
    head: Annotated[list[Head] | None, typer.Option(help="Heads to compare, repeatable \\[default: linear and mlp].")] = None,
    layer: Annotated[
        list[str] | None,
        typer.Option(help="Layers, repeatable or comma-separated: final, or an earlier stage such as -2 \\[default: final]."),
    ] = None,
    folds: Annotated[int, typer.Option(help="Stratified cross-validation folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the folds and the heads.", min=0, max=2**32 - 1)] = 0,
    csv: Annotated[Path | None, typer.Option(help="Also write every row to this CSV file.")] = None,
    html: Annotated[Path | None, typer.Option(help="Also write a page with a bar chart and the table to this HTML file.")] = None,
    train_best: Annotated[bool, typer.Option(help="Train the best row with `headstart train` and save it to --out.")] = False,
    out: Annotated[Path | None, typer.Option(help="Folder to save the winner in (with --train-best).")] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Let --out be a folder of other files (they are kept), and replace --csv and --html files headstart did not write."
        ),
    ] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache folder \\[default: ~/.cache/headstart].")] = None,
) -> None:
    """Rank backbones, their ensemble and heads by cross-validated accuracy on the same images and folds."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx), render.progress_bar() as progress:
        result = api.compare(
            data,
            backbones=_listed(backbone) or ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
            ensembles=ensembles,
            heads=[h.value for h in head] if head else ("linear", "mlp"),
            layers=[_layer(v) for v in _listed(layer)] or (None,),
            folds=folds,
            seed=seed,
            csv=csv,
            html=html,
            train_best=train_best,
            out=out,
            force=force,
            cache_dir=cache_dir,
            progress=progress,
        )
    render.leaderboard(result.leaderboard)
    for path, what in ((result.csv, "every row"), (result.html, "the chart and table")):
        if path is not None:
            render.message(f"Wrote {what} to {path}.")
    if result.model is not None and result.model_dir is not None:
        render.training(result.model, result.model_dir)


def _listed(values: list[str] | None) -> list[str]:
    """Repeated options and comma-separated lists, flattened."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _layer(value: str) -> int | None:
    from headstart.errors import ConfigError

    if value.lower() == "final":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--layer takes 'final' or a stage number such as -2, got '{value}'.") from None


@app.command()
def extract(
    ctx: typer.Context,
    data: Annotated[
        str,
        typer.Argument(
            help="Folder with one sub-folder per class (or train/ and val/), or a CSV of path,label; "
            "with --ray also a URI: s3://bucket/photos/, gs://bucket/photos/."
        ),
    ],
    ray: RayFlag = False,
    address: RayAddress = None,
    backbone: Backbones = "efficientnet_lite0",
    layer: Annotated[int | None, typer.Option(help="Pool an earlier stage's output instead of the final features, e.g. -2.")] = None,
    weights: TrainWeights = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache folder \\[default: ~/.cache/headstart].")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Images per forward pass \\[default: 32], or with --ray per Ray task \\[default: 64].")
    ] = None,
) -> None:
    """Compute the features of a dataset into the feature cache, here or on a Ray cluster; `train` then runs no image through the backbone."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx), render.progress_bar() as progress:
        result = api.extract(
            data,
            backbone=backbone,
            layer=layer,
            weights=weights,
            ray=ray,
            address=address,
            cache_dir=cache_dir,
            batch_size=batch_size,
            progress=progress,
        )
    render.extracted(result)


@app.command()
def info(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="A model folder from `headstart train`.")],
) -> None:
    """Describe a model folder (backbone, classes, head, scores, files) without loading its weights."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx):
        contents = api.info(model)
    render.info(model, contents)


@app.command()
def predict(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="A model folder from `headstart train`.")],
    images: Annotated[list[str], typer.Argument(help="Image files or folders; with --ray also URIs (s3://bucket/photos/).")],
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to show per image.")] = 3,
    csv: Annotated[Path | None, typer.Option(help="Also write the predictions to this CSV file.")] = None,
    unknown: Annotated[
        str, typer.Option(help="Mark images unlike any class as unknown: auto (the model's threshold), off, or a score threshold.")
    ] = "auto",
    tta: Annotated[bool, typer.Option(help="Average each image's probabilities with its mirror image's (test-time augmentation).")] = False,
    ray: Annotated[
        bool,
        typer.Option("--ray", help="Compute on a Ray cluster (needs headstart\\[ray]) and write --out instead of printing each image."),
    ] = False,
    address: RayAddress = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the predictions to this .parquet (needs headstart\\[ray]) or .csv file.", show_default=False)
    ] = None,
    force: Force = False,
) -> None:
    """Predict the classes of new images."""
    from headstart import api
    from headstart.cli import render
    from headstart.errors import ConfigError
    from headstart.files import output_file

    with handled(ctx), render.progress_bar() as progress:
        if ray and out is None:
            raise ConfigError("--ray writes the predictions to a file: give --out predictions.parquet (or .csv).")
        inputs = [model, *(Path(i) for i in images)]
        listing = output_file(csv, ".csv", inputs, force) if csv is not None else None  # checked before the long work
        target = output_file(out, ".csv" if out.suffix.lower() == ".csv" else ".parquet", inputs, force) if out is not None else None
        result = api.predict(
            model, images, top_k=top_k, progress=progress, unknown=_unknown_option(unknown), tta=tta, ray=ray, address=address
        )
        if listing is not None:
            api.save_predictions_csv(result.predictions, listing, force)
        if target is not None:
            api.save_predictions(result.predictions, target, force)
    if ray:
        render.skipped(result.skipped)
    else:
        render.predictions(result)
    for path in (csv, out):
        if path:
            render.message(f"Wrote {len(result.predictions)} rows to {path}.")


def _unknown_option(value: str) -> UnknownOption:
    """--unknown's value: auto, off or a finite number."""
    import math

    if value in ("auto", "off"):
        return value  # type: ignore[return-value]
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise typer.BadParameter(f"{value!r}: give auto, off or a number such as 0.5.", param_hint="--unknown")
    return number


@app.command()
def evaluate(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="A model folder from `headstart train`.")],
    data: Annotated[Path, typer.Argument(help="Labelled images: class folders (its val/ if it has train/ and val/) or a CSV.")],
    tta: Annotated[bool, typer.Option(help="Average each image's probabilities with its mirror image's (test-time augmentation).")] = False,
) -> None:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix on labelled images."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx), render.progress_bar() as progress:
        result = api.evaluate(model, data, progress=progress, tta=tta)
    render.evaluation(result.evaluation)
    render.skipped(result.skipped)


class ExportFormat(StrEnum):
    onnx = "onnx"
    tflite = "tflite"


@app.command()
def export(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="A model folder from `headstart train`.")],
    format: Annotated[
        ExportFormat, typer.Option("--format", help="onnx (any runtime) or tflite (phones; needs headstart\\[tflite]).")
    ] = ExportFormat.onnx,
    int8: Annotated[bool, typer.Option("--int8", help="Quantise to 8 bits (about 4x smaller), calibrated on validation photos.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="File to write \\[default: MODEL.onnx, MODEL.int8.onnx, MODEL.tflite, ... beside the folder].")
    ] = None,
    calibration: Annotated[Path | None, typer.Option(help="--int8: calibrate on these photos, not the validation photos.")] = None,
    force: Force = False,
) -> None:
    """One file for apps and phones: uint8 RGB pixels in, class probabilities out; checked on the validation photos."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx), render.progress_bar() as progress:
        result = api.export(model, out, format.value, int8, calibration, progress, force)
    render.exported(result)


@app.command()
def serve(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="A model folder from `headstart train`.")],
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on; 0.0.0.0 for every network interface (no authentication: anyone who reaches it may use it)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    report: Annotated[bool, typer.Option(help="Show MODEL/report.html at /report (it shows training photos and their paths).")] = True,
) -> None:
    """Serve the model over HTTP: a page at / to try it, POST /predict for programs (needs headstart\\[serve])."""
    from headstart import api

    with handled(ctx):
        api.serve(model, host, port, report)


@app.command()
def imagenet(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    backbone: Backbone = "efficientnet_lite0",
    weights: Weights = None,
    top_k: Annotated[int, typer.Option(min=1, help="How many ImageNet classes to show.")] = 5,
    grid: Annotated[Path | None, typer.Option(help="Also save a PNG grid of the images titled with their top-1 class.")] = None,
    force: Force = False,
) -> None:
    """The pretrained backbone's own ImageNet-1000 predictions."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx), render.progress_bar() as progress:
        result = api.imagenet(images, backbone=backbone, weights=weights, top_k=top_k, progress=progress)
        if grid:
            api.imagenet_grid(result, grid, force=force)
    render.predictions(result)
    if grid:
        render.message(f"Wrote {grid}.")


@app.command()
def report(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="A model folder from `headstart train`.")],
    data: Annotated[Path | None, typer.Argument(help="Labelled images to score instead of the recorded validation split.")] = None,
    out: Annotated[Path | None, typer.Option(help="HTML file to write \\[default: MODEL/report.html].")] = None,
    force: Force = False,
) -> None:
    """(Re)build the HTML report: curves, confusion matrix, prediction grid, top losses, Grad-CAM."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx):
        path = api.report(model, data, out, force)
    render.message(f"Wrote {path}; open it in a browser.")


@app.command()
def explain(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="A model folder from `headstart train`.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the heatmap PNGs.")] = Path("explain"),
    class_name: Annotated[str | None, typer.Option("--class", help="Explain this class instead of the predicted one.")] = None,
) -> None:
    """Grad-CAM heatmaps: where the network looks for a class in each image."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx), render.progress_bar() as progress:
        result = api.explain(model, images, out, class_name, progress=progress)
    render.explanations(result, out)


@app.command()
def activations(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="MODEL_OR_BACKBONE", help="A model folder or a backbone name.")],
    image: Annotated[Path, typer.Argument(help="One image.")],
    out: Annotated[Path, typer.Option(help="Folder for the PNG.")] = Path("activations"),
) -> None:
    """Intermediate feature maps of each backbone stage for one image (edges and colours, then parts)."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx):
        path = api.activations(source, image, out)
    render.message(f"Wrote {path}.")


@app.command()
def backbones() -> None:
    """List the backbones and whether each works offline."""
    from headstart import api
    from headstart.cli import render

    render.backbones(api.backbones())


@app.command()
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder to save the demo model in.")] = Path("headstart-demo"),
) -> None:
    """Fetch the flower photos, train a classifier on them and show how to use it."""
    from headstart import api
    from headstart.cli import render

    with handled(ctx), render.progress_bar() as progress:
        model = api.demo(out, progress=progress)
    render.training(model, out)
    data = Path(model.summary.data)
    example = next(iter(sorted((data / model.classes[0]).iterdir())), data)
    for line in (
        "",
        f"The data came from {data}.",
        "Predict with it:",
        f"  headstart predict {out} {example}",
        f"  python -c \"import headstart; print(headstart.load('{out}').predict(['{example}']))\"",
    ):
        render.message(line)


def run() -> None:
    """Console-script entry point."""
    app(prog_name="headstart")


if __name__ == "__main__":
    run()
