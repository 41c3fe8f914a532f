"""Classify photos with a model from `headstart export`, using only ONNX Runtime, Pillow and NumPy.

python onnx_predict.py model.onnx photo.jpg [photo2.jpg ...]

Prints the top 3 classes of each photo and, for a model with an unknown detector, whether it looks like none of them.
An ensemble's file has one input per backbone (metadata `preprocessing.inputs`): each photo is decoded once,
then resized and cropped for each input.
"""

import json
import sys

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
classes, prep = json.loads(meta["classes"]), json.loads(meta["preprocessing"])
inputs = prep.get("inputs") or [dict(prep, name="image")]  # files exported before ensembles list no inputs
resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def decode(path: str) -> Image.Image:
    image = Image.open(path)
    image.draft(None, (prep["jpeg_draft_size"],) * 2)  # JPEGs: decode at reduced scale when far larger than needed
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16- or 32-bit grey: scaled to 8 bits by its range
        grey = np.asarray(image, dtype=np.float32)
        image = Image.fromarray((grey * (255.0 / (65535.0 if grey.max(initial=0) > 255 else 255.0))).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def pixels(image: Image.Image, spec: dict) -> np.ndarray:
    resize, size, (w, h) = spec["resize_size"], spec["input_size"], image.size
    image = image.resize((resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize), resample[spec["interpolation"]])
    left, top = round((image.width - size) / 2), round((image.height - size) / 2)
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


unknown = json.loads(meta["unknown"]) if "unknown" in meta else None  # models with an unknown detector have a second output

for path in sys.argv[2:]:
    image = decode(path)
    feeds = {spec["name"]: pixels(image, spec)[None] for spec in inputs}
    outputs = session.run(["probabilities"] + ([unknown["output"]] if unknown else []), feeds)
    probabilities = outputs[0][0]
    best = np.argsort(-probabilities)[:3]
    verdict = []
    if unknown:  # past the threshold: the photo looks like none of the model's classes
        score = float(outputs[1][0])
        verdict = [("UNKNOWN" if score > unknown["threshold"] else "known") + f" (unknown_score {score:.4f})"]
    print(path, *(f"{classes[i]} {probabilities[i]:.5f}" for i in best), *verdict, sep="\t")
