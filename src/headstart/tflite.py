"""ONNX to TFLite (LiteRT) for phones: fp32, or int8 calibrated on photos, run back with the LiteRT interpreter.

The ONNX file is the one `headstart export` writes: uint8 RGB pixels (n, H, W, 3)
in "image", probabilities in "probabilities", normalisation and a Transpose to
channels-first inside the graph. The .tflite file keeps that contract: its input
is uint8 (n, H, W, 3) (any n; LiteRT resizes it), its output float32
(n, n_classes), and its signature "serving_default" maps "image" to
"probabilities". An ensemble's file has one such input per backbone
("image_0", "image_1", ...), and so has its .tflite file.

The conversion needs the optional extra (`pip install 'headstart[tflite]'`):
onnx2tf turns the graph into TensorFlow ops, TensorFlow's converter writes the
flatbuffer. It runs in a temporary folder; its output (Python and C++ alike) is
kept from the terminal unless it fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from headstart.errors import ConfigError, TFLiteConversionError
from headstart.files import atomic_write_bytes
from headstart.model_export import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    import onnx

INSTALL_HINT = "pip install 'headstart[tflite]'"
_ELEMENTWISE = ("Cast", "Mul", "Div", "Sub", "Add")  # ops that may sit between the pixels and the Transpose to channels-first
_FAILURE_LOG_LINES = 40
_CONVERTER_MODULES = ("onnx2tf", "tensorflow", "tf_keras", "onnx_graphsurgeon", "sng4onnx", "psutil")


def convert(onnx_path: Path, out: Path, calibration: NDArray[np.uint8] | Sequence[NDArray[np.uint8]] | None = None) -> Path:
    """Convert a headstart ONNX model to a .tflite file at `out`: fp32, or int8 when `calibration` is given.

    int8 is TFLite's "integer quantization" with float fallback: weights int8 per
    channel, activations int8 with ranges measured on `calibration`, the uint8
    input and the float32 probabilities left as they are, so callers feed and read
    both files the same way.

    Args:
        onnx_path: the ONNX file, input uint8 (n, H, W, 3) named "image" (an ensemble's: one per backbone,
            "image_0", "image_1", ...), output float32 (n, n_classes).
        out: the .tflite file to write; written under a temporary name, then renamed, so it is never half-written.
        calibration: uint8 pixels of shape (n_images, H, W, 3) for int8, one array per input (in input order);
            None (the default) for fp32.

    Returns:
        `out`.

    Raises:
        ConfigError: the converter is not installed, the calibration pixels are not (n, H, W, 3) uint8,
            or the ONNX model does not have headstart's input.
        TFLiteConversionError: the converter failed (its log goes to stderr).
    """
    inputs = None
    if calibration is not None:
        inputs = [_check_pixels(c, "calibration") for c in ([calibration] if isinstance(calibration, np.ndarray) else calibration)]
        if not inputs or not len(inputs[0]) or any(len(c) != len(inputs[0]) for c in inputs):
            raise ConfigError("int8 needs calibration photos, as many for each input: got none, or unequal numbers.")
    missing = [name for name in _CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if missing:  # looked up, not imported: importing TensorFlow takes seconds and talks on stderr
        raise ConfigError(f"TFLite export needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="headstart-tflite-") as tmp:
        work = Path(tmp)
        prepared, names = _prepare(onnx_path, work)
        if inputs is not None and len(inputs) != len(names):
            raise ConfigError(f"{onnx_path.name} has {len(names)} inputs; calibration gives pixels for {len(inputs)}.")
        failure: BaseException | None = None
        with open(work / "converter.log", "w+b") as log:
            with _silenced_fds(log):
                try:
                    data = _to_tflite(prepared, work, names, inputs)
                except (Exception, SystemExit) as e:  # onnx2tf calls sys.exit(1) on some failures
                    failure = e
            if failure is not None:
                lines = _echo_tail(log)
                said = lines if isinstance(failure, SystemExit) else str(failure).strip().splitlines()
                reason = next((line.strip() for line in reversed(said) if line.strip()), type(failure).__name__)
                raise TFLiteConversionError(f"TFLite conversion of {onnx_path.name} failed: {reason} (the converter's log is above)")
    return atomic_write_bytes(out, data)


def run_tflite(path: Path, images: NDArray[np.uint8] | Sequence[NDArray[np.uint8]]) -> NDArray[np.float32]:
    """Class probabilities from a .tflite file written by `convert`, one image at a time (as on a phone), in LiteRT.

    Args:
        path: the .tflite file.
        images: uint8 RGB pixels of shape (n_images, H, W, 3), resized and cropped as for the ONNX export;
            for an ensemble's file, one such array per input, in input order ("image_0", "image_1", ...).

    Returns:
        float32 array of shape (n_images, n_classes).

    Raises:
        ConfigError: LiteRT is not installed, or `images` does not match the file's input.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ConfigError(f"Running a .tflite file needs LiteRT, which is not installed: {INSTALL_HINT}") from None
    arrays = [_check_pixels(x, "images") for x in ([images] if isinstance(images, np.ndarray) else images)]
    with tempfile.TemporaryFile() as log, _silenced_fds(log):  # LiteRT announces its XNNPACK delegate on stderr
        interpreter = Interpreter(model_path=str(path), num_threads=len(os.sched_getaffinity(0)))
    details = interpreter.get_input_details()
    (output,) = interpreter.get_output_details()
    if len(details) > 1:  # an ensemble's: "serving_default_image_0:0", ... in the order of the names
        by_name = {re.sub(r"^serving_default_|:\d+$", "", d["name"]): d for d in details}
        details = [by_name.get(f"{INPUT_NAME}_{k}", details[k]) for k in range(len(details))]
    if len(arrays) != len(details) or any(len(x) != len(arrays[0]) for x in arrays):
        raise ConfigError(
            f"{path.name} takes {len(details)} input(s) of as many images each; got {len(arrays)} of {[len(x) for x in arrays]}."
        )
    for inp, x in zip(details, arrays, strict=True):
        expected = tuple(int(d) for d in inp["shape_signature"][1:])
        if inp["dtype"] is not np.uint8 or x.shape[1:] != expected:
            raise ConfigError(
                f"{path.name} takes {np.dtype(inp['dtype']).name} pixels of shape (n, {', '.join(map(str, expected))}); got uint8 {x.shape}."
            )
        interpreter.resize_tensor_input(inp["index"], [1, *expected])
    with tempfile.TemporaryFile() as log, _silenced_fds(log):
        interpreter.allocate_tensors()
    scale, zero_point = output["quantization"]
    rows = []
    for k in range(len(arrays[0])):
        for inp, x in zip(details, arrays, strict=True):
            interpreter.set_tensor(inp["index"], x[k : k + 1])
        interpreter.invoke()
        row = interpreter.get_tensor(output["index"])[0]
        rows.append((row.astype(np.float32) - zero_point) * scale if scale else row.astype(np.float32))
    n_classes = int(output["shape_signature"][-1])
    return np.stack(rows) if rows else np.zeros((0, n_classes), np.float32)


def _check_pixels(pixels: NDArray[np.uint8], name: str) -> NDArray[np.uint8]:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ConfigError(f"{name} must be uint8 RGB pixels of shape (n, H, W, 3); got {got}.")
    return np.ascontiguousarray(pixels)


def _prepare(onnx_path: Path, work: Path) -> tuple[Path, list[str]]:
    """The model with channels-first inputs and its constants folded, as onnx2tf converts it cleanly; and its input names.

    onnx2tf turns a 4-D channels-first input into a channels-last one itself, but
    mistakes a channels-last input followed by a Transpose for a channels-first one.
    So the Transpose moves to the input (the normalisation constants turned with it)
    and onnx2tf puts it back. ONNX Runtime's basic optimisations then fold the
    PyTorch exporter's padding arithmetic into constants, which onnx2tf needs.
    """
    import onnx
    import onnxruntime

    model = onnx.load(str(onnx_path))
    names = _channels_first_inputs(model, onnx_path.name)
    moved = work / "channels_first.onnx"
    onnx.save(model, str(moved))
    folded = work / "model.onnx"
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(moved), options, providers=["CPUExecutionProvider"])
    return folded, names


def _channels_first_inputs(model: onnx.ModelProto, name: str) -> list[str]:
    """`_channels_first_input` for each input (one, or one per backbone of an ensemble); returns their names in order."""
    from onnx import TensorProto

    graph = model.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 4 or dims[3].dim_value != 3 or value.type.tensor_type.elem_type != TensorProto.UINT8:
            raise ConfigError(
                f"{name}: TFLite export takes a model with one uint8 input of shape (n, H, W, 3) (an ensemble: one per backbone), "
                "as `headstart export` writes."
            )
    if not inputs:
        raise ConfigError(f"{name}: TFLite export takes a model with one uint8 input of shape (n, H, W, 3), as `headstart export` writes.")
    for value in inputs:
        _channels_first_input(model, value, name)
    return [value.name for value in inputs]


def _channels_first_input(model: onnx.ModelProto, value: onnx.ValueInfoProto, name: str) -> None:
    """Move the Transpose(0, 3, 1, 2) that follows the uint8 (n, H, W, 3) input `value` up to that input, in place."""
    from onnx import numpy_helper

    graph = model.graph
    dims = value.type.tensor_type.shape.dim
    initializers = {t.name: t for t in graph.initializer}
    chain, tensor = [], value.name
    while True:
        users = [node for node in graph.node if tensor in node.input]
        node = users[0] if len(users) == 1 else None
        if node is not None and node.op_type == "Transpose" and [list(a.ints) for a in node.attribute] == [[0, 3, 1, 2]]:
            break
        if node is None or node.op_type not in _ELEMENTWISE or any(x not in initializers for x in node.input if x != tensor):
            raise ConfigError(f"{name}: TFLite export expects the normalisation and then a Transpose to channels-first after the input.")
        chain.append(node)
        tensor = node.output[0]
    transpose = node
    for node in chain:
        for k, x in enumerate(node.input):
            constant = numpy_helper.to_array(initializers[x]) if x in initializers else None
            if constant is not None and constant.size > 1:
                constant = constant.reshape((1,) * (4 - constant.ndim) + constant.shape).transpose(0, 3, 1, 2)
                turned = numpy_helper.from_array(np.ascontiguousarray(constant), f"{x}/channels_first")
                graph.initializer.append(turned)
                node.input[k] = turned.name
    for node in graph.node:
        for k, x in enumerate(node.input):
            if x == transpose.output[0]:
                node.input[k] = transpose.input[0]
    graph.node.remove(transpose)
    stale = {node.output[0] for node in chain}
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    order = [dims[0], dims[3], dims[1], dims[2]]
    new_dims = [type(d)() for d in order]
    for new, old in zip(new_dims, order):
        new.CopyFrom(old)
    del dims[:]
    dims.extend(new_dims)


def _to_tflite(prepared: Path, work: Path, names: list[str], calibration: list[NDArray[np.uint8]] | None) -> bytes:
    """onnx2tf to a Keras model in memory (no SavedModel: writing one takes most of a minute), then TFLite's converter.

    `names` are the model's inputs, in order; `calibration`, for int8, pixels for each. Importing onnx2tf
    lifts Python's recursion limit to the C int maximum; the limit is put back afterwards, or deeply nested
    JSON (a hostile bundle.json) would crash the process instead of raising RecursionError.
    """
    limit = sys.getrecursionlimit()
    try:
        return _convert(prepared, work, names, calibration)
    finally:
        sys.setrecursionlimit(limit)


def _convert(prepared: Path, work: Path, names: list[str], calibration: list[NDArray[np.uint8]] | None) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TensorFlow's and onnx2tf's deprecation notices are about their internals, not ours
        import onnx2tf
        import tensorflow as tf

        keras_model = onnx2tf.convert(
            input_onnx_file_path=str(prepared),
            output_folder_path=str(work / "tf"),
            not_use_onnxsim=True,  # constants are already folded (`_prepare`); onnxsim is not installed
            disable_model_save=True,
            non_verbose=True,
        )
        specs = keras_model.inputs
        if len(specs) != len(names):
            raise TFLiteConversionError(f"onnx2tf made a model of {len(specs)} inputs from one of {len(names)}")
        signature = [tf.TensorSpec(spec.shape, spec.dtype, name=n) for spec, n in zip(specs, names, strict=True)]

        @tf.function(input_signature=signature)  # type: ignore[untyped-decorator]
        def serve(*images: Any) -> dict[str, Any]:
            return {OUTPUT_NAME: keras_model(images[0] if len(images) == 1 else list(images))}

        holder = tf.Module()  # the function alone: saving the Keras model's layer configs would take most of a minute
        holder.serve = serve
        converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], holder)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if calibration is not None:
            inputs = calibration

            def representative() -> Iterator[list[NDArray[np.uint8]]]:
                for k in range(len(inputs[0])):
                    yield [x[k : k + 1] for x in inputs]

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        data: bytes = converter.convert()
    return data


@contextlib.contextmanager
def _silenced_fds(log: IO[bytes]) -> Iterator[None]:
    """Send this process's stdout and stderr, C++ libraries' included, to `log` for the duration.

    Python code writes to streams on file descriptors 1 and 2 meanwhile (never closed), so a
    logging handler that a library sets up inside keeps writing to the real ones afterwards.
    """
    _flush()
    saved = [os.dup(1), os.dup(2)]
    fd_out = open(1, "w", closefd=False, buffering=1, errors="replace")  # noqa: SIM115  (outlives the block)
    fd_err = open(2, "w", closefd=False, buffering=1, errors="replace")  # noqa: SIM115
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(fd_out), contextlib.redirect_stderr(fd_err):
            yield
    finally:
        _flush()
        fd_out.flush()
        fd_err.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or replaced stream has nothing of ours to flush
            stream.flush()


def _echo_tail(log: IO[bytes]) -> list[str]:
    """The converter's last lines, written to stderr after a failure, without colour codes."""
    log.seek(0)
    lines = re.sub(r"\x1b\[[0-9;]*m", "", log.read().decode(errors="replace")).splitlines()[-_FAILURE_LOG_LINES:]
    print("\n".join(lines), file=sys.stderr)
    return lines
