"""Model registry (timm-style): CIFAR ResNets, torchvision models by name, user factories; checkpoints."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

__all__ = ["MODELS", "create_model", "load_checkpoint", "CifarResNet", "weights_names", "check_weights",
           "check_input_shape"]


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + BN projection where the shape changes."""

    def __init__(self, in_planes: int, planes: int, *, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        # Option B of He et al.: a real conv, not zero-padding, so every layer is a plain decomposable conv.
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from the pooled map through two linear layers."""

    def __init__(self, channels: int, *, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * gate[:, :, None, None]


class SEBasicBlock(BasicBlock):
    """A basic block whose residual branch is gated by squeeze-and-excitation before the sum."""

    def __init__(self, in_planes: int, planes: int, *, stride: int) -> None:
        super().__init__(in_planes, planes, stride=stride)
        self.se = SqueezeExcite(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + self.downsample(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, sec. 4.2): 16/32/64 channels, 3 stages."""

    def __init__(self, depth: int, *, in_channels: int = 3, num_classes: int = 10,
                 block: type[BasicBlock] = BasicBlock) -> None:
        super().__init__()
        self.block = block
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, in_planes: int, planes: int, blocks: int, *, stride: int) -> nn.Sequential:
        layers = [self.block(in_planes, planes, stride=stride)]
        layers += [self.block(planes, planes, stride=1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-20 for 32x32-ish inputs."""
    return CifarResNet(20, in_channels=in_channels, num_classes=num_classes)


def resnet32(in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-32 for 32x32-ish inputs."""
    return CifarResNet(32, in_channels=in_channels, num_classes=num_classes)


def resnet56(in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-56 for 32x32-ish inputs."""
    return CifarResNet(56, in_channels=in_channels, num_classes=num_classes)


def se_resnet20(in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-20 with squeeze-and-excitation in every block (the paper's SE-ResNet family, CIFAR-sized)."""
    return CifarResNet(20, in_channels=in_channels, num_classes=num_classes, block=SEBasicBlock)


def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: 3x3 stride-1 conv1 and no max-pool."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


# torchvision's MobileNetV2 with the strides of its first conv and second stage set to 1: 32 px images end on a
# 4x4 map (total stride 8) as in the CIFAR versions of the paper's family, instead of 1x1 (total stride 32).
MOBILENET_V2_CIFAR_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                              [6, 160, 3, 2], [6, 320, 1, 1]]


def mobilenet_v2_cifar(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision MobileNetV2 for 32x32-ish inputs: stride-1 stem and second stage (total stride 8)."""
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes,
                                            inverted_residual_setting=MOBILENET_V2_CIFAR_SETTING)
    model.features[0][0].stride = (1, 1)
    _set_first_conv_in_channels(model, in_channels)
    return model


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "mobilenet_v2_cifar": mobilenet_v2_cifar,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "se_resnet20": se_resnet20,
}


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}; "
        "also accepted: any torchvision.models name or 'pkg.module:factory'"
    )


def _set_first_conv_in_channels(model: nn.Module, in_channels: int, *, pretrained: bool = False) -> None:
    """Replace the first nn.Conv2d by one reading `in_channels` channels: fresh, or with ``pretrained`` the old
    kernel summed over its input channels (one channel) or cycled over them (more), as timm's
    ``adapt_input_conv`` does, so a grey image gives the RGB conv's response to the same grey."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels == in_channels:
                return
            if conv.groups != 1:
                raise NotImplementedError(f"first conv {name!r} has groups={conv.groups}; cannot change its input channels")
            new = nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            )
            if pretrained:
                with torch.no_grad():
                    old = conv.weight
                    if in_channels == 1:
                        new.weight.copy_(old.sum(1, keepdim=True))
                    else:
                        repeats = -(-in_channels // old.shape[1])
                        new.weight.copy_(old.repeat(1, repeats, 1, 1)[:, :in_channels] * (old.shape[1] / in_channels))
                    if conv.bias is not None:
                        new.bias.copy_(conv.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
            return
    raise NotImplementedError(f"{type(model).__name__} has no nn.Conv2d whose input channels could be set to {in_channels}")


def _set_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the last nn.Linear by a fresh one with ``num_classes`` outputs (timm's ``reset_classifier``)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NotImplementedError(f"{type(model).__name__} has no nn.Linear classifier to give {num_classes} outputs")
    name, head = linears[-1]
    if head.out_features == num_classes:
        return model
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    if not name:  # the model is its own classifier
        return new
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def _from_factory(spec: str, *, in_channels: int, num_classes: int, weights: str | None = None) -> nn.Module:
    """Call a user factory with whichever of ``in_channels``/``num_classes`` it names; apply the others afterwards
    by replacing the first conv and the last linear layer (a factory with ``**kwargs``, as torchvision's, gets
    ``num_classes`` only: its kwargs go to the model's constructor). ``weights`` goes to a factory that takes
    ``weights`` (torchvision's); the classifier is then replaced, as pretrained heads have their own classes."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model factory {spec!r}: {type(exc).__name__}: {exc}") from exc
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C types have no signature
        params = {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, object] = {}
    if "in_channels" in params:
        kwargs["in_channels"] = in_channels
    if weights is not None:
        if "weights" not in params:
            raise ValueError(f"--weights {weights}: model factory {spec!r} takes no 'weights' argument")
        kwargs["weights"] = weights
    elif "num_classes" in params or takes_kwargs:
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code: show its message on one line
        raise ValueError(f"model factory {spec!r} failed: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if "in_channels" not in kwargs and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        _set_first_conv_in_channels(model, in_channels, pretrained=weights is not None)
    if "num_classes" not in kwargs:
        model = _set_classifier(model, num_classes)
    return model


def weights_names(model: str) -> list[str]:
    """The pretrained weights torchvision has for ``model`` (e.g. DEFAULT, IMAGENET1K_V1); [] for none."""
    if model not in torchvision.models.list_models(module=torchvision.models):
        return []
    return ["DEFAULT", *(w.name for w in torchvision.models.get_model_weights(model))]


def check_weights(model: str, weights: str) -> None:
    """``ValueError`` unless ``weights`` names pretrained weights torchvision has for ``model`` (nothing downloads)."""
    if model in MODELS:
        raise ValueError(f"--weights {weights}: {model!r} is one of ours and has no pretrained weights; "
                         "use a torchvision model name (e.g. mobilenet_v2) or train a teacher")
    if ":" in model:
        return  # a factory's own weights argument: the factory says what it accepts
    allowed = weights_names(model)
    if not allowed:
        raise _unknown(model)
    if weights not in allowed:
        raise ValueError(f"unknown --weights {weights!r} for {model}; allowed: {', '.join(allowed)}")


def check_input_shape(model: nn.Module, name: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """``ValueError`` unless ``model`` maps a batch of ``input_shape`` images to ``num_classes`` logits
    (e.g. vit_b_16 asserts 224 px inputs; a net whose strides shrink the map below 1x1 raises)."""
    shape = "x".join(map(str, input_shape))
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_shape))
    except Exception as exc:  # any layer may refuse the shape, with any exception type (AssertionError too)
        raise ValueError(f"--model {name} cannot take {shape} inputs ({_first_line(exc)}); "
                         "with --dataset imagefolder choose another --image-size") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"--model {name} maps 2 images of {shape} to {got}, not [2, {num_classes}] logits")


def _pretrained(name: str, weights: str) -> nn.Module:
    """torchvision model ``name`` with its pretrained ``weights`` (downloaded once into torch's hub cache)."""
    check_weights(name, weights)
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as exc:  # URLError (offline), a damaged file in the hub cache
        raise ValueError(f"--weights {weights}: cannot get torchvision's {name} weights ({_first_line(exc)}); "
                         "on an offline machine copy the file into $TORCH_HOME/hub/checkpoints") from exc


def create_model(name: str, *, in_channels: int, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build a model by registry name, torchvision name, or 'pkg.module:factory'; ``weights``: torchvision's
    pretrained weights by name (``DEFAULT``, ``IMAGENET1K_V1``, ...), with a new classifier for ``num_classes``."""
    if name in MODELS:
        if weights is not None:
            check_weights(name, weights)
        return MODELS[name](in_channels, num_classes)
    if ":" in name:
        return _from_factory(name, in_channels=in_channels, num_classes=num_classes, weights=weights)
    if weights is not None:
        model = _pretrained(name, weights)
        _set_first_conv_in_channels(model, in_channels, pretrained=True)
        return _set_classifier(model, num_classes)
    if name in torchvision.models.list_models(module=torchvision.models):
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        _set_first_conv_in_channels(model, in_channels)
        return model
    raise _unknown(name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _listed(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict (plain, or under "state_dict"/"model") into `model`, strictly."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for corrupt or unsafe files
        raise ValueError(f"cannot read checkpoint {path}: {_first_line(exc)}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"cannot read checkpoint {path}: not a state_dict (a mapping of names to tensors)")
    state = dict(obj)
    expected = model.state_dict()
    # Checkpoints saved from nn.DataParallel / DistributedDataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_listed(mismatched)}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
