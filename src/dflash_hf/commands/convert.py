"""`dflash-hf convert`: turn a downloaded z-lab DFlash release folder into a Hub-ready dflash-hf export, without
changing a tensor (the weight bytes are copied; only config.json gains our model_type and auto_map).

    dflash-hf convert ./Qwen3-8B-DFlash-b16 --out hub_upload/Qwen3-8B-DFlash-b16 --base-model Qwen/Qwen3-8B
"""

from __future__ import annotations

from pathlib import Path

from dflash_hf.commands.export import add_card_arguments, finish


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a z-lab DFlash release folder into a dflash-hf export (tensors unchanged)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("zlab_folder", metavar="ZLAB_FOLDER",
                        help="folder of a z-lab release (config.json + model.safetensors)")
    add_card_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from dflash_hf.export import convert_zlab, load_metrics

    src = Path(args.zlab_folder).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"ZLAB_FOLDER {args.zlab_folder!r} is not a folder; pass a downloaded z-lab release.")
    metrics = load_metrics(args.metrics)

    def build(out: Path, overwrite: bool):
        return convert_zlab(src, out, name=args.name, base_model=args.base_model,
                            repo_id=args.push, metrics=metrics, license=args.license, overwrite=overwrite)

    return finish(build, args, dry_run_label=f"conversion of {src}")
