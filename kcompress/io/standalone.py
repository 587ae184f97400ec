"""Models from checkpoints: the module itself, a :class:`SequenceClassifier`, the torch layer, or a
:class:`StandaloneModel` (the recognised layers at their paths, every other tensor a buffer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.io.files import _reason
from kcompress.io.models import SequenceClassifier
from kcompress.io.recognize import INTEGER_HINT, LayerSpec, _check_finite, find_layers
from kcompress.nn import COMPRESSED_TYPES

#: forward of a model rebuilt from weights alone
WEIGHTS_ONLY = "this checkpoint holds weights only; pass a model or an --evaluator to run it"


class StandaloneModel(nn.Module):
    """A state dict made a module: the recognised layers (dense torch modules) at their qualified paths and
    every other tensor as a buffer at its path (plain ``nn.Module`` containers in between), so
    ``state_dict()`` has exactly the checkpoint's keys. It holds weights only: ``forward`` raises."""

    def __init__(self, layers: Sequence[LayerSpec], buffers: Mapping[str, Tensor]) -> None:
        super().__init__()
        if any(not spec.name for spec in layers):
            raise KCompressError("a StandaloneModel holds layers at named paths, not at the root")
        self.layer_specs = list(layers)
        self.buffer_names = list(buffers)
        for spec in self.layer_specs:
            _place(self, spec.name, spec.build())
        for name, tensor in buffers.items():
            _place_buffer(self, name, tensor)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise KCompressError(WEIGHTS_ONLY)

    def describe(self) -> dict[str, Any]:
        """How to rebuild it: the layer specs and buffer names (the artifact's ``architecture``)."""
        return {"kind": "standalone", "layers": [s.to_dict() for s in self.layer_specs],
                "buffers": list(self.buffer_names)}


def model_from_state_dict(state_dict: Mapping[str, Tensor], source: str = "state dict") -> nn.Module:
    """A :class:`SequenceClassifier` when the tensors are exactly one (``rnn.*``, ``head.*``), the torch layer
    itself when they are one layer's, else a :class:`StandaloneModel`; ``state_dict()`` of the result has
    the same keys and values (and dtypes). Errors name ``source``."""
    try:
        specs = find_layers(state_dict)
    except KCompressError as error:
        raise KCompressError(f"{source}: {error}") from None
    if not specs:
        names = ", ".join(list(state_dict)[:5])
        integer = [k for k, v in state_dict.items() if v.dim() == 2 and not (v.is_floating_point() or v.is_complex())]
        hint = f"; {integer[0]} holds integers: {INTEGER_HINT}" if integer else ""
        raise KCompressError(f"{source}: no LSTM, GRU, LSTMCell, GRUCell or Linear weights found among its "
                             f"{len(state_dict)} tensors ({names}{', ...' if len(state_dict) > 5 else ''}){hint}")
    if len(specs) == 1 and specs[0].name == "":
        model = specs[0].build()
    else:
        model = _classifier(specs, state_dict) or _standalone(specs, state_dict)
    _load_exact(model, state_dict)
    return model


def _classifier(specs: Sequence[LayerSpec], state_dict: Mapping[str, Tensor]) -> Optional[nn.Module]:
    """The :class:`SequenceClassifier` when the state dict is exactly an ``rnn`` LSTM/GRU and a ``head``."""
    if not any(spec.name == "rnn" and spec.type in ("LSTM", "GRU") for spec in specs):
        return None  # from_state_dict needs a well-formed rnn; it checks every other key and shape itself
    return SequenceClassifier.from_state_dict(state_dict)


def _standalone(specs: Sequence[LayerSpec], state_dict: Mapping[str, Tensor]) -> StandaloneModel:
    layers = {spec.name for spec in specs}
    return StandaloneModel(specs, {k: v for k, v in state_dict.items() if k.rpartition(".")[0] not in layers})


def _check_module_finite(model: nn.Module, path: Path) -> None:
    """NaN/Inf in the parameters of a module's compressible layers -> error naming the tensor."""
    for name, module in model.named_modules():
        if type(module) in COMPRESSED_TYPES:
            try:
                _check_finite(name, dict(module.named_parameters(recurse=False)))
            except KCompressError as error:
                raise KCompressError(f"{path}: {error}") from None


def _load_exact(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Load ``tensors`` (strict) after giving each parameter/buffer the dtype it has in ``tensors``, so the
    model holds exactly those values. Without load hooks in the model, each value is copied in place
    directly: torch's ``load_state_dict`` takes time quadratic in the number of a module's children."""
    state = model.state_dict(keep_vars=True)
    for name, value in state.items():
        if name in tensors and value.dtype != tensors[name].dtype:
            value.data = value.data.to(tensors[name].dtype)
    if any(_loads_specially(module) for module in model.modules()):
        model.load_state_dict(dict(tensors), strict=True)
        return
    problems = [f"missing {k}" for k in state if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in state]
    problems += [f"{k} is {tuple(tensors[k].shape)}, the model's {tuple(v.shape)}" for k, v in state.items()
                 if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if problems:
        raise KCompressError(f"the tensors do not fit the model: {_few(problems)}")
    with torch.no_grad():
        for name, value in state.items():
            value.copy_(tensors[name])


def _loads_specially(module: nn.Module) -> bool:
    """Whether ``module`` changes how ``load_state_dict`` loads it (its own ``_load_from_state_dict``, hooks)."""
    custom = type(module)._load_from_state_dict is not nn.Module._load_from_state_dict
    return custom or bool(module._load_state_dict_pre_hooks) or bool(module._load_state_dict_post_hooks)


def _few(names: Sequence[str]) -> str:
    """At most three names, then how many more."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _module_at(root: nn.Module, path: str) -> Optional[nn.Module]:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _container(root: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` under ``root``, creating plain ``nn.Module`` containers where missing."""
    module = root
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            _add(module, part, child, path)
        module = child
    return module


def _add(parent: nn.Module, name: str, child: nn.Module, path: str) -> None:
    try:
        parent.add_module(name, child)
    except (KeyError, TypeError) as error:
        raise KCompressError(f"cannot place a module at {path!r} ({_reason(error)})") from None


def _place(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` (replacing what is there, making missing containers); returns the root,
    which is ``module`` itself when ``path`` is ``""``."""
    if not path:
        return module
    parent_path, _, name = path.rpartition(".")
    _add(_container(root, parent_path), name, module, path)
    return root


def _place_buffer(root: nn.Module, key: str, tensor: Tensor) -> None:
    parent_path, _, name = key.rpartition(".")
    try:
        _container(root, parent_path).register_buffer(name, tensor)
    except (KeyError, TypeError) as error:
        raise KCompressError(f"cannot hold tensor {key!r} ({_reason(error)})") from None
