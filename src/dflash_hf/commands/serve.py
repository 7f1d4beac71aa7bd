"""`dflash-hf serve`: an OpenAI-compatible HTTP server (chat/completions, completions, streaming) with DFlash decoding.

Requests that arrive while a batch runs wait and join the next batch; see docs/SERVING.md. Needs the `serve` extra
(`pip install -e '.[serve]'` in the source folder: FastAPI, uvicorn and prometheus-client).
"""

from __future__ import annotations

import argparse

from dflash_hf.cli_args import (
    add_device_argument, add_dtype_argument, non_negative_int, positive_int, resolve_device_dtype,
)


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1..65535), got {value}")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with DFlash decoding (batched, streaming)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--target", default="smollm2",
                        help="'smollm2' (the embedded SmolLM2-135M-Instruct, default) or a local model folder")
    parser.add_argument("--drafter", default=None,
                        help="'bundled' (the SmolLM2 drafter, default), a local drafter folder, or random:N (an "
                             "UNTRAINED N-layer drafter built for the target: exact output, no speedup; for tests)")
    parser.add_argument("--no-drafter", action="store_true",
                        help="decode with plain batched target.generate instead (same server, for comparisons)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--max-batch-size", type=positive_int, default=8,
                        help="most requests decoded together in one batch (default 8)")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="prompt + max_tokens limit per request and the static cache length "
                             "(default: min(target max_position_embeddings, 8192))")
    add_dtype_argument(parser, default="fp32",
                       help="weights dtype (default fp32: greedy output identical to the target's; bf16 is faster on "
                            "GPU but near-ties may flip; auto = bf16 on cuda, else fp32)")
    add_device_argument(parser)
    parser.add_argument("--served-model-name", default=None,
                        help="name reported in responses and /v1/models (default: the target's folder name)")
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile the decode step (CUDA; compiles once per batch shape, slow start)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip capturing the CUDA graphs of every batch shape before serving")
    parser.add_argument("--shutdown-timeout", type=non_negative_int, default=5,
                        help="seconds in-flight requests get to finish after SIGTERM (default 5)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level (default warning)")
    parser.add_argument("--access-log", action="store_true", help="log every request (uvicorn access log)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import os
    import sys

    try:
        from dflash_hf.serve import main  # FastAPI, uvicorn and torch only when this command runs
    except ImportError as error:
        raise ValueError(str(error)) from None  # printed by the CLI as a one-line error naming the fix

    # The server reads torch.<args.dtype>, so it gets the concrete device and torch's own name for the dtype.
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    args.device, args.dtype = device, str(dtype).removeprefix("torch.")
    code = main(args)
    # The server has shut down gracefully and holds nothing to save. Python's own teardown of torch/transformers
    # takes seconds on a busy machine, which a supervisor waiting for SIGTERM to take effect should not pay.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
