#!/usr/bin/env python3
"""Offline ControlNet-canny generation, no server: image (or a control map) + prompt in, result bundle (zip) out.

The bundle holds sample_00.png..., edge_map.png (the exact control image: white edges on black; the
reference demo displayed its inverse) and params.yaml with every effective parameter, seeds resolved.
Defaults are the reference demo's; offline, any image_resolution that is a multiple of 64 is accepted.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import fields, replace
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))

from controlnet_canny.bundle import encode_png, make_bundle  # noqa: E402
from controlnet_canny.config import CONFIG_DIR  # noqa: E402
from controlnet_canny.backends import BackendOptions  # noqa: E402
from controlnet_canny.params import CHOICES, GenerationParams, Limits, ParamError, parse_params  # noqa: E402
from controlnet_canny.pipeline import PRECISION_CHOICES, ControlNetCannyPipeline  # noqa: E402
from controlnet_canny.preprocess import decode_control_map, decode_image  # noqa: E402
from serving import effective_parameters, sample_pngs  # noqa: E402

# Offline there is no server to protect: wide limits, any multiple of 64 from 64 up, no cost cap. DDIM steps keep
# the server's range: beyond it the schedule only repeats timesteps.
OFFLINE_LIMITS = replace(Limits(), image_resolution=(64, 4096), num_samples=(1, 64))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, type=Path,
                        help="v1.0 combined file, or give twice: SD 1.5 base then the v1.1 control-only file")
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "cldm_v15.yaml")
    parser.add_argument("--image", type=Path, help="canny runs on it (required unless --control-image is given)")
    parser.add_argument("--control-image", type=Path,
                        help="your own control map (8-bit grey or RGB, sized like --image), used as is, not re-cannied")
    parser.add_argument("--init-image", type=Path, help="img2img: the image to start from (see --denoising-strength)")
    parser.add_argument("--out", type=Path, default=Path("result.zip"))
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    parser.add_argument("--backend", action="append", default=[], metavar="KEY=VALUE",
                        help="CPU speed levers as in model-config.yaml's handler.backend, e.g. prepack=none")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: CUDA when available)")
    parser.add_argument("--adapters", type=Path,
                        help="an adapter store: a directory with loras/, embeddings/ and taesd/ (README, Adapters)")
    defaults = GenerationParams(prompt="")
    for f in fields(GenerationParams):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true")
        elif f.name == "prompt":
            parser.add_argument(flag, required=True)
        elif f.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[f.name], default=getattr(defaults, f.name))
        elif f.name == "guidance_interval":
            parser.add_argument(flag, metavar="LOW,HIGH", help="guidance only at steps whose sigma is in (LOW, HIGH]")
        elif f.name == "loras":
            parser.add_argument(flag, action="append", default=[], metavar="NAME:WEIGHT",
                                help="a LoRA of the --adapters store (repeat for more; or <lora:NAME:WEIGHT> in the prompt)")
        else:
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=getattr(defaults, f.name))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.image is None and args.control_image is None:
        sys.exit("error: give --image (or --control-image)")
    limits = {"max_bytes": 2**30, "max_pixels": 2**28}
    sent = {name: getattr(args, name).read_bytes() for name in ("image", "control_image", "init_image")
            if getattr(args, name) is not None}
    try:
        params = parse_params({f.name: getattr(args, f.name) for f in fields(GenerationParams)}, OFFLINE_LIMITS)
        image = decode_image(sent["image"], **limits, field="--image") if "image" in sent else None
        control = decode_control_map(sent["control_image"], **limits, field="--control-image") if "control_image" in sent else None
        init = decode_image(sent["init_image"], **limits, field="--init-image") if "init_image" in sent else None
    except ParamError as err:
        sys.exit(f"error: {err}")
    # checked before the model loads; a server's store may start empty and fill up, a command line's is a typo
    if args.adapters is None and (params.loras or params.vae != "full"):
        asked = "loras" if params.loras else "vae"
        sys.exit(f"error: {asked}: LoRAs and vae=taesd come from an adapter store; give --adapters DIR")
    if args.adapters is not None and not args.adapters.is_dir():
        sys.exit(f"error: --adapters {args.adapters}: not a directory")
    try:
        backend = BackendOptions.from_mapping(dict(option.partition("=")[::2] for option in args.backend))
        pipeline = ControlNetCannyPipeline.load(args.checkpoint, args.config, args.device, args.precision, backend,
                                                args.adapters)
    except (ValueError, OSError) as err:  # a checkpoint, configuration or backend mistake: the message names it
        sys.exit(f"error: {err}")
    try:
        prepared = pipeline.prepare(image, params, control, init)
    except ParamError as err:
        sys.exit(f"error: {err}")
    with tqdm(desc="denoising", unit="step", file=sys.stderr) as bar:
        def on_step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        (result,) = pipeline.generate([prepared], on_step)
    model = {"model": None, "model_version": None,  # offline: no TorchServe model
             "checkpoints": [p.name for p in args.checkpoint], "config": args.config.name,
             "precision": pipeline.precision, "device": str(pipeline.device)}
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sent.items() if name != "image"}
    effective = effective_parameters(prepared, model, result.steps, digests, result.control_fidelity)
    for warning in effective["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    samples = sample_pngs(prepared, result.images, effective)
    args.out.write_bytes(make_bundle(samples, encode_png(prepared.edge_map), effective))
    print(f"{args.out}: {len(samples)} sample(s), seeds {prepared.seeds}", file=sys.stderr)


if __name__ == "__main__":
    main()
