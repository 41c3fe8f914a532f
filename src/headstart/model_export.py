"""A model as one file for apps and phones: ONNX (fp32 or int8) or TFLite, checked against the model on its own photos.

The ONNX file takes what any image library gives: uint8 RGB pixels of shape
(n, input_size, input_size, 3), already resized and cropped by `RECIPE`. The
normalisation, the backbone, the head and the softmax (of the logits divided by the
model's temperature) are inside the graph, and the output "probabilities" has one
column per class. A model with an unknown detector has a second output,
"unknown_score" (n,): an image scoring above the metadata's `unknown.threshold`
looks like none of the classes. Its metadata holds the class names, the
preprocessing, the temperature, the unknown score and the headstart version.
TFLite files carry the probabilities only.

An ensemble's backbones each have their own preprocessing, so its file has one
input per backbone, "image_0", "image_1", ..., each (n, S_k, S_k, 3) for that
backbone's size: every image is decoded once and resized and cropped once per
input (`ENSEMBLE_RECIPE`); the metadata's `preprocessing.inputs` lists them.
Its TFLite file has the same inputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
from numpy.typing import NDArray

from headstart import __version__
from headstart.config import DataConfig, Progress
from headstart.data import ImageRecord, list_images
from headstart.engine import cpu_session, exported_model
from headstart.errors import ConfigError, DataError
from headstart.files import atomic_write_bytes, display, read_regular
from headstart.pipeline import available_cpus, decode_member_pixels

if TYPE_CHECKING:
    import onnx

    from headstart.model import Model
    from headstart.unknown import UnknownDetector

ExportFormat = Literal["onnx", "tflite"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
Reference = Literal["model", "fp32 onnx"]
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
UNKNOWN_OUTPUT = "unknown_score"
CALIBRATION_IMAGES = 100  # photos that set int8 ranges: on flowers 100 and 200 agree with fp32 alike (99.33%), 100 in 2/3 the time
CALIBRATION_BATCH = 4
"""Photos the int8 calibrator runs at once: it holds every activation of a batch (about 65 MB a photo for EfficientNet-Lite0)."""
KNN_PRODUCT = "headstart/u_sim"
"""The node multiplying unit features by the kNN detector's references (quantised in an int8 export)."""
CHECK_IMAGES = 500  # validation photos an export is checked on at most
MAX_ONNX_BYTES = 4 << 30
Pixels = tuple[NDArray[np.uint8], ...]
"""Decoded photos as an export takes them: one uint8 array (n, S_k, S_k, 3) per input (one input, but for an ensemble)."""
_Runner = Callable[[Pixels], NDArray[np.float32]]

RECIPE = (
    "Decode the image with Pillow; for a JPEG call image.draft(None, (2 * resize_size, 2 * resize_size)) before loading it; "
    "rotate it upright per its EXIF orientation (ImageOps.exif_transpose); scale 16- or 32-bit grey to 8 bits "
    "(by 255/65535 when its maximum is over 255, else as is); convert it to RGB (transparency over white); "
    "resize it so its short side is resize_size pixels (long side int(resize_size * long / short)) with `interpolation`; "
    "crop the centre input_size square (left = round((width - input_size) / 2), top likewise); "
    "feed the pixels as uint8 of shape (n, input_size, input_size, 3)."
)
ENSEMBLE_RECIPE = (
    "One input per backbone, listed in `inputs` (name, resize_size, input_size, interpolation). Decode each image once "
    "with Pillow; for a JPEG call image.draft(None, (jpeg_draft_size, jpeg_draft_size)) before loading it; rotate it upright "
    "per its EXIF orientation (ImageOps.exif_transpose); scale 16- or 32-bit grey to 8 bits (by 255/65535 when its maximum "
    "is over 255, else as is); convert it to RGB (transparency over white). Then for each input: resize that image so its "
    "short side is the input's resize_size pixels (long side int(resize_size * long / short)) with its `interpolation`; "
    "crop the centre input_size square (left = round((width - input_size) / 2), top likewise); feed the pixels as uint8 "
    "of shape (n, input_size, input_size, 3) to the input of that name."
)


@dataclass(frozen=True)
class ExportCheck:
    """How an exported file compares with a reference (the model, or the fp32 export) on the same validation photos.

    Attributes:
        n_images: photos compared.
        agreement: fraction of photos whose top-1 class is the reference's.
        max_difference: the largest |probability - reference probability| over photos and classes.
        accuracy: the export's top-1 accuracy against the photos' labels.
        reference_accuracy: the reference's.
        images_per_second: the export's speed in ONNX Runtime or LiteRT on this machine (batches of 32; 1 for TFLite).
        reference_images_per_second: the reference's, measured the same way.
    """

    n_images: int
    agreement: float
    max_difference: float
    accuracy: float
    reference_accuracy: float
    images_per_second: float
    reference_images_per_second: float


@dataclass(frozen=True)
class ExportResult:
    """An exported file and how it was checked.

    Attributes:
        path: the file written.
        format: "onnx" or "tflite".
        int8: whether its weights and activations are quantised to 8 bits.
        size_bytes: its size.
        reference_size_bytes: the fp32 ONNX file's size (for int8 and TFLite exports), else None.
        check: its comparison with the reference on the model's validation photos; None when none can be read
            (a model trained without a validation split, or moved from the machine that has its photos).
        reference: what `check` compares against: "model" (headstart's own prediction) or "fp32 onnx".
        checked_on: which of the model's photos `check` used: "test", "validation", or "training" (a refitted head's
            validation photos, which it was also fitted on: its accuracy there is optimistic).
    """

    path: Path
    format: ExportFormat
    int8: bool
    size_bytes: int
    reference_size_bytes: int | None
    check: ExportCheck | None
    reference: Reference
    checked_on: str = "validation"


def export(
    model: Model,
    out: Path,
    format: ExportFormat = "onnx",
    int8: bool = False,
    calibration: Path | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write `model` to `out` as ONNX or TFLite (int8 with `int8`), then check it on the model's validation photos.

    An fp32 ONNX export is checked against the model itself; an int8 or TFLite one against the fp32 ONNX export.
    int8 ranges are calibrated on up to `CALIBRATION_IMAGES` of `calibration`'s photos, or else of the model's recorded
    validation photos (its test photos when it has no validation split), which are then also among those it is checked on
    unless it has a test split. No folder the model names, such as its training data, is searched.

    Raises:
        ConfigError: an unknown format, or the TFLite converter is not installed.
        DataError: int8 needs calibration photos and none can be read.
        ExportError: the backbone does not export to ONNX.
        TFLiteConversionError: the TFLite converter failed (its log goes to stderr).
        OSError: `out` cannot be written (it is written whole or not at all).
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    cfgs = model.data_configs
    fp32 = onnx_model_bytes(model, unknown=format == "onnx")
    summary = model.summary  # checked on the test split when there is one: a refitted head was fitted on its validation images too
    checked_on = "test" if summary.test_images else "training" if summary.refit else "validation"
    val_records = [r for r in summary.test_images or summary.val_images if r.label in model.classes][:CHECK_IMAGES]
    val_pixels, val_labels = _decode_labelled(val_records, model.classes, cfgs, progress)
    calibration_pixels = _calibration_pixels(model, calibration, progress) if int8 else None
    if format == "onnx" and not int8:
        atomic_write_bytes(out, fp32)
        check = _check_against_model(model, fp32, val_pixels, val_labels) if len(val_labels) else None
        return ExportResult(out, "onnx", False, len(fp32), None, check, "model", checked_on)
    with tempfile.TemporaryDirectory(prefix="headstart-export-") as tmp:
        fp32_path = Path(tmp) / "model.onnx"
        fp32_path.write_bytes(fp32)
        if format == "onnx":
            assert calibration_pixels is not None  # int8: `_calibration_pixels` raises when it has none
            int8_data = quantize_int8(fp32_path, calibration_pixels, Path(tmp), progress)
            atomic_write_bytes(out, int8_data)
            run = _onnx_runner(int8_data)
        else:
            from headstart import tflite

            tflite.convert(fp32_path, out, calibration_pixels)

            def run(pixels: Pixels) -> NDArray[np.float32]:
                return tflite.run_tflite(out, pixels)

    check = _compare(run, _onnx_runner(fp32), val_pixels, val_labels, batch=1 if format == "tflite" else 32) if len(val_labels) else None
    return ExportResult(out, format, int8, out.stat().st_size, len(fp32), check, "fp32 onnx", checked_on)


def input_names(n_backbones: int) -> list[str]:
    """The exported file's inputs: "image" for one backbone, "image_0", "image_1", ... for an ensemble's."""
    return [INPUT_NAME] if n_backbones == 1 else [f"{INPUT_NAME}_{k}" for k in range(n_backbones)]


def onnx_model_bytes(model: Model, unknown: bool = False) -> bytes:
    """`model` as one checked ONNX model: uint8 pixels (n, H, W, 3) in (one input per backbone), class probabilities (n, n_classes) out,
    and with `unknown` and a detector, unknown scores (n,)."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    members = [onnx.load_from_string(read_regular(exported_model(b, model.cache_root), MAX_ONNX_BYTES)) for b in model.backbones]
    if len(members) > 1:  # each backbone's names kept apart
        members = [compose.add_prefix(m, f"backbone{k}/") for k, m in enumerate(members)]
        if len({tuple((o.domain, o.version) for o in m.opset_import) for m in members}) > 1:
            raise ConfigError(
                f"The backbones of {model.backbone_name} were exported with different ONNX opsets; clear the cache's onnx/ folder."
            )
    container = members[0]
    graph = container.graph
    names = input_names(len(members))
    ensemble = len(members) > 1

    def constant(name: str, value: NDArray[Any]) -> str:
        array = np.asarray(value)  # int64 (axes, k) as it is, anything else as float32
        graph.initializer.append(
            numpy_helper.from_array(array if array.dtype == np.int64 else array.astype(np.float32), f"headstart/{name}")
        )
        return f"headstart/{name}"

    channel = (1, 1, 1, 3)
    preprocessing: list[onnx.NodeProto] = []
    backbone_nodes: list[onnx.NodeProto] = []
    features = []
    for k, (member, cfg, name) in enumerate(zip(members, model.data_configs, names, strict=True)):
        (pixels_input,) = member.graph.input
        (member_features,) = [o.name for o in member.graph.output if o.name.endswith("features")]
        features.append(member_features)
        p = f"headstart/m{k}/" if ensemble else "headstart/"
        c = f"m{k}/" if ensemble else ""
        preprocessing += [
            helper.make_node("Cast", [name], [f"{p}float"], f"{p}cast", to=TensorProto.FLOAT),
            helper.make_node("Div", [f"{p}float", constant(f"{c}255", np.array(255.0, np.float32))], [f"{p}unit"], f"{p}scale"),
            helper.make_node("Sub", [f"{p}unit", constant(f"{c}mean", np.reshape(cfg.mean, channel))], [f"{p}centred"], f"{p}centre"),
            helper.make_node(
                "Div", [f"{p}centred", constant(f"{c}std", np.reshape(cfg.std, channel))], [f"{p}normalised"], f"{p}normalise"
            ),
            helper.make_node("Transpose", [f"{p}normalised"], [pixels_input.name], f"{p}channels_first", perm=[0, 3, 1, 2]),
        ]
        backbone_nodes += member.graph.node
        if k:
            graph.initializer.extend(member.graph.initializer)
            graph.value_info.extend(member.graph.value_info)
    joined = features[0]
    if ensemble:
        joined = "headstart/features"
        backbone_nodes.append(helper.make_node("Concat", features, [joined], "headstart/concat", axis=1))
    state = model.head.weights

    def dense(layer: str, x: str, out: str) -> onnx.NodeProto:
        weight, bias = constant(f"w{layer}", state[f"{layer}.weight"]), constant(f"b{layer}", state[f"{layer}.bias"])
        return helper.make_node("Gemm", [x, weight, bias], [out], f"headstart/dense{layer}", transB=1)

    head = [
        helper.make_node("Sub", [joined, constant("head_mean", state["0.mean"])], ["headstart/h0"], "headstart/head_centre"),
        helper.make_node("Div", ["headstart/h0", constant("head_scale", state["0.scale"])], ["headstart/h1"], "headstart/head_scale"),
        dense("1", "headstart/h1", "headstart/h2"),
    ]
    logits = "headstart/h2"
    if "4.weight" in state:  # the MLP head: dense, ReLU, dense (dropout is off at inference)
        head += [helper.make_node("Relu", ["headstart/h2"], ["headstart/h3"], "headstart/relu"), dense("4", "headstart/h3", "headstart/h4")]
        logits = "headstart/h4"
    scaled = logits
    if model.temperature != 1.0:
        head.append(
            helper.make_node(
                "Div", [logits, constant("temperature", np.array(model.temperature))], ["headstart/scaled"], "headstart/calibrate"
            )
        )
        scaled = "headstart/scaled"
    head.append(helper.make_node("Softmax", [scaled], [OUTPUT_NAME], "headstart/softmax", axis=-1))
    detector = model.detector if unknown else None
    if detector is not None:
        head += _unknown_nodes(detector, joined, logits, constant)
    nodes = [*preprocessing, *backbone_nodes, *head]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    for name, cfg in zip(names, model.data_configs, strict=True):
        size = cfg.input_size
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.UINT8, ["batch", size, size, 3]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", len(model.classes)]))
    if detector is not None:
        graph.output.append(helper.make_tensor_value_info(UNKNOWN_OUTPUT, TensorProto.FLOAT, ["batch"]))
    graph.name = "headstart"
    _prune(graph)
    container.producer_name = "headstart"
    container.producer_version = __version__
    container.doc_string = f"{model.backbone_name} + {model.head.kind} head. Input: {ENSEMBLE_RECIPE if ensemble else RECIPE}"
    onnx.helper.set_model_props(container, metadata(model, unknown))
    onnx.checker.check_model(container, full_check=True)
    data: bytes = container.SerializeToString()
    return data


def _unknown_nodes(detector: UnknownDetector, features: str, logits: str, constant: Callable[[str, Any], str]) -> list[onnx.NodeProto]:
    """Nodes computing `detector.score(features, logits)` into the output `UNKNOWN_OUTPUT` (opset 17)."""
    from onnx import helper

    def node(op: str, inputs: list[str], name: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"headstart/u_{name}"], f"headstart/u_{name}", **attrs)

    made: dict[str, str] = {}

    def axes(*values: int) -> str:  # each int64 constant added once: initializer names must be unique
        name = f"u_axes{'_'.join(map(str, values))}"
        if name not in made:
            made[name] = constant(name, np.array(values, np.int64))
        return made[name]

    def squeezed(x: str, name: str) -> list[onnx.NodeProto]:  # (n, 1) -> (n,)
        return [node("Squeeze", [x, axes(1)], name)]

    if detector.kind in ("msp", "energy"):
        if detector.kind == "msp":
            nodes = [node("Softmax", [logits], "p", axis=-1), node("ReduceMax", ["headstart/u_p"], "top", axes=[1], keepdims=0)]
            nodes.append(node("Neg", ["headstart/u_top"], "score"))
        else:
            nodes = [node("ReduceLogSumExp", [logits], "lse", axes=[1], keepdims=0), node("Neg", ["headstart/u_lse"], "score")]
    elif detector.kind == "knn":
        t = detector.tensors
        k = min(detector.k, len(t["references"]))
        nodes = [
            node("Mul", [features, features], "sq"),
            node("ReduceSum", ["headstart/u_sq", axes(1)], "sumsq", keepdims=1),
            node("Sqrt", ["headstart/u_sumsq"], "norm"),
            node("Max", ["headstart/u_norm", constant("u_eps", np.array(1e-12, np.float32))], "safe"),
            node("Div", [features, "headstart/u_safe"], "unit"),
            node("MatMul", ["headstart/u_unit", constant("u_references_t", t["references"].T)], KNN_PRODUCT.removeprefix("headstart/u_")),
            helper.make_node(
                "TopK", ["headstart/u_sim", axes(k)], ["headstart/u_topk", "headstart/u_topk_index"], "headstart/u_topk", axis=1
            ),
            node("Slice", ["headstart/u_topk", axes(k - 1), axes(k), axes(1)], "kth"),
            *squeezed("headstart/u_kth", "kth1"),
            node("Sub", [constant("u_one", np.array(1.0, np.float32)), "headstart/u_kth1"], "score"),
        ]
    else:

        def distance(prefix: str, projection: str, centers: str) -> list[onnx.NodeProto]:
            t = detector.tensors
            return [
                node("MatMul", [features, constant(f"u_{projection}", t[projection])], f"{prefix}x"),
                node("Unsqueeze", [f"headstart/u_{prefix}x", axes(1)], f"{prefix}x1"),
                node("Sub", [f"headstart/u_{prefix}x1", constant(f"u_{centers}", t[centers])], f"{prefix}d"),
                node("Mul", [f"headstart/u_{prefix}d", f"headstart/u_{prefix}d"], f"{prefix}d2"),
                node("ReduceSum", [f"headstart/u_{prefix}d2", axes(2)], f"{prefix}dist", keepdims=0),
                node("ReduceMin", [f"headstart/u_{prefix}dist"], f"{prefix}min", axes=[1], keepdims=0),
            ]

        nodes = distance("m", "projection", "centers")
        if detector.kind == "mahalanobis":
            nodes.append(node("Identity", ["headstart/u_mmin"], "score"))
        else:
            nodes += distance("b", "background_projection", "background_center")
            nodes.append(node("Sub", ["headstart/u_mmin", "headstart/u_bmin"], "score"))
    nodes.append(helper.make_node("Identity", ["headstart/u_score"], [UNKNOWN_OUTPUT], "headstart/u_output"))
    return nodes


def metadata(model: Model, unknown: bool = False) -> dict[str, str]:
    """What a caller needs beside the graph: class names, preprocessing, temperature, unknown score, provenance (all strings, as ONNX requires).

    `preprocessing.inputs` lists each input (one per backbone) with its sizes; a single-backbone file
    also has them at the top of `preprocessing`, as before ensembles.
    """
    inputs = [
        {
            "name": name,
            "backbone": backbone.name,
            "resize_size": backbone.data_config.resize_size,
            "input_size": backbone.data_config.input_size,
            "interpolation": backbone.data_config.interpolation,
            "mean": list(backbone.data_config.mean),
            "std": list(backbone.data_config.std),
        }
        for name, backbone in zip(input_names(len(model.backbones)), model.backbones, strict=True)
    ]
    draft = 2 * max(cfg.resize_size for cfg in model.data_configs)
    if len(model.backbones) == 1:
        cfg = model.backbones[0].data_config
        preprocessing: dict[str, Any] = {
            "input": "uint8 RGB, shape (n, input_size, input_size, 3)",
            "resize_size": cfg.resize_size,
            "input_size": cfg.input_size,
            "interpolation": cfg.interpolation,
            "crop": "centre",
            "jpeg_draft_size": draft,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "inputs": inputs,
            "recipe": RECIPE,
        }
    else:
        preprocessing = {
            "input": "one uint8 RGB input per backbone (see inputs), each of shape (n, input_size, input_size, 3)",
            "crop": "centre",
            "jpeg_draft_size": draft,
            "inputs": inputs,
            "recipe": ENSEMBLE_RECIPE,
        }
    detector = model.detector if unknown else None
    extra = {"temperature": json.dumps(model.temperature)}
    if detector is not None:
        extra["unknown"] = json.dumps(
            {
                "output": UNKNOWN_OUTPUT,
                "score": detector.kind,
                "threshold": detector.threshold,
                "rule": "unknown when unknown_score > threshold",
            }
        )
    return {
        **extra,
        "classes": json.dumps(model.classes),
        "preprocessing": json.dumps(preprocessing),
        "backbone": model.backbone_name,
        "head": model.head.kind,
        "headstart_version": __version__,
    }


def quantize_int8(fp32_path: Path, calibration: NDArray[np.uint8] | Pixels, workdir: Path, progress: Progress | None = None) -> bytes:
    """Static int8 quantisation (QDQ, per channel) of the backbone, its activation ranges set on `calibration`.

    Chosen on flowers by top-1 agreement with fp32 (bench/results.md): unsigned 8-bit weights and activations,
    because x86 CPUs without VNNI multiply unsigned by signed bytes in pairs that can saturate (ONNX Runtime's
    known issue; signed weights agreed on 95%), and ranges from the 99.999th percentile rather than the extremes
    (99.3% vs 99.0%). The preprocessing and the head stay in float: they cost little, and keep the probabilities smooth.
    `calibration` holds the photos as the file's input takes them: one array, or one per input of an ensemble's file;
    they are calibrated on `CALIBRATION_BATCH` at a time, so memory does not grow with their number.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    inputs = (calibration,) if isinstance(calibration, np.ndarray) else tuple(calibration)
    names = input_names(len(inputs))
    n_images = len(inputs[0])

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """`CALIBRATION_BATCH` photos per `get_next`; the calibrator asks for them one at a time (`set_range`, see below)."""

        def __init__(self) -> None:
            self.set_range(0, len(self))

        def __len__(self) -> int:
            return -(-n_images // CALIBRATION_BATCH)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.batches = iter(range(start_index, end_index))

        def get_next(self) -> dict[str, NDArray[np.uint8]] | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            start = batch * CALIBRATION_BATCH
            if progress:
                progress("Calibrating int8 ranges", min(start + CALIBRATION_BATCH, n_images), n_images)
            return {name: x[start : start + CALIBRATION_BATCH] for name, x in zip(names, inputs, strict=True)}

    prepared, quantized = workdir / "prepared.onnx", workdir / "int8.onnx"
    with _quiet():  # the quantiser logs a line per tensor through the root logger, and prints its progress
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        # headstart's own nodes stay float, but for the kNN detector's product with its reference features: 8-bit weights there
        # keep an int8 file small (the references can outweigh the backbone); the unknown score moves by about 1e-2
        float_nodes = [n.name for n in onnx.load(str(prepared)).graph.node if n.name.startswith("headstart/") and n.name != KNN_PRODUCT]
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.Percentile,
            nodes_to_exclude=float_nodes,
            # the calibrator keeps every activation of what it is given at once (6.7 GB at the peak for 100 flower photos);
            # with a stride, quantize_static gives it that many of the reader's batches at a time (any method, despite the
            # name), each folded into the histograms before the next: 0.85 GB at the peak, the whole export included
            extra_options={"CalibStridedMinMax": 1},
        )
    model = onnx.load(str(quantized))
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No log records and no printing from third-party code in this block."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers the outputs do not need (the backbone's second output, "feature_map")."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    value_info = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def _decode_labelled(
    records: Sequence[ImageRecord], classes: Sequence[str], cfgs: Sequence[DataConfig], progress: Progress | None
) -> tuple[Pixels, NDArray[np.int64]]:
    """The readable photos' pixels, as the export takes them, and their class indices."""
    pixels, kept = _decode([r.path for r in records], cfgs, progress, "Reading validation photos")
    return pixels, np.asarray([classes.index(records[k].label) for k in kept], dtype=np.int64)


def _calibration_pixels(model: Model, data: Path | None, progress: Progress | None) -> Pixels:
    """Up to `CALIBRATION_IMAGES` photos, a seeded sample: the images in `data` (labels not needed), or else the model's
    recorded validation (or test) photos. No folder named in the model (its training `data`, say) is ever searched."""
    if data is not None:
        paths, skipped = list_images([data])
        if not paths and skipped:
            raise DataError(
                f"{display(data)}: {skipped[0].reason}. Give --calibration a folder of photos like the ones the model will see."
            )
        where = f"{display(data)}: no photo could be read. Give --calibration a folder of photos like the ones the model will see."
    else:
        paths = [r.path for r in model.summary.val_images or model.summary.test_images]
        where = (
            "None of the model's recorded validation photos, on which int8 calibrates, could be read (moved, or on another machine)"
            if paths
            else "The model records no validation or test photos for int8 to calibrate on"
        ) + ". Give photos like the ones the model will see with --calibration DATA."
    chosen = [paths[i] for i in sorted(np.random.default_rng(model.summary.seed).permutation(len(paths))[:CALIBRATION_IMAGES])]
    pixels, _ = _decode(chosen, model.data_configs, progress, "Reading calibration photos")
    if not len(pixels[0]):
        raise DataError(where)
    return pixels


def _decode(paths: Sequence[Path], cfgs: Sequence[DataConfig], progress: Progress | None, description: str) -> tuple[Pixels, list[int]]:
    """Pixels of the readable photos, decoded as `headstart predict` decodes them (once, then per config), and their positions in `paths`.

    Unreadable ones (moved or changed since training, say) are left out: the others are used.
    """
    pixels: list[Pixels] = []
    kept: list[int] = []
    for start in range(0, len(paths), 32):
        positions, chunk, _ = decode_member_pixels(paths[start : start + 32], cfgs)
        pixels.append(chunk)
        kept += [start + k for k in positions]
        if progress:
            progress(description, min(start + 32, len(paths)), len(paths))
    stacked = tuple(
        np.concatenate([p[m] for p in pixels]) if pixels else np.zeros((0, cfg.input_size, cfg.input_size, 3), np.uint8)
        for m, cfg in enumerate(cfgs)
    )
    return stacked, kept


def _onnx_runner(data: bytes) -> _Runner:
    session = cpu_session(data, available_cpus())
    names = [i.name for i in session.get_inputs()]

    def run(pixels: Pixels) -> NDArray[np.float32]:
        proba: NDArray[np.float32] = session.run([OUTPUT_NAME], dict(zip(names, pixels, strict=True)))[0]
        return proba

    return run


def _timed(run: _Runner, pixels: Pixels, batch: int) -> tuple[NDArray[np.float32], float]:
    """`run` over `pixels` in batches, and images per second (the first batch, a warm-up, run twice and timed once)."""
    n = len(pixels[0])
    run(tuple(p[:batch] for p in pixels))
    start = time.perf_counter()
    proba = np.concatenate([run(tuple(p[k : k + batch] for p in pixels)) for k in range(0, n, batch)])
    return proba, n / (time.perf_counter() - start)


def _compare(run: _Runner, reference: _Runner, pixels: Pixels, labels: NDArray[np.int64], batch: int) -> ExportCheck:
    proba, speed = _timed(run, pixels, batch)
    expected, reference_speed = _timed(reference, pixels, batch)
    return _summarise(proba, expected, labels, speed, reference_speed)


def _check_against_model(model: Model, data: bytes, pixels: Pixels, labels: NDArray[np.int64]) -> ExportCheck:
    """The fp32 export against the model's own engine and head on the same decoded photos."""
    return _compare(_onnx_runner(data), lambda batch: _predict_pixels(model, batch), pixels, labels, batch=32)


def _predict_pixels(model: Model, pixels: Pixels) -> NDArray[np.float32]:
    """What `Model.predict_proba` computes once a photo is decoded, resized and cropped (per backbone)."""
    from headstart.transforms import normalize

    return model.outputs(model.features([normalize(p, cfg) for p, cfg in zip(pixels, model.data_configs, strict=True)]))[0]


def _summarise(
    proba: NDArray[np.float32], expected: NDArray[np.float32], labels: NDArray[np.int64], speed: float, reference_speed: float
) -> ExportCheck:
    top, expected_top = proba.argmax(1), expected.argmax(1)
    return ExportCheck(
        n_images=len(labels),
        agreement=float(np.mean(top == expected_top)),
        max_difference=float(np.abs(proba - expected).max()),
        accuracy=float(np.mean(top == labels)),
        reference_accuracy=float(np.mean(expected_top == labels)),
        images_per_second=speed,
        reference_images_per_second=reference_speed,
    )
