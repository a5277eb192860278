#!/usr/bin/env python3
"""Offline ControlNet-canny generation, no server: image + prompt in, result bundle (zip) out.

The bundle holds sample_00.png..., edge_map.png (the exact control image: white edges on black; the
reference demo displayed its inverse) and params.yaml with every effective parameter, seeds resolved.
Defaults are the reference demo's; offline, any image_resolution that is a multiple of 64 is accepted.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))

from controlnet_canny.bundle import encode_png, make_bundle  # noqa: E402
from controlnet_canny.config import CONFIG_DIR  # noqa: E402
from controlnet_canny.ddim import ddim_timesteps  # noqa: E402
from controlnet_canny.params import GenerationParams, Limits, ParamError, parse_params  # noqa: E402
from controlnet_canny.backends import BackendOptions  # noqa: E402
from controlnet_canny.pipeline import PRECISION_CHOICES, ControlNetCannyPipeline  # noqa: E402
from controlnet_canny.preprocess import decode_image  # noqa: E402
from serving import effective_parameters  # noqa: E402

# Offline there is no server to protect: wide limits, any multiple of 64 from 64 up, no cost cap. DDIM steps keep
# the server's range: beyond it the schedule only repeats timesteps.
OFFLINE_LIMITS = replace(Limits(), image_resolution=(64, 4096), num_samples=(1, 64))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, type=Path,
                        help="v1.0 combined file, or give twice: SD 1.5 base then the v1.1 control-only file")
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "cldm_v15.yaml")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("result.zip"))
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    parser.add_argument("--backend", action="append", default=[], metavar="KEY=VALUE",
                        help="CPU speed levers as in model-config.yaml's handler.backend, e.g. prepack=none")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: CUDA when available)")
    defaults = GenerationParams(prompt="")
    for f in fields(GenerationParams):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true")
        elif f.name == "prompt":
            parser.add_argument(flag, required=True)
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=getattr(defaults, f.name))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        params = parse_params({f.name: getattr(args, f.name) for f in fields(GenerationParams)}, OFFLINE_LIMITS)
        image = decode_image(args.image.read_bytes(), max_bytes=2**30, max_pixels=2**28, field="--image")
    except ParamError as err:
        sys.exit(f"error: {err}")
    try:
        backend = BackendOptions.from_mapping(dict(option.partition("=")[::2] for option in args.backend))
        pipeline = ControlNetCannyPipeline.load(args.checkpoint, args.config, args.device, args.precision, backend)
    except (ValueError, OSError) as err:  # a checkpoint, configuration or backend mistake: the message names it
        sys.exit(f"error: {err}")
    prepared = pipeline.prepare(image, params)
    steps = len(ddim_timesteps(prepared.params.ddim_steps))
    with tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr) as bar:
        def on_step(done: int, total: int) -> None:
            bar.update(done - bar.n)

        result = pipeline.generate([prepared], on_step)
    effective = effective_parameters(prepared, {
        "model": None,  # offline: no TorchServe model
        "model_version": None,
        "checkpoints": [p.name for p in args.checkpoint],
        "config": args.config.name,
        "precision": pipeline.precision,
        "device": str(pipeline.device),
    }, result.steps)
    samples = [encode_png(img, {**effective, "seed": seed}) for img, seed in zip(result.images[0], prepared.seeds)]
    args.out.write_bytes(make_bundle(samples, encode_png(prepared.edge_map), effective))
    print(f"{args.out}: {len(samples)} sample(s), seeds {prepared.seeds}", file=sys.stderr)


if __name__ == "__main__":
    main()
