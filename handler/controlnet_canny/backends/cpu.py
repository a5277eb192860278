"""CPUs: oneDNN-packed weights, Winograd 3x3 convolutions and a C attention kernel, each used only where it
measured faster on this machine, the decoders' maps laid out channels-last, and malloc keeping what a step frees
for the next one (`cpu_allocator`).

Whether a lever pays depends on the CPU (packing won 1.5x on an AVX-512 Zen 4 and lost 1.3-3.6x on an AVX2 Zen 3,
see docs/benchmarks.md) and on the shapes a layer sees (Winograd's gain shrinks as maps grow). So at load the
backend finds every shape each layer of the model sees at a calibration size in several aspect ratios (carried
over from one small real forward and decode), times the candidates of each distinct layer class on those shapes,
and keeps packing only for the classes where it wins at every shape; Winograd (the larger tile only where it beats
the smaller at every shape) is also timed at larger maps and runs up to the largest input it won at. The choices
are cached per machine, torch version, thread count and dtype (unless other processes were busy while they were
timed; workers loading at once take turns), logged in one line, and can be forced in model-config.yaml
(`handler.backend`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import MADV_PAGEOUT, advise_pages
from ..unet import CrossAttention, multihead_attention
from ..lora import LoRAPatch
from ..vae import Decoder
from . import Applicable, Backend, BackendOptions, Probe
from . import cpu_allocator, cpu_attention, cpu_lora, cpu_prepack, cpu_winograd
from .cpu_build import cpu_flags

log = logging.getLogger(__name__)

CHOICES_FORMAT = "choices-v4"  # part of a cache entry's key: an entry written by older code is measured again
WIN_MARGIN = 0.95  # a lever must take at most 95% of the plain time: within timing noise, plain is kept
TIME_BUDGET_S = 0.05  # per candidate and shape: a third run only while two took less
MIN_RUNS, MAX_RUNS = 2, 3
# Timings taken while other processes used more than this share of the CPUs' time (a worker serving beside the one
# loading, a noisy neighbour) are used for this load but not cached: the next load measures again.
BUSY_SHARE = 0.1
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
# The latent of the probe whose shapes are watched: the smallest whose every UNet level keeps whole sides (three
# halvings), with unequal sides so that heights and widths cannot be confused, and an area (128) that no text
# sequence (77 tokens per chunk) shares.
REFERENCE_LATENT = (8, 16)
# Winograd is timed at the calibration shapes, then at the largest of them with its sides this many times longer
# (2: up to a 512 px output, the default image_resolution), as long as it keeps winning. Three times (768 px, the
# largest output) would cover every size, but made the first load's calibration a third longer: larger inputs go
# to the packed or plain convolution, which is never slower than plain.
WINOGRAD_SCALES = (2,)


def cpu_model() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")


def has_native_bf16() -> bool:
    """The CPU computes bf16 natively and torch may use it (ATEN_CPU_CAPABILITY=avx2 forbids AVX-512 BF16)."""
    return bool(NATIVE_BF16_FLAGS & cpu_flags()) and "AVX512" in torch.backends.cpu.get_cpu_capability()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "controlnet-canny"


def fastest_seconds(run: Callable[[], object]) -> float:
    """The fastest of two or three runs: on a quiet machine noise only adds time. The first run counts too:
    building oneDNN's primitive for a new shape adds little to it (docs/benchmarks.md), and the minimum drops it
    wherever that matters."""
    times: list[float] = []
    while len(times) < MIN_RUNS or (len(times) < MAX_RUNS and sum(times) < TIME_BUDGET_S):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _layer_class(module: nn.Module) -> str:
    """Layers with equal classes run the same kernels: one is timed for all."""
    weight = tuple(module.weight.shape)
    if isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d:
        return f"conv{weight}s{module.stride}p{module.padding}g{module.groups}"
    return f"{type(module).__name__.lower()}{weight}"


def usable_cpus() -> set[int]:
    return os.sched_getaffinity(0)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the CPUs this process may run on have been busy, of which this process and the children it
    waited for, such as the compiler of the C kernels), from /proc/stat: busy is all but idle and I/O wait; steal,
    time the hypervisor gave to other guests, counts as busy."""
    cpus = {f"cpu{n}" for n in usable_cpus()}
    try:
        rows = [line.split() for line in Path("/proc/stat").read_text().splitlines()]
    except OSError:
        return 0.0, 0.0
    busy = 0
    for name, user, nice, system, idle, iowait, irq, softirq, steal, *_ in (row for row in rows if row[0] in cpus):
        busy += sum(int(ticks) for ticks in (user, nice, system, irq, softirq, steal))
    own = sum(usage.ru_utime + usage.ru_stime
              for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
    return busy / os.sysconf("SC_CLK_TCK"), own


class CpuWatch:
    """How much of the time of the CPUs this process may run on other processes took while it measured (on a
    shared machine, work on other cores does not count)."""

    def __init__(self):
        self.start = time.monotonic()
        self.busy, self.own = cpu_seconds()

    def others_share(self) -> float:
        busy, own = cpu_seconds()
        capacity = (time.monotonic() - self.start) * len(usable_cpus())
        return max(0.0, (busy - self.busy) - (own - self.own)) / capacity if capacity > 0 else 0.0


class CalibrationCache:
    """Measured choices in one JSON file per machine (and the instruction sets torch and oneDNN are allowed),
    torch version, thread count and dtype."""

    def __init__(self, directory: Path | None, dtype: torch.dtype):
        identity = json.dumps([cpu_model(), sorted(cpu_flags()), torch.backends.cpu.get_cpu_capability(),
                               os.environ.get("ONEDNN_MAX_CPU_ISA", ""), torch.__version__, torch.get_num_threads(),
                               str(dtype)])
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.path = None if directory is None else directory / f"calibration-{digest}.json"
        self.entries: dict[str, dict] = {}

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Reads the entries while holding the cache directory's lock: workers loading at once on one machine
        measure one after another, so that the later ones take the first one's choices instead of timing while it
        times (no lock, and nothing read, without a cache directory or where it cannot be made)."""
        if self.path is None:
            yield
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            directory = os.open(self.path.parent, os.O_RDONLY)
        except OSError as error:
            log.warning("calibration cache directory unusable (%s): measuring", error)
            yield
            return
        try:
            try:
                fcntl.flock(directory, fcntl.LOCK_EX)
            except OSError as error:  # a file system without locks: workers loading at once each measure
                log.warning("calibration cache %s not locked (%s)", self.path.parent, error)
            if self.path.is_file():
                try:
                    self.entries = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    log.warning("calibration cache %s unreadable: measuring again", self.path)
            yield
        finally:
            os.close(directory)  # releases the lock

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump(self.entries, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, self.path)  # atomic: a second worker calibrating at once never reads half a file
        except OSError as error:
            log.warning("calibration cache not written (%s): the next load measures again", error)


class CpuBackend(Backend):
    def __init__(self, device: torch.device, dtype: torch.dtype, options: BackendOptions):
        super().__init__(device, dtype)
        self.options = options
        self.choices: dict[str, str] = {}
        self._kernels: dict[str, cpu_attention.CpuAttention | None] = {}
        self.fused_loras = cpu_lora.FusedCache(int(options.lora_cache_mib) * 2**20)

    def _kernel(self, variant: str) -> cpu_attention.CpuAttention | None:
        if variant not in self._kernels:  # compiling takes a second: once per variant
            self._kernels[variant] = cpu_attention.load(self.dtype, variant)
        return self._kernels[variant]

    @cached_property
    def _transforms(self) -> cpu_winograd.Transforms | None:
        return cpu_winograd.load()  # compiled once per load, and only where a convolution may take it

    def prepare(self, model: nn.Module, probe: Probe, latent_sizes: list[tuple[int, int]], model_id: str) -> None:
        # Before the probe and the calibration: the levers are timed with the allocator requests then run with.
        if self.options.allocator == "retain":
            cpu_allocator.retain_freed_memory()
        allocator = "retain" if cpu_allocator.retaining() else "system"
        if self.options.decoder_layout == "channels_last":
            # Before the probe, so that its layers are timed on the layout they then run on. oneDNN convolves
            # channels-last maps without reordering them to and from its blocked layout, which at the decoder's
            # full-resolution maps takes a large share of a convolution's time (docs/benchmarks.md).
            for decoder in (m for m in model.modules() if isinstance(m, Decoder)):
                loaded = [weight.detach() for weight in decoder.parameters() if weight.dim() == 4]
                decoder.to(memory_format=torch.channels_last)
                for weight in loaded:  # fp32 weights were still mapped from the checkpoint: their copy replaced them
                    advise_pages(weight, MADV_PAGEOUT)
        directory = {"default": default_cache_dir(), "": None}.get(self.options.calibration_cache,
                                                                   Path(self.options.calibration_cache))
        cache = CalibrationCache(directory, self.dtype)
        options = self.options
        key = (f"{CHOICES_FORMAT} {model_id} latents {latent_sizes} prepack {options.prepack} "
               f"winograd {options.winograd} attention {options.attention} decoder {options.decoder_layout} "
               f"allocator {allocator}")
        calibration = "cached"
        with cache.exclusive():
            choice = cache.entries.get(key)
            if choice is None:
                start, watch = time.perf_counter(), CpuWatch()
                choice = self._measure(model, probe, latent_sizes)
                calibration = f"measured in {time.perf_counter() - start:.1f} s"
                if (others := watch.others_share()) > BUSY_SHARE:
                    log.warning("other processes took %.0f%% of the CPUs while the backend's levers were timed: "
                                "its choices are used but not cached, the next load measures again", 100 * others)
                    calibration += f" while others took {100 * others:.0f}% of the CPUs, not cached"
                else:
                    cache.entries[key] = choice
                    cache.save()
        modules = dict(model.named_modules())
        packable = [name for name, module in modules.items() if cpu_prepack.packable(module)]
        packed = {modules[name] for name in choice["packed"]}
        winograd = {modules[name]: tuple(tile_and_bound) for name, tile_and_bound in choice["winograd"].items()}
        if winograd and self._transforms is None:  # measured where they built: their layers run plain here
            winograd = {}
        cpu_prepack.install_twins(model, lambda layer: self._twin(layer in packed, winograd.get(layer)))
        kernel = None if choice["attention"] == "torch" else self._kernel(choice["attention"])
        if kernel is not None:
            cpu_attention.install(model, kernel)
        self.choices = {
            "prepack": f"{len(choice['packed'])}/{len(packable)} layers ({choice['classes']})",
            "winograd": ", ".join(f"{sum(t == tile for t, _ in winograd.values())} F({tile}x{tile})"
                                  for tile in cpu_winograd.TILES) + " convolutions",
            "attention": kernel.name if kernel is not None else "torch",
            "calibration": calibration,
            "allocator": allocator,
        }
        self.idle()  # the calibration's temporaries

    def idle(self) -> None:
        cpu_allocator.release_free_memory()

    def prepare_decoder(self, decoder: nn.Module) -> None:
        if self.options.decoder_layout == "channels_last":  # as the VAE decoder's (`prepare`): no twins timed
            decoder.to(memory_format=torch.channels_last)

    def lora_application(self, patch: LoRAPatch, model: nn.Module) -> Applicable:
        """Unfused hooks, or fused copies of the patched layers (the twins this backend chose for them, with merged
        weights) swapped in per evaluation: in `auto`, fused where the hooks measured on the set's first evaluation
        cost more than a lever must win, once the time they added pays for the build (`cpu_lora.LoRAApplication`).
        Fused copies are kept for the sets used last within lora_cache_mib; a set whose copy exceeds it stays
        unfused."""
        if self.options.lora_fusion == "unfused":
            return patch
        return cpu_lora.LoRAApplication(patch, self.options.lora_fusion, self.fused_loras, self._twin_like,
                                        fastest_seconds, min_share=1 / WIN_MARGIN - 1)

    def summary(self) -> str:
        return "cpu: " + ", ".join(f"{name} {choice}" for name, choice in self.choices.items())

    def _measure(self, model: nn.Module, probe: Probe, latent_sizes: list[tuple[int, int]]) -> dict:
        layer_shapes, channels_last, attention_shapes = _record_shapes(model, probe, latent_sizes)
        names = {module: name for name, module in model.named_modules()}
        by_class: dict[tuple[str, bool], list[nn.Module]] = defaultdict(list)
        for module in layer_shapes:
            by_class[_layer_class(module), module in channels_last].append(module)
        packed, winograd = [], {}
        for (_, is_channels_last), modules in by_class.items():
            shapes = sorted(set().union(*(layer_shapes[m] for m in modules)))
            layout = torch.channels_last if is_channels_last else torch.contiguous_format
            is_packed, tile, positions = self._choose_twin(modules[0], shapes, layout)
            if positions:
                winograd.update(dict.fromkeys(modules, [tile, positions]))
            elif is_packed:
                packed += modules
        packed_classes = len({_layer_class(m) for m in packed})
        return {"packed": sorted(names[m] for m in packed),
                "winograd": dict(sorted((names[m], tile_and_bound) for m, tile_and_bound in winograd.items())),
                "classes": f"{packed_classes}/{len(by_class)} classes packed",
                "attention": self._choose_attention(attention_shapes)}

    def _choose_twin(self, layer: nn.Module, shapes: list[tuple],
                     layout: torch.memory_format = torch.contiguous_format) -> tuple[bool, int, int]:
        """Whether the layer class (its inputs in `layout`) is packed (packed must win at every shape it sees: no
        request shape may get slower than plain), the Winograd tile that beats that choice at every shape (a larger
        tile must also beat the smaller one everywhere), and the largest input (batch x height x width) up to which
        it does at every shape timed (0: none does). Where Winograd runs, it replaces packing: maps beyond its bound run
        plain, so that no layer holds a second copy of its weight."""
        onednn = cpu_prepack.supported(self.device, self.dtype)  # Winograd's products are oneDNN's too
        packing = onednn and self.options.prepack != "none"
        winograd = (onednn and self.options.winograd == "auto" and cpu_winograd.applicable(layer, self.dtype)
                    and self._transforms is not None)
        if not winograd and self.options.prepack != "auto":
            return packing, 0, 0  # nothing to time
        measured: dict[tuple, float] = {}

        def seconds(module: nn.Module, x: torch.Tensor) -> float:
            key = (id(module), tuple(x.shape))
            if key not in measured:
                measured[key] = fastest_seconds(lambda: module(x))
            return measured[key]

        def faster(twin: nn.Module, than: nn.Module, inputs: list[torch.Tensor]) -> bool:
            return all(seconds(twin, x) <= WIN_MARGIN * seconds(than, x) for x in inputs)

        with torch.inference_mode():
            inputs = [_random(shape, self.dtype, layout) for shape in shapes]
            base = layer
            if packing:
                packed = cpu_prepack.packed_twin(layer)
                if self.options.prepack == "all" or faster(packed, layer, inputs):
                    base = packed
            chosen = None
            for tile in cpu_winograd.TILES if winograd else ():
                twin = cpu_winograd.WinogradConv2d(layer, tile, sys.maxsize, self._transforms)
                if faster(twin, base if chosen is None else chosen, inputs):
                    chosen = twin
            if chosen is None:
                return base is not layer, 0, 0
            largest = max(shapes, key=_positions)
            positions = _positions(largest)
            for scale in WINOGRAD_SCALES:
                x = _random((*largest[:2], largest[2] * scale, largest[3] * scale), self.dtype, layout)
                if not faster(chosen, base, [x]):
                    break
                positions = _positions(x.shape)
        return base is not layer, chosen.tile, positions

    def _twin(self, packed: bool, winograd: tuple[int, int] | None) -> Callable[[nn.Module], nn.Module] | None:
        """How the calibration's choice (packed, or Winograd's tile and bound) replaces a layer (None: it stays
        plain)."""
        if winograd:
            return lambda plain: cpu_winograd.WinogradConv2d(plain, *winograd, self._transforms)
        return cpu_prepack.packed_twin if packed else None

    def _twin_like(self, current: nn.Module, plain: nn.Module) -> nn.Module:
        """The twin the calibration chose for `current`'s layer, made for `plain` (a layer of equal shape)."""
        if isinstance(current, cpu_winograd.WinogradConv2d):
            return cpu_winograd.WinogradConv2d(plain, current.tile, current.max_positions, self._transforms)
        if isinstance(current, (cpu_prepack.PackedConv2d, cpu_prepack.PackedLinear)):
            return cpu_prepack.packed_twin(plain)
        return plain

    def _choose_attention(self, shapes: dict[tuple, int]) -> str:
        wanted = self.options.attention
        variants = cpu_attention.variants(self.dtype)
        if wanted not in ("auto", "torch") and wanted not in variants:
            raise ValueError(f"backend.attention: {wanted!r} does not run here; this CPU has {['torch', *variants]}")
        if wanted != "auto":
            return wanted
        kernels = {v: kernel for v in variants if (kernel := self._kernel(v)) is not None}
        if not kernels or not shapes:
            return "torch"
        seconds = {name: _attention_seconds(attend, shapes, self.dtype)
                   for name, attend in {"torch": multihead_attention, **kernels}.items()}
        best = min(seconds, key=seconds.get)
        return best if seconds[best] <= WIN_MARGIN * seconds["torch"] else "torch"


def _is_channels_last(x: torch.Tensor) -> bool:
    """A map laid out channels-last (one with a single channel or pixel is both layouts: contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _random(shape: tuple, dtype: torch.dtype, layout: torch.memory_format) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype)
    return x.contiguous(memory_format=layout) if x.dim() == 4 else x


def _positions(shape: tuple) -> int:
    """What Winograd's cost grows with: the input's batch x height x width."""
    return shape[0] * shape[2] * shape[3]


def _attention_seconds(attend, shapes: dict[tuple, int], dtype: torch.dtype) -> float:
    """Time of one guided step's attention calls: each distinct (q, k, heads) shape, times its calls."""
    total = 0.0
    with torch.inference_mode():
        for (q_shape, k_shape, heads), calls in shapes.items():
            q = torch.randn(q_shape, dtype=dtype)
            k = torch.randn(k_shape, dtype=dtype)
            v = torch.randn(k_shape, dtype=dtype)
            total += calls * fastest_seconds(lambda: attend(q, k, v, heads))
    return total


def _record_shapes(model: nn.Module, probe: Probe, latent_sizes: list[tuple[int, int]]):
    """Input shapes of every packable layer at each latent size, the layers whose inputs are channels-last maps,
    and (q, k, heads) shapes of every attention call with their counts.

    One real probe at a small reference latent is watched, and its shapes are carried over to each size: a
    feature map's sides scale with the latent's, a token sequence read from one has the map's area (a sequence
    of text tokens does not change). Cheaper than a probe per size, even on fake tensors.

    The VAE decoder's layers are carried to the first size only (the pipeline's first is square, its smallest):
    they run once per image, not per step, on maps up to 8 times the latent's sides, which at every size took
    longer to time than all the rest. That a choice made on its square maps holds on other aspect ratios is what
    `scripts/bench.py --decode` checks on a landscape output."""
    reference: dict[nn.Module, list[tuple]] = defaultdict(list)
    channels_last: set[nn.Module] = set()
    reference_attention: list[tuple] = []
    layers = [m for m in model.modules() if cpu_prepack.packable(m)]
    attentions = [m for m in model.modules() if isinstance(m, CrossAttention)]

    def record_attention(q, k, v, heads):
        reference_attention.append((tuple(q.shape), tuple(k.shape), heads))
        return multihead_attention(q, k, v, heads)

    def record_layer(module, args):
        reference[module].append(tuple(args[0].shape))
        if _is_channels_last(args[0]):
            channels_last.add(module)

    hooks = [m.register_forward_pre_hook(record_layer) for m in layers]
    swapped = [(m, m.attend) for m in attentions]
    for m in attentions:
        m.attend = record_attention
    try:
        with torch.inference_mode():
            probe(REFERENCE_LATENT)
    finally:
        for hook in hooks:
            hook.remove()
        for m, attend in swapped:
            m.attend = attend
    decoder_layers = {m for decoder in model.modules() if isinstance(decoder, Decoder) for m in decoder.modules()}

    def sizes(layer: nn.Module) -> list[tuple[int, int]]:
        return latent_sizes[:1] if layer in decoder_layers else latent_sizes

    layer_shapes = {m: {_carried(s, size) for s in shapes for size in sizes(m)} for m, shapes in reference.items()}
    attention_shapes: dict[tuple, int] = defaultdict(int)
    for size in latent_sizes:
        for q, k, heads in reference_attention:
            attention_shapes[(_carried(q, size), _carried(k, size), heads)] += 1
    return layer_shapes, channels_last, attention_shapes


def _carried(shape: tuple, latent: tuple[int, int]) -> tuple:
    """A shape seen at REFERENCE_LATENT, as it is at `latent` (sides multiples of 8, as every output size gives);
    a map's sides scale with the latent's, the decoder's upsampled ones too."""
    (ref_h, ref_w), (h, w) = REFERENCE_LATENT, latent
    if len(shape) == 4:
        return (*shape[:2], shape[2] * h // ref_h, shape[3] * w // ref_w)
    if len(shape) == 3:
        for level in range(4):
            if shape[1] == (ref_h >> level) * (ref_w >> level):
                return (shape[0], (h >> level) * (w >> level), shape[2])
    return shape


def slowdown_of_emulated_bf16(size: int = 512) -> float:
    """How many times slower a bf16 matrix product runs than an fp32 one on this CPU (a few hundred ms)."""
    a32 = torch.randn(size, size)
    a16 = a32.bfloat16()
    return fastest_seconds(lambda: a16 @ a16) / fastest_seconds(lambda: a32 @ a32)
