"""`dflash-hf export`: write a Hub-ready folder for a drafter (config with auto_map, remote code, weights in the
released layout, custom_generate/, model card), optionally upload it.

    dflash-hf export bundled --target smollm2 --out hub_upload/SmolLM2-135M-Instruct-DFlash \\
        --metrics benchmarks/results/smollm2_h200_f_b1.json
    HF_TOKEN=hf_... dflash-hf export bundled --target smollm2 --out hub_upload/... --push NAMESPACE/NAME

--push takes the token as huggingface_hub does (HF_TOKEN, else the saved `hf auth login`) and refuses to run offline
before anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dflash_hf.cli_args import TORCH_DTYPE_NAMES, add_dtype_argument


def add_card_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder to write (e.g. hub_upload/NAME)")
    parser.add_argument("--name", default=None,
                        help="model name, the card's title (default: the NAME of --push NAMESPACE/NAME, else the "
                             "converted release's name, else TARGET-DFlash)")
    parser.add_argument("--metrics", default=None, metavar="JSON",
                        help="measured results for the card, summarised (tau per prompt category, speedup against "
                             "HF static-cache greedy, hardware, command) and written as its model-index: the JSON "
                             "of `dflash-hf bench` (benchmarks/results/NAME.json) or a training metrics.json "
                             "(default for export: the training results the drafter folder carries, its "
                             "metrics.json or TRAINING.md, if any)")
    parser.add_argument("--base-model", default=None, help="Hub id of the target for the card's base_model")
    parser.add_argument("--license", default=None,
                        help="license id for the card's metadata (export: default apache-2.0; convert: default the "
                             "release's own card license, else 'other')")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--push", default=None, metavar="REPO_ID",
                        help="upload the folder to this Hub model repo (token: HF_TOKEN, else the saved "
                             "`hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private (with --push)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be written and uploaded, write and upload nothing")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a Hub-ready drafter folder (remote code, custom_generate, model card); --push uploads it",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("drafter", metavar="DRAFTER",
                        help="'bundled' (the shipped SmolLM2 drafter) or a drafter folder (config.json + weights)")
    parser.add_argument("--target", required=True,
                        help="the drafter's target: 'smollm2', a Hub id (for the card) or a local model folder "
                             "(its config is checked against the drafter)")
    add_dtype_argument(parser, default="bf16", extra=("keep",),
                       help="weights dtype in the export (default bf16, as released drafters; auto or keep = the "
                            "stored dtype, unchanged)")
    add_card_arguments(parser)
    parser.set_defaults(func=run)


def target_info(target: str, base_model: str | None) -> tuple[str | None, dict | None]:
    """`(base_model hub id or None, {num_hidden_layers, hidden_size} or None)` for `--target`."""
    import json

    from dflash_hf.export import KNOWN_TARGETS

    known = KNOWN_TARGETS.get(target.lower())
    if known is not None:
        return base_model or known["hub_id"], known
    folder = Path(target).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"--target {target} is a folder without config.json; pass a model folder.")
        config = json.loads(config_file.read_text())
        config = config.get("text_config", config) if "num_hidden_layers" not in config else config
        return base_model, {"num_hidden_layers": config.get("num_hidden_layers"),
                            "hidden_size": config.get("hidden_size")}
    if target.count("/") == 1 and not target.startswith((".", "/")):
        return base_model or target, None  # a Hub id: used for the card only, nothing is fetched
    raise FileNotFoundError(
        f"--target {target!r} is neither 'smollm2', a local model folder nor a Hub id (NAMESPACE/NAME)."
    )


def finish(result_or_builder, args, *, dry_run_label: str) -> int:
    """Write (or, with --dry-run, list) the export and push it when asked."""
    import tempfile

    from dflash_hf.export import hub_token, push_folder, validate_repo_id

    token = None
    if args.push:
        validate_repo_id(args.push)
        if not args.dry_run:
            token = hub_token()  # no token, or offline: fail before anything is written
    if args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            result = result_or_builder(Path(tmp) / Path(args.out).name, True)
            where = f"to https://huggingface.co/{args.push}" if args.push else f"into {args.out}"
            print(f"Dry run: {dry_run_label} would write these files {where}:")
            print(result.listing())
        return 0
    result = result_or_builder(Path(args.out), args.overwrite)
    print(f"Wrote {result.folder}:")
    print(result.listing())
    if args.push:
        url = push_folder(result.folder, args.push, private=args.private, token=token)
        print(f"Uploaded to https://huggingface.co/{args.push} ({url})")
    return 0


def drafter_folder(drafter: str) -> Path | None:
    """The folder DRAFTER names ('bundled': the one shipped in the package), or None when there is none."""
    from dflash_hf.assets import bundled_drafter_path, has_bundled_drafter

    if drafter.lower() == "bundled":
        return bundled_drafter_path() if has_bundled_drafter() else None
    folder = Path(drafter).expanduser()
    return folder if folder.is_dir() else None


def weights_dtype(drafter: str):
    """dtype of the drafter's stored weights (float32 for the untrained stand-in), for `--dtype keep`."""
    import torch
    from safetensors import safe_open

    from dflash_hf.assets import bundled_drafter_path, has_bundled_drafter

    if drafter.lower() == "bundled":
        if not has_bundled_drafter():
            return torch.float32
        folder = bundled_drafter_path()
    else:
        folder = Path(drafter).expanduser()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"DRAFTER {drafter!r} has no *.safetensors weights; pass a drafter folder.")
    from dflash_hf.assets import DRAFTER_FOLDER_FIX, explained_load

    with explained_load(f"DRAFTER {drafter!r}", DRAFTER_FOLDER_FIX), safe_open(str(files[0]), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def run(args) -> int:
    import torch

    from dflash_hf.assets import resolve_drafter
    from dflash_hf.export import check_fits_target_config, export_drafter, load_metrics
    from dflash_hf.model_card import training_results

    metrics = load_metrics(args.metrics)
    if metrics is None:
        metrics = training_results(drafter_folder(args.drafter))
    base_model, target_dims = target_info(args.target, args.base_model)
    if args.drafter.lower() == "bundled" and args.target.lower() != "smollm2":
        raise ValueError("DRAFTER 'bundled' is the SmolLM2-135M-Instruct drafter; export it with --target smollm2.")
    source_dtype = weights_dtype(args.drafter)
    dtype = source_dtype if args.dtype in ("auto", "keep") else getattr(torch, TORCH_DTYPE_NAMES[args.dtype])
    drafter, trained = resolve_drafter(args.drafter, dtype=dtype)
    if not trained:
        print("dflash-hf export: warning: no trained SmolLM2 drafter is bundled yet; exporting UNTRAINED random "
              "weights (the model card says so).", file=sys.stderr)
    if target_dims:
        check_fits_target_config(drafter.config, target_dims)

    def build(out: Path, overwrite: bool):
        return export_drafter(drafter, out, name=args.name, base_model=base_model,
                              repo_id=args.push, metrics=metrics, dtype=dtype,
                              license=args.license or "apache-2.0", trained=trained, overwrite=overwrite)

    return finish(build, args, dry_run_label=f"export of {args.drafter}")
