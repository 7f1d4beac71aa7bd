"""An OpenAI-compatible HTTP server with DFlash decoding (`dflash-hf serve`).

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with server-sent-event streaming),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format, through prometheus-client, as vLLM and SGLang
serve it) and `GET /metrics.json` (the same figures as one JSON object). See docs/SERVING.md for the client side.

How requests are run (one process, one model):

- One scheduler task owns the accelerator. It takes the oldest waiting request, adds every other waiting request with
  the same sampling settings (greedy with greedy; same temperature/top-p/top-k for sampling) up to `--max-batch-size`,
  left-pads them into one batch and runs ONE `DFlashDecoder.generate` call on a dedicated worker thread, so the event
  loop keeps answering while the batch runs. Requests that arrive while a batch runs wait and join the NEXT batch;
  there is no joining a batch in flight (the queueing delay is returned per response in `dflash.queue_seconds` and
  summarised in /metrics and /metrics.json).
- The decoder keeps static caches and CUDA graphs per batch size, so batches are padded up to the next power of two
  (capped at `--max-batch-size`) by repeating the first row: a handful of shapes instead of one per batch size.
- A seeded sampling request (`seed` set, temperature > 0) runs alone, so the same request and seed give the same text.
- Streaming: every row streams live, one chunk per verify step (the decoder's `on_step` hands over each row's newly
  committed tokens with the step's one host sync): time to first token = queueing + prefill, at any batch size. With
  `--no-drafter` (plain `target.generate`, whose streamers take batch 1 only) a row of a batch of two or more arrives
  when its batch ends.
- Greedy (`temperature: 0`) output is, token for token, what the target alone produces for that request.

`--no-drafter` serves the same API through plain batched `target.generate` (same batching, no drafter), to compare
the two in one stack.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import concurrent.futures
import json
import queue
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

import torch

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "`dflash-hf serve` needs FastAPI and uvicorn; install them from the dflash-hf source folder with:  "
        "pip install -e '.[serve]'  "
        f"(missing: {error.name})"
    ) from error

from dflash_hf.cli_args import seed_problem, temperature_problem
from dflash_hf.stops import cut_after_stop, target_stop_ids

try:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.utils import floatToGoString
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "`dflash-hf serve` needs prometheus-client for GET /metrics; install it with:  pip install -e '.[serve]'  "
        f"(in the dflash-hf source folder; missing: {error.name})"
    ) from error

DEFAULT_MAX_MODEL_LEN = 8192
# The decoder keeps one workspace (static caches + CUDA graphs) per batch shape and sampling setting. Greedy ones are
# bounded by the batch-size buckets; sampling ones would grow with every distinct temperature/top-p/top-k a client
# sends, so only the newest few are kept.
MAX_SAMPLING_WORKSPACES = 4
# After --shutdown-timeout the running requests are ended with an error; this is how long their last bytes get to
# reach the clients before uvicorn cancels what is left.
SHUTDOWN_FLUSH_SECONDS = 2
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Keys of apply_chat_template that the server sets itself; a client passing them would break the request.
RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "tokenize", "return_tensors", "return_dict", "tokenizer_kwargs",
                            "return_assistant_tokens_mask", "chat_template")


# ----------------------------------------------------------------------------------------------------------------------
# Errors in the OpenAI shape
# ----------------------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _shutting_down(detail: str | None = None) -> APIError:
    message = "The server is shutting down" + (f"; {detail}" if detail else "") + "; retry later."
    return APIError(message, status=503, type="service_unavailable")


def _error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
            503: "service_unavailable"}.get(status, "invalid_request_error" if status < 500 else "server_error")


# ----------------------------------------------------------------------------------------------------------------------
# Request bodies
# ----------------------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: "5" is not an integer, 1 is not a boolean (as in OpenAI's API); extra fields are kept and checked below.
    model_config = ConfigDict(extra="allow", strict=True)


class ChatMessage(_Strict):
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None


class _SamplingFields(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


# OpenAI request bodies nest a few levels (messages -> content parts -> fields); anything deeper is not a request.
MAX_JSON_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_json_values(data: Any) -> None:
    """An APIError for a body nested deeper than MAX_JSON_DEPTH, or holding a lone UTF-16 surrogate (`"\\ud800"`: valid
    JSON, but not text any tokenizer can encode). Iterative, so the check itself cannot overflow the stack."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise APIError("The request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                               "pair), which is not valid Unicode text; send UTF-8 text.", code="invalid_json")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep; send a flat OpenAI "
                           "request.", code="invalid_json")
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        stack.extend((item, depth + 1) for item in items)


def _parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """JSON bytes -> validated request, or an APIError naming the field and the fix."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(f"The request body is not valid JSON ({error}); send a JSON object.",
                       code="invalid_json") from None
    except RecursionError:  # the C parser recurses once per nesting level
        raise APIError(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep; send a flat OpenAI "
                       "request.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(f"The request body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
    _check_json_values(data)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        loc = [str(p) for p in first["loc"]]
        param = loc[0] if loc else None
        if first["type"] == "missing":
            message = f"Missing required field '{param}'."
        else:
            shown = json.dumps(first.get("input"), default=str)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            message = f"Invalid value for '{'.'.join(loc)}': {first['msg']} (got {shown})."
        code = "missing_field" if first["type"] == "missing" else "invalid_type"
        raise APIError(message, param=param, code=code) from None


# ----------------------------------------------------------------------------------------------------------------------
# Sampling settings and generation rows
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def batch_key(self) -> tuple:
        """Rows with equal keys may share one decoder call (the decoder takes one sampling setting per call)."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            # A seeded request runs alone (its own prompts only), so the same request and seed give the same text.
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p, self.top_k)


def _sampling_params(req: _SamplingFields, max_tokens: int | None, default_max: int) -> SamplingParams:
    """Validate the sampling fields shared by both endpoints."""
    if req.n not in (None, 1):
        raise APIError(f"n={req.n} is not supported: this server returns one choice per prompt; send n=1 or omit it.",
                       param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise APIError(f"{name}={value} is not supported (it would change the output); omit it or send 0.",
                           param=name)
    if req.logit_bias:
        raise APIError("logit_bias is not supported; omit it.", param="logit_bias")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"max_tokens must be >= 1, got {max_tokens}.", param="max_tokens")
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    problem = temperature_problem(temperature)
    if problem:
        raise APIError(f"temperature {problem}.", param="temperature")
    problem = seed_problem(req.seed) if req.seed is not None else None
    if problem:
        raise APIError(f"seed {problem}.", param="seed")
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if not 0 < top_p <= 1:
        raise APIError(f"top_p must be in (0, 1], got {req.top_p}.", param="top_p")
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if top_k < 0:
        raise APIError(f"top_k must be >= 1, or 0 / -1 to disable it, got {req.top_k}.", param="top_k")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stop):
        raise APIError("stop strings must be non-empty.", param="stop")
    if len(stop) > 16:
        raise APIError(f"At most 16 stop strings are supported, got {len(stop)}.", param="stop")
    return SamplingParams(max_tokens=max_tokens if max_tokens is not None else default_max, temperature=temperature,
                          top_p=top_p, top_k=top_k, seed=req.seed, stop=stop)


class _Aborted(Exception):
    """Raised from the streamer to end a live (batch-1) generation early: client gone or stop string found."""


@dataclass(eq=False)
class Row:
    """One sequence to generate (one choice). The worker thread posts `("chunk", ids)`, `("end", None)` or
    `("error", APIError)` to `queue`; the first chunk is the prefill token, each later chunk one verify step."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    started: float | None = None
    batch_size: int = 0
    cancelled: bool = False  # read by the worker thread: stop live streaming / skip if still queued


@dataclass
class RowResult:
    text: str
    finish_reason: str
    completion_tokens: int
    acceptance_lengths: list[int]
    batch_size: int
    queue_seconds: float


class TextAssembler:
    """Generated token ids -> text deltas, cut at the first stop string; stop token ids end the text.

    Incremental detokenisation (as in TGI/vLLM): decode a short window before and after the new token and emit the
    difference, holding back while the text ends in an incomplete UTF-8 character. With stop strings, the last
    `max(len(stop)) - 1` characters are held back until it is certain they do not start a stop string.
    """

    def __init__(self, tokenizer, stop: list[str], stop_token_ids: set[int]):
        self.tokenizer, self.stop, self.stop_token_ids = tokenizer, stop, stop_token_ids
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        self.emitted = 0
        self.searched = 0
        self.n_tokens = 0
        self.finished: str | None = None
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one generated token; return the text that can be sent now."""
        if self.finished:
            return ""
        self.n_tokens += 1
        if token in self.stop_token_ids:
            self.finished = "stop"
            return self._release(len(self.text))
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new = self._decode(self.ids[self.prefix_offset:])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.text += new[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self._find_stop():
            return self._release(len(self.text))
        return self._release(len(self.text) - self.holdback)

    def flush(self) -> str:
        """End of generation: everything still held back (an unfinished character included)."""
        if not self.finished:
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            new = self._decode(self.ids[self.prefix_offset:])
            if len(new) > len(prefix):
                self.text += new[len(prefix):]
            self._find_stop()
        return self._release(len(self.text))

    def _find_stop(self) -> bool:
        if not self.stop:
            return False
        start = max(0, self.searched - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        self.searched = len(self.text)
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finished = "stop"
        return True

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out


class _RowStreamer:
    """The decoder's / transformers' streamer protocol (`put(ids)`, `end()`) for one live row: skips the prompt,
    forwards each committed chunk to the row, and aborts the generation once the row is cancelled."""

    def __init__(self, post: Callable[[tuple], None], row: Row):
        self.post, self.row = post, row
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first put is the prompt, as in transformers' streamers
            self.prompt_seen = True
            return
        if self.row.cancelled:
            raise _Aborted()
        self.post(("chunk", value.reshape(-1).tolist()))

    def end(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def random_drafter(target, tokenizer, layers: int, block_size: int = 16, seed: int = 0):
    """An UNTRAINED `layers`-layer DFlash drafter that fits `target` (for tests and plumbing checks: tau ~ 1).

    Head layout copies the target's attention; context layers follow the published spread rule with one id per
    draft layer (z-lab's default); the mask id is the tokenizer's unk/pad token, else the last vocabulary row.
    """
    from dflash_hf import DFlashConfig, DFlashDraftModel, build_target_layer_ids
    from dflash_hf.modeling.generation_dflash import target_text_config

    text = target_text_config(target)
    depth = text.num_hidden_layers
    ids = build_target_layer_ids(depth, layers) if depth >= 4 else [depth // 2]
    rows = target.get_input_embeddings().weight.shape[0]
    mask_id = next((t for t in (getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "pad_token_id", None))
                    if t is not None and 0 <= t < rows), rows - 1)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rope_theta = getattr(text, "rope_theta", None) or (getattr(text, "rope_parameters", None) or {}).get("rope_theta")
    param = next(target.parameters())
    torch.manual_seed(seed)
    config = DFlashConfig(
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=getattr(text, "num_key_value_heads", heads), head_dim=head_dim,
        vocab_size=text.vocab_size, rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta or 10000.0), max_position_embeddings=text.max_position_embeddings,
        block_size=block_size, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id, num_target_layers=depth,
        dflash_config={"mask_token_id": int(mask_id), "target_layer_ids": ids},
    )
    return DFlashDraftModel(config).to(device=param.device, dtype=param.dtype).eval()


def load_models(target: str, drafter: str | None, dtype: torch.dtype, device: str):
    """`(target, tokenizer, drafter or None, drafter_kind)`; `drafter` is a folder, `bundled`, `random:N` or None."""
    from dflash_hf.assets import resolve_drafter, resolve_target

    is_smollm2 = target.lower() in ("smollm2", "default")
    if drafter is not None and drafter.lower() == "bundled" and not is_smollm2:
        # Allowed for a SmolLM2-135M-Instruct folder (e.g. converted elsewhere); any other target fails the shape
        # check of DFlashDecoder with a message naming the mismatch.
        print(f"NOTE: --drafter bundled is the SmolLM2-135M-Instruct drafter; --target {target} must be that model.",
              file=sys.stderr)
    random_layers = None
    if drafter is not None and drafter.lower().startswith("random:"):
        count = drafter.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--drafter {drafter!r}: expected random:N with N >= 1 draft layers, e.g. random:2.")
        random_layers = int(count)
    model, tokenizer = resolve_target(target, dtype=dtype, device=device)
    if drafter is None:
        return model, tokenizer, None, "none"
    if random_layers is not None:
        return model, tokenizer, random_drafter(model, tokenizer, random_layers), "untrained (random)"
    draft, trained = resolve_drafter(drafter, dtype=dtype, device=device, tokenizer=tokenizer)
    return model, tokenizer, draft, "trained" if trained else "untrained (random)"


# ----------------------------------------------------------------------------------------------------------------------
# The engine: queue, scheduler, worker thread
# ----------------------------------------------------------------------------------------------------------------------


class Engine:
    """Owns the model and the one worker thread that runs it; batches waiting rows by sampling settings.

    Args:
        target, tokenizer: the served model.
        drafter: a `DFlashDraftModel` (DFlash decoding) or None (plain batched `target.generate`).
        max_batch_size: rows per decoder call.
        max_model_len: prompt + max_tokens limit per request (and the decoder's static cache length).
    """

    def __init__(self, target, tokenizer, drafter=None, *, max_batch_size: int = 8, max_model_len: int | None = None,
                 model_name: str = "model", drafter_kind: str = "trained", compile: bool = False):
        from dflash_hf.modeling.generation_dflash import target_text_config

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        self.target, self.tokenizer, self.drafter = target, tokenizer, drafter
        self.model_name, self.drafter_kind = model_name, drafter_kind
        self.max_batch_size = max_batch_size
        limit = getattr(target_text_config(target), "max_position_embeddings", None)
        default = min(limit, DEFAULT_MAX_MODEL_LEN) if limit else DEFAULT_MAX_MODEL_LEN
        if max_model_len is not None and limit is not None and max_model_len > limit:
            raise ValueError(f"--max-model-len {max_model_len} exceeds the target's max_position_embeddings {limit}; "
                             f"use at most {limit}.")
        self.max_model_len = max_model_len or default
        self.device = next(target.parameters()).device
        self.stop_token_ids = target_stop_ids(target, tokenizer)  # where target.generate would stop
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.stop_token_ids[0] if self.stop_token_ids else 0)
        self.decoder = None
        if drafter is not None:
            from dflash_hf import DFlashDecoder

            # CUDA graphs on GPU; torch.compile only on request (it compiles once per batch shape and sampling
            # setting, which a server meets at unpredictable times).
            self.decoder = DFlashDecoder(target, drafter, max_length=self.max_model_len, compile=compile)
            self.max_model_len = self.decoder.max_length
        self.buckets = sorted({min(1 << i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
        self.mode = "dflash" if drafter is not None else "plain"
        self.created = int(time.time())
        self.started_at = time.monotonic()
        # Batch-size histogram: every size up to 8, then the padding buckets (powers of two).
        self.metrics = _Metrics(batch_bounds=tuple(sorted({*range(1, min(max_batch_size, 8) + 1), *self.buckets})))
        self._pending: deque[Row] = deque()
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="dflash-gpu", daemon=True)
        # daemon: a batch still running when the server shuts down must not keep the process alive.
        self._worker.start()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.closing = False
        self.running_batch = 0
        self._running: list[Row] = []

    # ------------------------------------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, done = job
            try:
                result, error = fn(), None
            except BaseException as failure:  # noqa: BLE001 - reported to the waiting side
                result, error = None, failure
            try:
                done(result, error)
            except RuntimeError:  # the event loop is closed: the server is shutting down, nobody waits
                pass

    def call_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread and wait (used for warm-up before the server starts)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, lambda result, error: future.set_exception(error) if error else future.set_result(result)))
        return future.result()

    def warmup(self) -> None:
        """Capture the CUDA graphs of every greedy batch shape now rather than on the first requests."""
        if self.decoder is None or self.device.type != "cuda":
            return
        ids = self.tokenizer("Hello, how are you?", add_special_tokens=True)["input_ids"] or [self.pad_token_id]
        steps = 3 * self.decoder.block_size  # enough steps to reach the captured steady state
        for bucket in self.buckets:
            batch = torch.tensor([ids] * bucket, device=self.device)
            self.call_in_worker(lambda b=batch: self.decoder.generate(
                b, torch.ones_like(b), max_new_tokens=min(steps, self.max_model_len - b.shape[1]),
                stop_token_ids=self.stop_token_ids, pad_token_id=self.pad_token_id))

    # ------------------------------------------------------------------------------------------------- event loop
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = self.loop.create_task(self._scheduler())

    def drain(self) -> None:
        """Shutdown has begun (SIGTERM): refuse new rows and answer every waiting row with a 503 now; the running
        batch goes on. On the event loop."""
        self.closing = True
        while self._pending:
            self._pending.popleft().queue.put_nowait(("error", _shutting_down()))
        if self._wakeup is not None:
            self._wakeup.set()  # a scheduler waiting for work sees `closing` and stops

    def abort_running(self) -> None:
        """The grace period is over: end every row of the running batch with a 503, so that its response completes (a
        stream with an error event and [DONE]) instead of being cut by the server's cancellation. On the event loop."""
        for row in self._running:
            row.cancelled = True  # a live generation stops at its next step
            row.queue.put_nowait(("error", _shutting_down("its generation was cut off after --shutdown-timeout")))

    async def close(self) -> None:
        self.drain()
        if self._task is not None:
            self._task.cancel()
        self._jobs.put(None)

    def submit(self, row: Row) -> None:
        if self.closing:
            raise _shutting_down()
        self._pending.append(row)
        self._wakeup.set()

    def queue_depth(self) -> int:
        return sum(not r.cancelled for r in self._pending)

    def _take_batch(self) -> list[Row]:
        """The oldest waiting row and every later one with the same sampling key, up to max_batch_size, as long as
        the padded batch still fits the decoder's length (longest prompt + largest max_tokens)."""
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
            self.metrics.cancelled_in_queue += 1
        if not self._pending:
            return []
        head = self._pending.popleft()
        key = head.params.batch_key()
        batch, keep = [head], deque()
        longest, budget = len(head.prompt_ids), head.params.max_tokens
        for row in self._pending:
            if row.cancelled:
                self.metrics.cancelled_in_queue += 1
                continue
            fits = max(longest, len(row.prompt_ids)) + max(budget, row.params.max_tokens) <= self.max_model_len
            if len(batch) < self.max_batch_size and row.params.batch_key() == key and fits:
                batch.append(row)
                longest, budget = max(longest, len(row.prompt_ids)), max(budget, row.params.max_tokens)
            else:
                keep.append(row)
        self._pending = keep
        return batch

    async def _scheduler(self) -> None:
        while not self.closing:
            try:
                await self._schedule_one()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug here must not leave every later request waiting forever
                traceback.print_exc()

    async def _schedule_one(self) -> None:
        """Take one batch (or wait for work), run it on the worker thread, record what happened."""
        batch = self._take_batch()
        if not batch:
            self._wakeup.clear()
            await self._wakeup.wait()
            return
        now = time.monotonic()
        for row in batch:
            row.started, row.batch_size = now, len(batch)
        self.metrics.record_batch(len(batch), [now - r.arrival for r in batch])
        future = self.loop.create_future()

        def done(result, error, future=future):
            def settle():
                if not future.done():
                    future.set_exception(error) if error else future.set_result(result)
            self.loop.call_soon_threadsafe(settle)

        self.running_batch, self._running = len(batch), batch
        self._jobs.put((lambda b=batch: self._run_batch(b), done))
        try:
            stats = await future
        except Exception:  # noqa: BLE001 - _run_batch reports per row; this only guards the loop
            stats = None
        finally:
            self.running_batch, self._running = 0, []
        if stats:
            self.metrics.record_stats(stats)

    # ---------------------------------------------------------------------------------------------- one batch (thread)
    def _post(self, row: Row, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(row.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is waiting
            pass

    def _run_batch(self, rows: list[Row]) -> dict:
        """Runs on the worker thread: one decoder (or target.generate) call for `rows`; posts each row's chunks."""
        params = rows[0].params
        live = len(rows) == 1 and rows[0].stream
        padded = list(rows)
        if self.decoder is not None:  # pad to a bucket size by repeating row 0 (few shapes -> few CUDA graphs)
            size = next(b for b in self.buckets if b >= len(rows))
            padded += [rows[0]] * (size - len(rows))
        width = max(len(r.prompt_ids) for r in padded)
        input_ids = torch.full((len(padded), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(padded), width), dtype=torch.long)
        for i, row in enumerate(padded):
            input_ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        budget = max(r.params.max_tokens for r in rows)
        streamer = _RowStreamer(lambda item: self._post(rows[0], item), rows[0]) if live else None
        sent = [0] * len(rows)
        ended = [False] * len(rows)
        stops = set(self.stop_token_ids)

        def post_step(chunks: list[list[int]]) -> None:
            # Each real row (not the bucket's filler rows) gets its new tokens now, cut at its own max_tokens, and
            # its end as soon as it has one (a stop token or its max_tokens), not when the whole batch ends.
            for i, row in enumerate(rows):
                if ended[i]:
                    continue
                ids = chunks[i][: row.params.max_tokens - sent[i]]
                sent[i] += len(ids)
                if ids and not row.cancelled:
                    self._post(row, ("chunk", ids))
                if sent[i] >= row.params.max_tokens or (ids and ids[-1] in stops):
                    ended[i] = True
                    self._post(row, ("end", None))

        on_step = post_step if self.decoder is not None and not live else None
        seeded = params.seed is not None and not params.greedy
        generator = None
        start = time.perf_counter()
        aborted = False
        try:
            generator = torch.Generator().manual_seed(params.seed) if seeded else None
            if self.decoder is not None:
                out = self.decoder.generate(
                    input_ids, mask, max_new_tokens=budget, do_sample=not params.greedy,
                    temperature=params.temperature if not params.greedy else 1.0, top_k=params.top_k,
                    top_p=params.top_p, stop_token_ids=self.stop_token_ids, pad_token_id=self.pad_token_id,
                    streamer=streamer, generator=generator, on_step=on_step,
                )
                new_tokens, acceptance = out.new_tokens, out.acceptance_lengths
                if not params.greedy:
                    self._trim_workspaces()
            else:
                new_tokens = self._plain_generate(input_ids, mask, budget, params, streamer)
                acceptance = None
        except _Aborted:
            aborted, new_tokens, acceptance = True, None, None
        except Exception as error:  # noqa: BLE001 - every row gets a 500 and the server keeps serving
            traceback.print_exc()
            failure = APIError(f"Generation failed: {type(error).__name__}: {error}", status=500, type="server_error")
            for row in rows:
                self._post(row, ("error", failure))
            return {"failed": len(rows)}
        finally:
            if generator is not None:
                torch.seed()  # do not leave later unseeded requests on a predictable RNG stream
        seconds = time.perf_counter() - start
        tokens = 0
        for i, row in enumerate(rows):
            if on_step is not None:  # already streamed step by step, and ended if its row has ended
                tokens += sent[i]
                if not ended[i]:
                    self._post(row, ("end", None))
                continue
            if not live:
                ids = new_tokens[i][: row.params.max_tokens]
                tokens += len(ids)
                if ids:
                    self._post(row, ("chunk", ids[:1]))
                sizes = acceptance[i] if acceptance is not None else [1] * (len(ids) - 1)
                pos = 1
                for size in sizes:
                    if pos >= len(ids):
                        break
                    self._post(row, ("chunk", ids[pos:pos + size]))
                    pos += size
            elif new_tokens is not None:
                tokens += len(new_tokens[0])
            self._post(row, ("end", None))
        return {"rows": len(rows), "padded": len(padded), "seconds": seconds, "tokens": tokens, "aborted": aborted}

    def decoder_workspaces(self) -> int | None:
        spaces = getattr(self.decoder, "_workspaces", None)
        return len(spaces) if isinstance(spaces, dict) else None

    def _trim_workspaces(self) -> None:
        """Keep at most MAX_SAMPLING_WORKSPACES sampling workspaces in the decoder (worker thread, between calls)."""
        if self.decoder.evict_sampling_workspaces(MAX_SAMPLING_WORKSPACES) and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _plain_generate(self, input_ids, mask, budget: int, params: SamplingParams, streamer) -> list[list[int]]:
        """`--no-drafter`: one batched `target.generate` call; new tokens per row, cut after the first stop token."""
        kwargs = dict(do_sample=not params.greedy, max_new_tokens=budget, eos_token_id=self.stop_token_ids or None,
                      pad_token_id=self.pad_token_id, streamer=streamer)
        if params.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        with torch.no_grad():
            out = self.target.generate(input_ids, attention_mask=mask, **kwargs)
        stops = set(self.stop_token_ids)
        return [cut_after_stop(seq, stops) for seq in out[:, input_ids.shape[1]:].tolist()]

    # ------------------------------------------------------------------------------------------- consuming a row
    async def row_text(self, row: Row) -> AsyncIterator[Union[str, RowResult]]:
        """Text deltas of `row` as they arrive, then its `RowResult`. Closing the iterator early cancels the row."""
        assembler = TextAssembler(self.tokenizer, row.params.stop, set(self.stop_token_ids))
        chunks: list[int] = []
        finished = False
        try:
            while not assembler.finished:
                kind, payload = await row.queue.get()
                if kind == "error":
                    raise payload
                if kind == "end":
                    break
                if not chunks:
                    self.metrics.ttft.observe(time.monotonic() - row.arrival)
                chunks.append(len(payload))
                pieces = []  # one text delta per verify step, not per token
                for token in payload:
                    if assembler.n_tokens >= row.params.max_tokens or assembler.finished:
                        break
                    pieces.append(assembler.push(int(token)))
                if any(pieces):
                    yield "".join(pieces)
            tail = assembler.flush()
            if tail:
                yield tail
            finished = True
            acceptance = chunks[1:] if self.decoder is not None else []
            reason = assembler.finished or ("length" if assembler.n_tokens >= row.params.max_tokens else "stop")
            yield RowResult(text=assembler.text, finish_reason=reason, completion_tokens=assembler.n_tokens,
                            acceptance_lengths=acceptance, batch_size=row.batch_size,
                            queue_seconds=(row.started or row.arrival) - row.arrival)
        finally:
            if not row.cancelled and (not finished or assembler.finished):
                # Client gone, or a stop string/token ended the text: a live generation can stop now.
                row.cancelled = True
                if not finished:
                    self.metrics.cancelled += 1


# Histogram bucket upper bounds (+Inf is added). Batch sizes get theirs from the engine's batch-size buckets.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ACCEPTANCE_BUCKETS = tuple(range(1, 17))  # tokens committed per verify step; a released drafter's block is 16


class _Histogram:
    """A histogram's state (count per bucket, sum, count), kept here so that /metrics and /metrics.json read the same
    numbers. Updated and read on the event loop only."""

    def __init__(self, bounds):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # bucket `le` counts values <= le
        self.sum += value
        self.count += 1

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


@dataclass
class _Metrics:
    batch_bounds: tuple = (1, 2, 4, 8)
    requests: Counter = field(default_factory=Counter)  # (kind "chat" | "text", streaming) -> requests
    errors: Counter = field(default_factory=Counter)  # HTTP status (str) -> error responses
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    queue_seconds_max: float = 0.0
    decode_seconds: float = 0.0
    generated_tokens: int = 0
    aborted_generations: int = 0
    cancelled: int = 0
    cancelled_in_queue: int = 0
    failed_rows: int = 0

    def __post_init__(self):
        self.acceptance = _Histogram(ACCEPTANCE_BUCKETS)  # one observation per verify step of a finished row
        self.batch_size = _Histogram(self.batch_bounds)  # one per batch run
        self.queue_wait = _Histogram(SECONDS_BUCKETS)  # one per row taken into a batch
        self.ttft = _Histogram(SECONDS_BUCKETS)  # arrival to the row's first token, one per row that got one

    def request(self, kind: str, stream: bool) -> None:
        self.requests[kind, stream] += 1

    def requests_of(self, kind: str | None = None, stream: bool | None = None) -> int:
        return sum(n for (k, s), n in self.requests.items() if kind in (None, k) and stream in (None, s))

    def record_batch(self, size: int, waits: list[float]) -> None:
        self.batch_sizes[size] += 1
        self.batch_size.observe(size)
        for wait in waits:
            self.queue_wait.observe(wait)
        self.queue_seconds_max = max([self.queue_seconds_max, *waits])

    def record_stats(self, stats: dict) -> None:
        self.failed_rows += stats.get("failed", 0)
        self.decode_seconds += stats.get("seconds", 0.0)
        self.generated_tokens += stats.get("tokens", 0)
        self.aborted_generations += int(stats.get("aborted", False))

    def record_result(self, prompt_tokens: int, results: list[RowResult]) -> None:
        self.prompt_tokens += prompt_tokens
        for r in results:
            self.completion_tokens += r.completion_tokens
            for length in r.acceptance_lengths:
                self.acceptance.observe(length)


class _PrometheusCollector:
    """Everything `_Metrics` and the engine's live state hold, as Prometheus metric families, read at scrape time.
    Registered in one `CollectorRegistry` per app (never the process-wide default registry), so several servers or
    apps in one process do not collide."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        engine, m = self.engine, self.engine.metrics

        def counter(name, documentation, value):
            return CounterMetricFamily(name, documentation, value=value)

        def gauge(name, documentation, value):
            return GaugeMetricFamily(name, documentation, value=value)

        info = InfoMetricFamily("dflash_server", "The served model, the decoding mode and the drafter.")
        info.add_metric([], {"model": engine.model_name, "mode": engine.mode, "drafter": str(engine.drafter_kind)})
        yield info
        yield gauge("dflash_max_batch_size", "--max-batch-size: most requests decoded in one batch.",
                    engine.max_batch_size)
        yield gauge("dflash_max_model_len", "Prompt + max_tokens limit per request (tokens).", engine.max_model_len)
        yield gauge("dflash_start_time_seconds", "Unix time the server started.", engine.created)

        requests = CounterMetricFamily("dflash_requests", "Completion requests accepted, by endpoint (kind: chat = "
                                       "/v1/chat/completions, completions = /v1/completions) and streaming.",
                                       labels=["kind", "stream"])
        for kind, name in (("chat", "chat"), ("text", "completions")):
            for stream in (False, True):
                requests.add_metric([name, str(stream).lower()], m.requests[kind, stream])
        yield requests
        errors = CounterMetricFamily("dflash_request_errors", "Error responses, by HTTP status.", labels=["status"])
        for status, n in sorted(m.errors.items()):
            errors.add_metric([status], n)
        yield errors
        yield counter("dflash_prompt_tokens", "Prompt tokens of requests answered in full.", m.prompt_tokens)
        yield counter("dflash_completion_tokens", "Completion tokens returned to clients (usage.completion_tokens).",
                      m.completion_tokens)
        yield counter("dflash_generated_tokens", "Tokens decoded for the requests' rows (one row per prompt), text "
                      "cut by a stop string included.", m.generated_tokens)
        yield counter("dflash_rows_cancelled", "Rows whose client went away before their answer was complete.",
                      m.cancelled)
        yield counter("dflash_rows_cancelled_while_queued", "Rows dropped before they ran: their client went away "
                      "while they waited.", m.cancelled_in_queue)
        yield counter("dflash_rows_failed", "Rows whose generation raised (answered with a 500).", m.failed_rows)
        yield counter("dflash_live_generations_aborted", "Generations stopped early because their only client went "
                      "away.", m.aborted_generations)
        yield counter("dflash_decode_seconds", "Seconds the accelerator spent decoding batches.", m.decode_seconds)
        yield m.batch_size.family("dflash_batch_size", "Requests (rows) per batch run, before padding to a "
                                  "batch-size bucket.")
        yield m.queue_wait.family("dflash_queue_wait_seconds", "Seconds a row waited from arrival until its batch "
                                  "started.")
        yield m.ttft.family("dflash_time_to_first_token_seconds", "Seconds from a row's arrival to its first "
                            "generated token reaching the HTTP handler (queueing + prefill).")
        yield m.acceptance.family("dflash_acceptance_length", "Tokens committed per verify step (tau; the mean is "
                                  "_sum / _count), for rows answered in full. Empty with --no-drafter.")
        yield gauge("dflash_queue_wait_max_seconds", "Longest wait of any row so far.", m.queue_seconds_max)
        yield gauge("dflash_requests_running", "Rows in the batch now running.", engine.running_batch)
        yield gauge("dflash_requests_waiting", "Rows waiting for a batch.", engine.queue_depth())
        workspaces = engine.decoder_workspaces()
        if workspaces is not None:
            yield gauge("dflash_decoder_workspaces", "Static-cache workspaces the decoder holds (one per batch "
                        "shape and sampling setting).", workspaces)


# ----------------------------------------------------------------------------------------------------------------------
# Request handling
# ----------------------------------------------------------------------------------------------------------------------


def _dflash_field(results: list[RowResult]) -> dict:
    flat = [a for r in results for a in r.acceptance_lengths]
    field_ = {
        "acceptance_lengths": flat,
        "mean_acceptance_length": (sum(flat) / len(flat)) if flat else None,
        "batch_size": max(r.batch_size for r in results),
        "queue_seconds": round(max(r.queue_seconds for r in results), 6),
    }
    if len(results) > 1:
        field_["per_choice"] = [{"acceptance_lengths": r.acceptance_lengths, "batch_size": r.batch_size}
                                for r in results]
    return field_


class _Handler:
    def __init__(self, engine: Engine):
        self.engine = engine

    # ------------------------------------------------------------------------------------------------- prompts
    def _check_length(self, ids: list[int], params: SamplingParams, explicit_max: bool, param: str) -> None:
        limit = self.engine.max_model_len
        if not ids:
            raise APIError("The prompt is empty after tokenisation; send at least one token.", param=param)
        if len(ids) + (params.max_tokens if explicit_max else 1) > limit:
            what = f"{len(ids)} prompt tokens" + (f" + max_tokens {params.max_tokens}" if explicit_max else "")
            raise APIError(f"This model's context window is {limit} tokens, but the request needs {what}; shorten "
                           "the prompt or lower max_tokens.", param=param,
                           code="context_length_exceeded")

    def _params(self, req, max_tokens, ids) -> tuple[SamplingParams, bool]:
        explicit = max_tokens is not None
        params = _sampling_params(req, max_tokens, default_max=max(self.engine.max_model_len - len(ids), 1))
        return params, explicit

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tokenizer = self.engine.tokenizer
        if not req.messages:
            raise APIError("'messages' must contain at least one message.", param="messages")
        if not getattr(tokenizer, "chat_template", None):
            raise APIError("This model's tokenizer has no chat template; use /v1/completions with a raw prompt.",
                           param="messages")
        if req.tools or req.functions:
            raise APIError("Tool calling is not supported by this server; omit 'tools'.", param="tools")
        if req.logprobs or req.top_logprobs:
            raise APIError("logprobs are not supported by this server; omit 'logprobs'.", param="logprobs")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError("Only response_format {'type': 'text'} is supported.", param="response_format")
        messages = []
        for i, message in enumerate(req.messages):
            item = message.model_dump(exclude_none=True)
            content = message.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                       "are supported.", param="messages")
                    texts.append(part["text"])
                item["content"] = "\n".join(texts)
            messages.append(item)
        kwargs = dict(req.chat_template_kwargs or {})
        reserved = [k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS]
        if reserved:
            raise APIError(f"chat_template_kwargs may not set {reserved}; the server sets them.",
                           param="chat_template_kwargs")
        kwargs.setdefault("add_generation_prompt", True)
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as error:  # noqa: BLE001 - template errors are the request's fault (roles, kwargs)
            raise APIError(f"The chat template failed on these messages: {type(error).__name__}: {error}",
                           param="messages") from None
        # As apply_chat_template(tokenize=True) does: the template already wrote any special tokens it wants.
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        if req.echo or req.logprobs or (req.best_of not in (None, 1)) or req.suffix:
            name = next(n for n in ("echo", "logprobs", "best_of", "suffix")
                        if getattr(req, n) not in (None, False, 0, 1, ""))
            raise APIError(f"'{name}' is not supported by this server; omit it.", param=name)
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif not prompt:
            raise APIError("'prompt' must not be empty.", param="prompt")
        elif isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        rows = self.engine.target.get_input_embeddings().weight.shape[0]
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = self.engine.tokenizer(p, add_special_tokens=True)["input_ids"]
            else:
                bad = [t for t in p if not 0 <= t < rows]
                if bad:
                    raise APIError(f"Prompt token ids {bad[:5]} are outside the vocabulary (0..{rows - 1}).",
                                   param="prompt")
                ids = list(p)
            out.append(ids)
        return out

    # --------------------------------------------------------------------------------------------------- running
    def _rows(self, prompts: list[list[int]], params: SamplingParams, stream: bool) -> list[Row]:
        rows = [Row(prompt_ids=ids, params=params, stream=stream, queue=asyncio.Queue()) for ids in prompts]
        for row in rows:
            self.engine.submit(row)
        return rows

    async def _collect(self, rows: list[Row]) -> list[RowResult]:
        async def one(row):
            result = None
            async for item in self.engine.row_text(row):
                if isinstance(item, RowResult):
                    result = item
            return result

        tasks = [asyncio.ensure_future(one(r)) for r in rows]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task, row in zip(tasks, rows):
                if not task.done():
                    task.cancel()
                    row.cancelled = True

    async def complete(self, kind: Literal["chat", "text"], prompts: list[list[int]], params: SamplingParams,
                       stream: bool, include_usage: bool) -> JSONResponse | StreamingResponse:
        engine = self.engine
        engine.metrics.request(kind, stream)
        rows = self._rows(prompts, params, stream)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        if not stream:
            results = await self._collect(rows)
            engine.metrics.record_result(prompt_tokens, results)
            completion_tokens = sum(r.completion_tokens for r in results)
            if kind == "chat":
                choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                            "logprobs": None, "finish_reason": r.finish_reason} for i, r in enumerate(results)]
            else:
                choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                           for i, r in enumerate(results)]
            return JSONResponse({
                "id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": engine.model_name, "system_fingerprint": None, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                "dflash": _dflash_field(results),
            })
        return StreamingResponse(self._sse(kind, rows, rid, created, prompt_tokens, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    async def _sse(self, kind, rows: list[Row], rid: str, created: int, prompt_tokens: int,
                   include_usage: bool) -> AsyncIterator[str]:
        engine = self.engine
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, extra: dict | None = None, role: bool = False):
            if kind == "chat":
                delta: dict = {"role": "assistant", "content": ""} if role else {}
                if text is not None and not role:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": engine.model_name,
                    "system_fingerprint": None, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, row: Row):
            try:
                async for item in engine.row_text(row):
                    await merged.put((index, item))
            except APIError as error:
                await merged.put((index, error))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001
                await merged.put((index, APIError(f"{type(error).__name__}: {error}", status=500, type="server_error")))

        tasks = [asyncio.ensure_future(pump(i, row)) for i, row in enumerate(rows)]
        results: dict[int, RowResult] = {}
        failed = False
        try:
            if kind == "chat":
                for i in range(len(rows)):
                    yield chunk(i, None, None, role=True)
            while len(results) < len(rows):
                index, item = await merged.get()
                if isinstance(item, APIError):
                    yield f"data: {json.dumps(item.body())}\n\n"
                    failed = True
                    break
                if isinstance(item, RowResult):
                    results[index] = item
                    yield chunk(index, None if kind == "chat" else "", item.finish_reason,
                                {"dflash": _dflash_field([item])})
                else:
                    yield chunk(index, item, None)
            if not failed:
                ordered = [results[i] for i in range(len(rows))]
                engine.metrics.record_result(prompt_tokens, ordered)
                if include_usage:
                    completion = sum(r.completion_tokens for r in ordered)
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion}
                    body = {"id": rid, "object": obj, "created": created, "model": engine.model_name,
                            "system_fingerprint": None, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task, row in zip(tasks, rows):
                if not task.done():
                    task.cancel()
                    if not row.cancelled:
                        row.cancelled = True
                        engine.metrics.cancelled += 1


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving `engine` (start it under uvicorn; the lifespan starts the scheduler)."""
    from contextlib import asynccontextmanager

    from starlette.responses import Response

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="dflash-hf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    handler = _Handler(engine)

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        engine.metrics.errors[str(error.status)] += 1
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        engine.metrics.errors[str(error.status_code)] += 1
        message = {404: f"Unknown endpoint {request.method} {request.url.path}; see /v1/models, "
                        "/v1/chat/completions, /v1/completions, /health, /metrics, /metrics.json.",
                   405: f"Method {request.method} is not allowed on {request.url.path}."}.get(
            error.status_code, str(error.detail))
        return APIError(message, status=error.status_code, type=_error_type(error.status_code)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, error: Exception):
        engine.metrics.errors["500"] += 1
        traceback.print_exception(error)
        return APIError(f"Internal error: {type(error).__name__}: {error}", status=500, type="server_error").response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse_body(await request.body(), ChatCompletionRequest)
        ids = handler.chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params, explicit = handler._params(req, max_tokens, ids)
        handler._check_length(ids, params, explicit, "messages")
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return await handler.complete("chat", [ids], params, bool(req.stream), include_usage)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse_body(await request.body(), CompletionRequest)
        prompts = handler.completion_prompts(req)
        params, explicit = handler._params(req, req.max_tokens, max(prompts, key=len))
        for ids in prompts:
            handler._check_length(ids, params, explicit, "prompt")
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return await handler.complete("text", prompts, params, bool(req.stream), include_usage)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "dflash-hf",
            "max_model_len": engine.max_model_len, "dflash": {"mode": engine.mode, "drafter": engine.drafter_kind},
        }]}

    @app.get("/health")
    async def health():
        status = 503 if engine.closing else 200
        return JSONResponse({"status": "shutting_down" if engine.closing else "ok", "model": engine.model_name,
                             "mode": engine.mode, "queue_depth": engine.queue_depth(),
                             "running_batch": engine.running_batch}, status_code=status)

    registry = CollectorRegistry()  # this app's own: never the process-wide default registry
    registry.register(_PrometheusCollector(engine))

    @app.get("/metrics")
    async def metrics(request: Request):
        # Prometheus text format (version 0.0.4) unless the scraper asks for OpenMetrics in its Accept header.
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    @app.get("/metrics.json")
    async def metrics_json():
        m = engine.metrics
        batches = m.batch_size.count
        return {
            "model": engine.model_name, "mode": engine.mode, "drafter": engine.drafter_kind,
            "max_batch_size": engine.max_batch_size, "max_model_len": engine.max_model_len,
            "uptime_seconds": round(time.monotonic() - engine.started_at, 3),
            "requests": {"chat": m.requests_of("chat"), "completions": m.requests_of("text"),
                         "total": m.requests_of(), "streaming": m.requests_of(stream=True),
                         "errors": dict(m.errors), "cancelled": m.cancelled,
                         "cancelled_while_queued": m.cancelled_in_queue, "failed_rows": m.failed_rows},
            "tokens": {"prompt": m.prompt_tokens, "completion": m.completion_tokens, "generated": m.generated_tokens},
            "mean_acceptance_length": m.acceptance.mean(),
            "verify_steps": m.acceptance.count,
            "mean_time_to_first_token_seconds": m.ttft.mean(),
            "decoder_workspaces": engine.decoder_workspaces(),
            "batches": {"count": batches, "sizes": {str(k): v for k, v in sorted(m.batch_sizes.items())},
                        "mean_size": m.batch_size.mean(),
                        "aborted_live_generations": m.aborted_generations,
                        "decode_seconds": round(m.decode_seconds, 6)},
            "queue": {"depth": engine.queue_depth(), "running_batch": engine.running_batch,
                      "mean_wait_seconds": m.queue_wait.mean(), "max_wait_seconds": m.queue_seconds_max},
        }

    return app


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """`dflash-hf serve`: load the models, warm up, serve until SIGTERM/SIGINT, exit 0 after a graceful shutdown."""
    import uvicorn

    from dflash_hf.commands.demo import resolve_device

    if args.no_drafter and args.drafter is not None:
        raise ValueError("--no-drafter and --drafter exclude each other; pass one of them.")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    drafter_name = None if args.no_drafter else (args.drafter or "bundled")
    print(f"dflash-hf serve: loading target {args.target} ({args.dtype}, {device}), "
          f"drafter {drafter_name or 'none (--no-drafter)'}", file=sys.stderr, flush=True)
    target, tokenizer, drafter, kind = load_models(args.target, drafter_name, dtype, device)
    if kind.startswith("untrained"):
        print("NOTE: the drafter is UNTRAINED (random weights): outputs stay exact, but expect tau near 1 and no "
              "speedup.", file=sys.stderr)
    name = args.served_model_name or (
        "SmolLM2-135M-Instruct" if args.target.lower() in ("smollm2", "default") else Path(args.target).name)
    engine = Engine(target, tokenizer, drafter, max_batch_size=args.max_batch_size,
                    max_model_len=args.max_model_len, model_name=name, drafter_kind=kind, compile=args.compile)
    if not args.no_warmup:
        start = time.perf_counter()
        engine.warmup()
        if engine.device.type == "cuda" and engine.decoder is not None:
            print(f"Warm-up (CUDA graphs for batch sizes {engine.buckets}) took {time.perf_counter() - start:.1f} s",
                  file=sys.stderr, flush=True)

    # uvicorn re-raises the signal it caught once it has shut down; with the default handlers in place that would
    # turn a clean shutdown into "killed by SIGTERM" (exit 143). These handlers make the re-raise a no-op.
    signals_seen: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: signals_seen.append(number))

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # Waiting requests are answered 503 at once. Running ones get --shutdown-timeout seconds, then end with an
            # error: uvicorn's own cancellation, a little later, would answer a bare 500 or cut a stream before its
            # [DONE].
            engine.drain()
            asyncio.get_running_loop().call_later(args.shutdown_timeout, engine.abort_running)
            await super().shutdown(sockets)

    config = uvicorn.Config(create_app(engine), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_FLUSH_SECONDS,
                            access_log=args.access_log)
    server = Server(config)
    print(f"Serving {name} ({engine.mode}, max batch {args.max_batch_size}, context {engine.max_model_len}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server.run()
    return 0 if server.started or signals_seen else 1


__all__ = ["APIError", "Engine", "SamplingParams", "TextAssembler", "create_app", "load_models", "main",
           "random_drafter"]
