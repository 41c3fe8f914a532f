"""Backbone weights in PyTorch: reading state dicts, mapping EfficientNet-Lite's keys onto timm's, building timm models.

The only module that imports timm to build networks; imported only when a backbone's network is needed.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headstart.errors import BackboneWeightsError


def build_module(name: str, architecture: str, state: dict[str, torch.Tensor] | None) -> tuple[Any, bool]:
    """The timm model `architecture` with `state` (None: timm's pretrained download), and whether its classifier was loaded too."""
    import timm

    if state is None:
        try:
            return timm.create_model(architecture, pretrained=True), True
        except Exception as e:
            raise BackboneWeightsError(
                f"Could not download ImageNet weights for '{name}' ({type(e).__name__}). "
                f"Connect to the internet, or pass --weights FILE (safetensors or state dict for {architecture})."
            ) from None
    module = timm.create_model(architecture, pretrained=False)
    if "_conv_stem.weight" in state:  # efficientnet_pytorch layout
        state = rename_lite_keys(state, module.blocks)
    classifier = module.default_cfg.get("classifier", "classifier")
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise BackboneWeightsError(
            f"The weights do not fit {architecture}: {detail} Give a state dict saved from timm's '{architecture}'."
        ) from None
    head_missing = [k for k in missing if k.startswith(classifier + ".")]
    if unexpected or len(head_missing) != len(missing):
        bad = (unexpected or [k for k in missing if k not in head_missing])[:3]
        raise BackboneWeightsError(
            f"The weights do not fit {architecture}: {'unexpected' if unexpected else 'missing'} keys {bad}. "
            f"Give a state dict saved from timm's '{architecture}'."
        )
    return module, not head_missing


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a plain PyTorch one (read without unpickling code), wrappers and `module.` prefixes removed.

    A PyTorch zip file must hold its members uncompressed, as `torch.save` writes them: a compressed one could unpack
    to far more memory than the file's size (1 MB to 1 GiB).
    """
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: weights file not found.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(path)
        else:
            _check_uncompressed(path)
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the outcome is a state dict or one line
                warnings.simplefilter("ignore", UserWarning)
                loaded = torch.load(path, map_location="cpu", weights_only=True)
    except BackboneWeightsError:
        raise
    except pickle.UnpicklingError:  # PyTorch's message advises loading with weights_only=False, which would run the pickle's code
        raise BackboneWeightsError(
            f"{path}: a pickle holding more than tensors (classes or functions); refused, as unpickling those can run code. "
            "Give a .safetensors file or a plain state dict of tensors."
        ) from None
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BackboneWeightsError(
            f"{path}: cannot read weights ({type(e).__name__}: {first_line}). Give a .safetensors file or a plain state dict."
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    state = loaded
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{path}: not a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_uncompressed(path: Path) -> None:
    """Raise BackboneWeightsError if `path` is a zip file with a compressed member, or members larger than the file."""
    if not zipfile.is_zipfile(path):
        return  # PyTorch's legacy format: tensors read as stored in the file
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    stored = all(m.compress_type == zipfile.ZIP_STORED and m.file_size == m.compress_size for m in members)
    if not stored or sum(m.file_size for m in members) > path.stat().st_size:
        raise BackboneWeightsError(
            f"{path}: a zip file with compressed members, which torch.save never writes (they could unpack to far more "
            "memory than the file's size); refused. Give a .safetensors file or a state dict saved by torch.save."
        )


def hash_state_dict(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rename_lite_keys(state: dict[str, torch.Tensor], blocks: nn.Sequential) -> dict[str, torch.Tensor]:
    """Map an `efficientnet_pytorch` EfficientNet-Lite state dict onto timm's `tf_efficientnet_lite*`.

    `blocks` is the timm model's `blocks` (stages of blocks): flat block i is the
    i-th block when they are numbered stage by stage.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    expands = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    positions = [(s, j) for s, stage in enumerate(blocks.children()) for j in range(len(list(stage.children())))]
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            table = inverted if i in expands else separable
            stage, j = positions[i]
            renamed[".".join(["blocks", str(stage), str(j), table[parts[2]], *parts[3:]])] = tensor
        else:
            renamed[".".join([top[parts[0]], *parts[1:]])] = tensor
    return renamed
