#!/usr/bin/env python3
"""Writes a deterministic tiny ControlNet-canny checkpoint in exactly the real v1.0 key layout.

Random weights from a seed: the tiny model is the project's embedded default model and test fixture, so
its images are noise. With --split it also writes the v1.1 pair (SD 1.5 base `.ckpt` nested under
`state_dict` with `model_ema.*` keys, plus a control-only `.pth`), and with --safetensors `.safetensors` copies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handler"))

from controlnet_canny.config import CONFIG_DIR, ModelConfig, load_config  # noqa: E402
from controlnet_canny.ddim import alphas_cumprod  # noqa: E402
from controlnet_canny.model import ControlLDM  # noqa: E402
from controlnet_canny.vae import VAEEncoder  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "artifacts" / "tiny"


def make_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = ControlLDM(cfg)
    state = {}
    for key, value in model.state_dict().items():
        # Default init leaves norms at 1/0 and zero convs would be zero in a real ControlNet; jitter every
        # vector so that each weight visibly matters in the parity tests.
        state[key] = value + 0.1 * torch.randn_like(value) if value.ndim == 1 else value.clone()
    # The VAE encoder, which real files carry and img2img loads apart (vae.load_encoder).
    with torch.device("meta"):
        encoder = VAEEncoder(cfg.vae, cfg.schedule.scale_factor)
    for key, value in encoder.state_dict().items():
        state[f"first_stage_model.{key}"] = 0.05 * torch.randn(value.shape)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(cfg.text.context_length)[None]
    sched = cfg.schedule
    ac = alphas_cumprod(sched.linear_start, sched.linear_end, sched.timesteps)
    state["alphas_cumprod"] = ac
    state["alphas_cumprod_prev"] = torch.cat([torch.ones(1), ac[:-1]])
    state["betas"] = 1 - ac / state["alphas_cumprod_prev"]
    state["logvar"] = torch.zeros(sched.timesteps)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "cldm_tiny.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--split", action="store_true", help="also write the v1.1 pair: base .ckpt + control-only .pth")
    parser.add_argument("--safetensors", action="store_true", help="also write .safetensors copies")
    args = parser.parse_args()

    state = make_state_dict(load_config(args.config), args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    files = {"control_tiny_canny.pth": state}
    if args.split:
        base = {k: v for k, v in state.items() if not k.startswith("control_model.")}
        base["model_ema.decay"] = torch.tensor(0.9999)
        base["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
        files["tiny_sd15_base.ckpt"] = {"state_dict": base}
        files["control_tiny_v11_canny.pth"] = {k: v for k, v in state.items() if k.startswith("control_model.")}
    for name, content in files.items():
        torch.save(content, args.out_dir / name)
        print(args.out_dir / name)
    if args.safetensors:
        from safetensors.torch import save_file

        flat = {name: content.get("state_dict", content) for name, content in files.items()}
        for name, tensors in flat.items():
            target = args.out_dir / (Path(name).stem + ".safetensors")
            save_file({k: v.contiguous() for k, v in tensors.items()}, target)
            print(target)


if __name__ == "__main__":
    main()
