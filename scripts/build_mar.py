#!/usr/bin/env python3
"""Builds the TorchServe model `model_store/<name>/` from a checkpoint (default: the generated tiny one).

torch-model-archiver packs the handler, the `controlnet_canny` package, the architecture YAML and
model-config.yaml in its "no-archive" format: a plain directory that TorchServe serves in place (it links
to it; a .mar zip would be extracted to a temporary directory on every start). The checkpoints are then
hard-linked into that directory, never passed through the archiver, which would copy them twice (once to
its staging directory, once to the export path); a 5.7 GB file thus costs no copy at all when the model
store is on the checkpoint's file system, and exactly one otherwise.

KServe's TorchServe runtime looks for `.mar` files in its model store: `--format mar` writes
`<export-path>/<name>.mar` instead (a zip, stored uncompressed), checkpoints inside. That costs two copies of
the checkpoints while building (the archiver's staging directory, then the zip; the build works beside the
export path, which needs twice their size free) and an extraction at every TorchServe start.

Examples:
  build_mar.py                                                        # tiny model (make mar)
  build_mar.py --checkpoint models/control_sd15_canny.pth             # v1.0
  build_mar.py --checkpoint models/v1-5-pruned.ckpt --checkpoint models/control_v11p_sd15_canny.pth \\
               --set handler.defaults.eta=1.0 --set handler.precision=bf16   # v1.1
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HANDLER_DIR = ROOT / "handler"
sys.path.insert(0, str(HANDLER_DIR))

from controlnet_canny.config import CONFIG_DIR, load_config  # noqa: E402
from serving import ServingConfig  # noqa: E402

TINY_CHECKPOINT = ROOT / "artifacts" / "tiny" / "control_tiny_canny.pth"
TINY_CONFIG = CONFIG_DIR / "cldm_tiny.yaml"
# The tiny architecture (random weights: the embedded demo and test model) is sized for 64x64 images.
TINY_SETTINGS = {"handler.limits.image_resolution": [64, 768], "handler.defaults.image_resolution": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", type=Path,
                        help="checkpoint file; give twice for v1.1 (SD 1.5 base, then the control-only file). "
                             f"Default: {TINY_CHECKPOINT.relative_to(ROOT)}")
    parser.add_argument("--arch-config", type=Path,
                        help="architecture YAML (default: cldm_tiny.yaml for the tiny model, else cldm_v15.yaml)")
    parser.add_argument("--model-config", type=Path, default=HANDLER_DIR / "model-config.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model-config.yaml entry; dotted key, YAML value (e.g. handler.precision=bf16)")
    parser.add_argument("--model-name", default="controlnet")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    parser.add_argument("--format", choices=["dir", "mar"], default="dir",
                        help="dir: the model directory <export-path>/<name>/ (no copy of the checkpoints); "
                             "mar: one <export-path>/<name>.mar file, as KServe's TorchServe runtime expects")
    args = parser.parse_args(argv)
    if args.arch_config is None:
        args.arch_config = TINY_CONFIG if args.checkpoint is None else CONFIG_DIR / "cldm_v15.yaml"
    args.checkpoint = args.checkpoint or [TINY_CHECKPOINT]
    return args


def set_dotted(config: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[leaf] = value


def model_config(args: argparse.Namespace) -> dict:
    config = yaml.safe_load(args.model_config.read_text())
    settings = dict(TINY_SETTINGS) if args.arch_config.name == TINY_CONFIG.name else {}
    for override in args.overrides:
        key, sep, value = override.partition("=")
        if not sep:
            sys.exit(f"error: --set {override!r}: expected KEY=VALUE")
        settings[key] = yaml.safe_load(value)
    for key, value in settings.items():
        set_dotted(config, key, value)
    config["handler"]["checkpoints"] = [path.name for path in args.checkpoint]
    config["handler"]["model_config"] = args.arch_config.name
    try:
        ServingConfig.from_mapping(config["handler"])
    except ValueError as err:
        sys.exit(f"error: {args.model_config}: {err}")
    return config


def place_checkpoint(source: Path, target: Path) -> str:
    """Hard link (no copy, no extra disk) where the file systems allow, else one plain copy."""
    try:
        os.link(source, target)
        return "hard-linked"
    except OSError:
        shutil.copyfile(source, target)
        return "copied (another file system than the model store)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    missing = [str(p) for p in [*args.checkpoint, args.arch_config] if not p.is_file()]
    if missing:
        sys.exit(f"error: not found: {', '.join(missing)}")
    if len({p.name for p in args.checkpoint}) != len(args.checkpoint):
        sys.exit("error: checkpoints must have distinct file names (they sit side by side in the model directory)")
    config = model_config(args)
    if args.format == "mar":
        build_archive(args, config)
        return
    export_dir = args.export_path / args.model_name
    store = config["handler"].get("adapters") or ""
    kept_store = export_dir / store if store and not Path(store).is_absolute() else None
    args.export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build_mar_", dir=args.export_path) as tmp:
        if export_dir.exists():
            if not (export_dir / "MAR-INF" / "MANIFEST.json").is_file():
                sys.exit(f"error: {export_dir} exists and is not a model directory; not replacing it")
            if kept_store is not None and kept_store.is_dir():  # the operator's adapters outlive a rebuild
                kept_store.rename(Path(tmp) / "adapters")
            shutil.rmtree(export_dir)
        archive(args, config, Path(tmp), "no-archive")
        if (Path(tmp) / "adapters").is_dir():
            kept_store.parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / "adapters").rename(kept_store)
            print(f"adapter store kept: {kept_store}")
    if args.checkpoint == [TINY_CHECKPOINT] and kept_store is not None and not kept_store.exists():
        # the embedded tiny model's demo store: a LoRA per layout, an embedding, a TAESD (noise, as its images)
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_tiny_adapters import write_demo_store

        write_demo_store(kept_store, load_config(args.arch_config))
        print(f"demo adapter store written: {kept_store}")
    for checkpoint in args.checkpoint:
        how = place_checkpoint(checkpoint, export_dir / checkpoint.name)
        print(f"{checkpoint} -> {export_dir / checkpoint.name}: {how}")
    print(f"model {args.model_name!r} ready in {export_dir} (serve it with: make serve)")


def archive(args: argparse.Namespace, config: dict, tmp: Path, archive_format: str, checkpoints: bool = False) -> None:
    """torch-model-archiver on the handler, the package, the architecture YAML (and the checkpoints if asked)."""
    staging = tmp / "files"
    shutil.copytree(HANDLER_DIR / "controlnet_canny", staging / "controlnet_canny",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(HANDLER_DIR / "serving.py", staging)
    shutil.copy2(args.arch_config, staging)
    if checkpoints:
        for checkpoint in args.checkpoint:
            place_checkpoint(checkpoint, staging / checkpoint.name)
    config_file = tmp / "model-config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    # The archiver stages files in $TMPDIR/<model-name> and deletes whatever is there first: give it its own.
    archiver_tmp = tmp / "archiver"
    archiver_tmp.mkdir()
    subprocess.run(
        [str(Path(sys.executable).parent / "torch-model-archiver"),
         "--model-name", args.model_name, "--version", args.version,
         "--handler", str(HANDLER_DIR / "controlnet_handler.py"),
         "--extra-files", str(staging), "--config-file", str(config_file),
         "--archive-format", archive_format, "--export-path", str(args.export_path), "--force"],
        check=True, env={**os.environ, "TMPDIR": str(archiver_tmp)},
    )


def build_archive(args: argparse.Namespace, config: dict) -> None:
    """<export-path>/<name>.mar, checkpoints inside; the work files sit beside it (same file system: the
    checkpoints are hard-linked into the staging directory where possible, never into /tmp)."""
    target = args.export_path / f"{args.model_name}.mar"
    if target.exists() and not target.is_file():
        sys.exit(f"error: {target} exists and is not a file; not replacing it")
    args.export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build_mar_", dir=args.export_path) as tmp:
        archive(args, config, Path(tmp), "zip-store", checkpoints=True)
    print(f"model {args.model_name!r} archived in {target} ({target.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
