"""What reduced-scale JPEG decoding costs in accuracy and saves in time, on large photos.

    .venv/bin/python bench/decode.py [DATA] [--per-class 300] [--scale 4]

headstart decodes JPEGs at least four times the resize size on their short
side at 1/2, 1/4 or 1/8 scale (keeping twice the resize size) before the
usual bicubic resize and crop. The shared flower photos are all smaller than
that, so this makes large versions of them (bicubic upscaling x`scale`, JPEG
quality 92) and compares full and reduced decoding: decode time, feature
difference, the backbone's ImageNet top-1 and a linear head's validation
accuracy. Prints a table and appends it to bench/results.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import FLOWERS, publish, table
from PIL import Image

from headstart.backbone import create_backbone
from headstart.classifier import HeadClassifier
from headstart.data import ImageRecord, split_records
from headstart.engine import create_engine
from headstart.pipeline import decode_input
from headstart.transforms import normalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=FLOWERS)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--scale", type=int, default=4)
    args = parser.parse_args()
    backbone = create_backbone("efficientnet_lite0")
    cfg = backbone.data_config
    with tempfile.TemporaryDirectory() as tmp:
        records, sizes = [], []
        for folder in sorted(p for p in args.data.iterdir() if p.is_dir()):
            for source in sorted(folder.iterdir())[: args.per_class]:
                image = Image.open(source).convert("RGB")
                large = image.resize((image.width * args.scale, image.height * args.scale), Image.Resampling.BICUBIC)
                path = Path(tmp) / f"{folder.name}_{source.stem}.jpg"
                large.save(path, quality=92)
                records.append(ImageRecord(path, folder.name))
                sizes.append(large.size)
        engine = create_engine(backbone, "onnx", Path(tmp) / "cache")
        results = {}
        for reduced in (False, True):
            started = time.perf_counter()
            pixels = np.stack([decode_input(r.path, cfg, reduced_decode=reduced) for r in records])
            seconds = time.perf_counter() - started
            inputs = normalize(pixels, cfg)
            features = np.concatenate([engine(inputs[i : i + 32]) for i in range(0, len(inputs), 32)])
            results[reduced] = (seconds, features)

    full, reduced = results[False][1], results[True][1]
    error = np.abs(reduced - full).max(1) / np.abs(full).max(1)
    with torch.inference_mode():
        classifier = backbone.module.get_classifier()
        top1 = [classifier(torch.from_numpy(f)).argmax(1).numpy() for f in (full, reduced)]
    train, val = split_records(records, 0.2, seed=0)
    index = {r.path: i for i, r in enumerate(records)}
    rows = []
    accuracy = {}
    for name, features in (("full", full), ("reduced", reduced)):
        X_train, X_val = features[[index[r.path] for r in train]], features[[index[r.path] for r in val]]
        y_train, y_val = [r.label for r in train], np.asarray([r.label for r in val])
        clf = HeadClassifier(random_state=0).fit(X_train, y_train, X_val, list(y_val))
        accuracy[name] = float(np.mean(clf.predict(X_val) == y_val))
    for name, reduced_decode in (("full decode", False), ("reduced decode", True)):
        seconds = results[reduced_decode][0]
        rows.append((name, f"{1000 * seconds / len(records):.1f}", f"{accuracy[name.split()[0]]:.4f}"))
    lines = [
        *table(["", "decode + resize + crop ms/image (1 core)", f"linear head val accuracy ({len(val)} images)"], rows),
        f"\n{len(records)} flower photos upscaled x{args.scale} (short side {min(min(s) for s in sizes)}-{max(min(s) for s in sizes)} px); "
        f"{sum(min(s) >= 4 * cfg.resize_size for s in sizes)} of them large enough to be decoded at reduced scale. "
        f"Feature difference (max |reduced - full| / max |full| per image): median {np.median(error):.1e}, max {error.max():.1e}. "
        f"ImageNet top-1 agrees on {np.mean(top1[0] == top1[1]):.1%} of the images. "
        "`headstart imagenet` therefore decodes at full scale; training and prediction use reduced decoding.",
    ]
    publish(f"decode: reduced-scale JPEG decoding on large photos (x{args.scale} flowers)", lines)


if __name__ == "__main__":
    main()
