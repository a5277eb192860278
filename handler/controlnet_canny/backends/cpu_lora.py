"""LoRAs fused into copies of the layers they patch, as the CPU backend's twins of those layers.

A fused copy computes `W + scale up @ down` in one product where the unfused hooks (`lora.LoRAPatch.applied`) add two
thin products and an addition per layer and call. It is swapped in for an evaluation and out after: the model's
own layers never change, so requests without LoRAs compute exactly what they did before. Whether fusing pays, and
how many fused sets are kept, is the backend's choice (`CpuBackend.lora_application`).
"""
from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..lora import LoRAPatch, Target
from .cpu_prepack import PackedConv2d, PackedLinear
from .cpu_winograd import WinogradConv2d

log = logging.getLogger(__name__)

# Makes the twin of `current` (the module at a path: plain or one of the backend's twins) for a plain layer of
# merged weights.
TwinLike = Callable[[nn.Module, nn.Module], nn.Module]


def base_weight(module: nn.Module) -> torch.Tensor:
    """The plain weight a layer or one of the backend's twins computes with (a packed weight unpacked: exact)."""
    if isinstance(module, WinogradConv2d):
        return module.conv.weight.detach()
    if isinstance(module, (PackedConv2d, PackedLinear)):
        return module.weight.to_dense()
    return module.weight.detach()


def _bias(module: nn.Module) -> torch.Tensor | None:
    source = module.conv if isinstance(module, WinogradConv2d) else module
    return None if source.bias is None else source.bias.detach()


def plain_layer(target: Target, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The plain nn.Conv2d or nn.Linear of `target` with these tensors (a TokenProjection is the linear it is)."""
    if target.kind == "conv":
        out_channels, in_channels, *kernel = weight.shape
        layer = nn.Conv2d(in_channels, out_channels, tuple(kernel), target.stride, target.padding,
                          bias=bias is not None, device="meta")
    else:
        weight = weight.flatten(1)
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _weight_bytes(module: nn.Module) -> int:
    """Bytes of a fused layer's own weights (its bias is the base layer's)."""
    weights = [*module.weights, module.conv.weight] if isinstance(module, WinogradConv2d) else [module.weight]
    return sum(w.numel() * w.element_size() for w in weights)


class FusedLoRA:
    """A LoRA set's patched layers (or those of `paths`), each a twin of the module at its path with the merged
    weight."""

    def __init__(self, patch: LoRAPatch, model: nn.Module, twin_like: TwinLike, paths: Collection[str] | None = None):
        self.layers: dict[str, nn.Module] = {}
        self.nbytes = 0
        for path, patched in patch.layers.items():
            if paths is not None and path not in paths:
                continue
            current = model.get_submodule(path)
            base = base_weight(current)
            merged = patch.merged_weight(path, base).to(base.dtype)
            bias = _bias(current)
            self.layers[path] = twin_like(current, plain_layer(patched.target, merged, bias))
            self.nbytes += _weight_bytes(self.layers[path])

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block, the fused layers sit at their paths; the model's own are back on exit, error or not."""
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for path, fused in self.layers.items():
                parent_path, _, name = path.rpartition(".")
                parent = model.get_submodule(parent_path)
                swapped.append((parent, name, getattr(parent, name)))
                setattr(parent, name, fused)
            yield
        finally:
            for parent, name, own in reversed(swapped):
                setattr(parent, name, own)


def fused_bytes(patch: LoRAPatch, model: nn.Module) -> dict[str, int]:
    """What `FusedLoRA(patch, model, ...)` will hold per patched path: the weights of the twin there."""
    return {path: _weight_bytes(model.get_submodule(path)) for path in patch.layers}


class FusedCache:
    """Fused copies of the LoRA sets used most recently, within `budget` bytes (least recently used dropped first),
    and what building the last one cost per byte."""

    def __init__(self, budget: int):
        self.budget = budget
        self.seconds_per_byte = 0.0  # unknown before a first build: assumed free
        self._entries: OrderedDict[int, tuple[weakref.ref, FusedLoRA]] = OrderedDict()

    def get(self, owner: object) -> FusedLoRA | None:
        entry = self._entries.get(id(owner))
        if entry is None or entry[0]() is not owner:
            return None
        self._entries.move_to_end(id(owner))
        return entry[1]

    def put(self, owner: object, fused: FusedLoRA) -> bool:
        """Keeps `fused` for `owner` (until `owner` is collected or dropped), dropping older copies to make room;
        False (nothing kept or dropped) where it alone exceeds the budget."""
        if fused.nbytes > self.budget:
            return False
        self._entries[id(owner)] = (weakref.ref(owner, lambda _, key=id(owner): self._entries.pop(key, None)), fused)
        while self.nbytes > self.budget:
            self._entries.popitem(last=False)
        return True

    @property
    def nbytes(self) -> int:
        return sum(fused.nbytes for _, fused in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


class LoRAApplication:
    """A LoRA set on the UNet as the CPU backend applies it: by its unfused hooks, or by its fused copy.

    `choice` fused: the copy is built at the first evaluation. auto: the first evaluation runs unfused and records
    each patched layer's input; each layer's hook is timed on those inputs against that evaluation (a fused layer
    costs what the model's own does: the same kernel on a weight of the same shape). Under `min_share` of it the
    set stays unfused; otherwise it runs unfused until the time its hooks added reaches what building the copy
    costs (measured on the last build), then fused: a set used once or twice never pays for a copy it would not
    earn back, one used often pays at most twice the build. Evicted, a copy is rebuilt by the same rule.

    A set whose whole copy exceeds the cache's budget (a whole-UNet LoRA in fp32, whose Winograd twins hold their
    transformed weights) is fused in part: the layers whose hooks took the most time per byte of copy, up to the
    budget; the others keep their hooks. Their time is measured in either choice, on the set's first evaluation."""

    def __init__(self, patch: LoRAPatch, choice: str, cache: FusedCache, twin_like: TwinLike,
                 timer: Callable[[Callable[[], object]], float], min_share: float):
        self.patch = patch
        self.choice = choice  # auto | fused | unfused
        self.cache = cache
        self.twin_like = twin_like
        self.timer = timer
        self.min_share = min_share
        self.unfused_share: float | None = None  # the hooks' cost over the rest of the evaluation, once measured
        self.hook_seconds: dict[str, float] = {}  # per patched path, once measured
        self.unfused_seconds = 0.0  # what the hooks added since the copy was last built
        self._bytes: dict[str, int] | None = None  # per patched path, what its fused copy holds

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        if self.unfused_share is None and self.choice != "unfused" and (
                self.choice == "auto" or sum(self._fused_bytes(model).values()) > self.cache.budget):
            with self._measuring(model):
                yield
            return
        fused = None if self.choice == "unfused" else self._fused(model)
        if fused is not None:
            with fused.applied(model), self.patch.without(fused.layers).applied(model):
                yield
            return
        start = time.perf_counter()
        with self.patch.applied(model):
            yield
        if self.unfused_share:
            self.unfused_seconds += (time.perf_counter() - start) * self.unfused_share / (1 + self.unfused_share)

    def _fused_bytes(self, model: nn.Module) -> dict[str, int]:
        if self._bytes is None:
            self._bytes = fused_bytes(self.patch, model)
        return self._bytes

    def _paths_to_fuse(self, model: nn.Module) -> list[str]:
        """Every patched path where the whole copy fits the budget; else those whose hooks took the most time per
        byte of copy, as many as fit."""
        sizes = self._fused_bytes(model)
        if sum(sizes.values()) <= self.cache.budget:
            return list(sizes)
        chosen, room = [], self.cache.budget
        for path in sorted(sizes, key=lambda p: self.hook_seconds.get(p, 0.0) / max(sizes[p], 1), reverse=True):
            if sizes[path] <= room and self.hook_seconds.get(path, 0.0) > 0:
                chosen.append(path)
                room -= sizes[path]
        return chosen

    def _fused(self, model: nn.Module) -> FusedLoRA | None:
        fused = self.cache.get(self)
        if fused is not None:
            return fused
        paths = self._paths_to_fuse(model)
        if not paths:
            log.warning("no layer of the LoRA set fits lora_cache_mib: applied unfused")
            self.choice = "unfused"
            return None
        nbytes = sum(self._fused_bytes(model)[path] for path in paths)
        if self.choice == "auto" and self.unfused_seconds < nbytes * self.cache.seconds_per_byte:
            return None
        start = time.perf_counter()
        fused = FusedLoRA(self.patch, model, self.twin_like, paths)
        seconds = time.perf_counter() - start
        self.cache.seconds_per_byte = seconds / max(fused.nbytes, 1)
        self.cache.put(self, fused)
        self.unfused_seconds = 0.0
        whole = len(paths) == len(self.patch.layers)
        log.info("LoRA set fused%s in %.2f s (%.0f MiB%s; %d sets, %.0f MiB kept)", "" if whole else " in part",
                 seconds, fused.nbytes / 2**20, "" if whole else (
                     f", {len(paths)} of {len(self.patch.layers)} layers: "
                     f"{100 * sum(self.hook_seconds[p] for p in paths) / sum(self.hook_seconds.values()):.0f}% "
                     "of the hooks' time"), len(self.cache), self.cache.nbytes / 2**20)
        return fused

    @contextlib.contextmanager
    def _measuring(self, model: nn.Module) -> Iterator[None]:
        seen: dict[str, tuple[TensorLike, TensorLike]] = {}

        def record(module: nn.Module, args: tuple, output: torch.Tensor, path: str) -> None:
            seen.setdefault(path, (TensorLike.of(args[0]), TensorLike.of(output)))

        hooks = [model.get_submodule(path).register_forward_hook(
            lambda module, args, output, path=path: record(module, args, output, path)) for path in self.patch.layers]
        try:
            with self.patch.applied(model):
                start = time.perf_counter()
                yield
                evaluation = time.perf_counter() - start
        finally:
            for hook in hooks:
                hook.remove()
        # layers of equal factor and input shapes cost the same: each such class is timed once
        classes: dict[tuple, list[str]] = {}
        for path, (x, y) in seen.items():
            layer = self.patch.layers[path]
            classes.setdefault((layer.target, layer.down.shape, layer.up.shape, x, y), []).append(path)
        with torch.inference_mode():
            for (_, _, _, x, y), paths in classes.items():
                layer, inputs, outputs = self.patch.layers[paths[0]], x.make(), y.make()
                self.hook_seconds.update(dict.fromkeys(paths, self.timer(lambda: outputs.add_(layer.delta(inputs)))))
        unfused = sum(self.hook_seconds.values())
        self.unfused_share = unfused / max(evaluation - unfused, 1e-9)
        self.unfused_seconds = unfused
        if self.choice == "auto" and self.unfused_share < self.min_share:
            self.choice = "unfused"
        log.info("LoRA set unfused: +%.1f%% per evaluation (%.3f s of %.3f s): %s", 100 * self.unfused_share,
                 unfused, evaluation, "stays unfused" if self.choice == "unfused" else "fused once that pays")


@dataclass(frozen=True)
class TensorLike:
    """A tensor's shape, dtype and memory layout, to time kernels on a tensor like it."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorLike:
        return cls(tuple(tensor.shape), tensor.dtype,
                   tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
                   and not tensor.is_contiguous())

    def make(self) -> torch.Tensor:
        tensor = torch.randn(self.shape, dtype=self.dtype)
        return tensor.contiguous(memory_format=torch.channels_last) if self.channels_last else tensor
