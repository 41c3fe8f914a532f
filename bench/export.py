"""export: ONNX fp32, ONNX int8, TFLite fp32 and TFLite int8 of one flowers model, against the model itself.

    .venv/bin/python bench/export.py [--data DATA] [--no-tflite] [--no-record]

Trains efficientnet_lite0 + a linear head on DATA (default: the flowers dataset) with
a temporary cache, then:
- parity: every photo of DATA through examples/onnx_predict.py (ONNX Runtime, Pillow,
  NumPy; a fresh process) against `headstart predict` (`Model.predict`): top-1
  agreement and the largest difference of the printed top-3 probabilities;
- each export as `headstart export` writes it: size, images/s (ONNX Runtime batches
  of 32, 2 threads; LiteRT one image at a time), validation accuracy and top-1
  agreement with its reference on the 300 validation photos, and seconds to export.
Prints the tables and appends them to bench/results.md (--no-record: print only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import FLOWERS, REPO, publish, table

import headstart
from headstart.model_export import export


def parity(onnx_file: Path, model: headstart.Model, photos: list[Path]) -> tuple[float, float]:
    """Top-1 agreement and the largest probability difference between the standalone example and `Model.predict`."""
    run = subprocess.run(
        [sys.executable, str(REPO / "examples" / "onnx_predict.py"), str(onnx_file), *map(str, photos)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {row[0]: [cell.rsplit(" ", 1) for cell in row[1:]] for row in (line.split("\t") for line in run.stdout.splitlines())}
    expected = {str(p.path): dict(p.top_k) for p in model.predict(photos, top_k=len(model.classes))}
    same = sum(rows[path][0][0] == max(top, key=top.__getitem__) for path, top in expected.items())
    largest = max(abs(float(p) - expected[path][name]) for path, cells in rows.items() for name, p in cells)
    return same / len(expected), largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLOWERS)
    parser.add_argument("--no-tflite", action="store_true", help="leave out the TFLite exports")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = headstart.train(args.data, cache_dir=folder / "cache", report=False)
        photos = sorted(p for p in args.data.rglob("*") if p.is_file())
        rows = []
        for fmt, int8 in [("onnx", False), ("onnx", True)] + ([] if args.no_tflite else [("tflite", False), ("tflite", True)]):
            start = time.perf_counter()
            result = export(model, folder / f"model{'.int8' if int8 else ''}.{fmt}", fmt, int8)  # type: ignore[arg-type]
            seconds = time.perf_counter() - start
            check = result.check
            assert check is not None
            rows.append(
                [
                    f"{fmt} {'int8' if int8 else 'fp32'}",
                    f"{result.size_bytes / 1e6:.1f} MB",
                    result.reference,
                    f"{check.images_per_second:.1f} vs {check.reference_images_per_second:.1f} ({check.images_per_second / check.reference_images_per_second:.2f}x)",
                    f"{check.accuracy:.2%} vs {check.reference_accuracy:.2%}",
                    f"{check.agreement:.2%}",
                    f"{check.max_difference:.1e}",
                    f"{seconds:.0f} s",
                ]
            )
        agreement, largest = parity(folder / "model.onnx", model, photos)
    lines = [
        f"Every photo of {args.data.name} ({len(photos)}) through examples/onnx_predict.py vs `headstart predict`: "
        f"top-1 agreement {agreement:.2%}, largest difference of the top-3 probabilities {largest:.1e} (printed to 5 decimals).",
        "",
        f"Each export on the {check.n_images} validation photos against its reference (the model, or the fp32 ONNX file):",
        "",
        *table(
            ["file", "size", "reference", "images/s (vs reference)", "accuracy (vs reference)", "same top-1", "max |Δp|", "export"], rows
        ),
    ]
    publish("export: parity, size and speed of the exported files", lines, record=not args.no_record)


if __name__ == "__main__":
    main()
