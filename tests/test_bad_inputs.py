"""Bad inputs, as a table: every case fails with the exact exception type and a message that names the bad value and
the fix, or (for generation options transformers itself handles) is never a silently wrong output. After each
failure the same target and drafter still give greedy-equal output on the next call, with nothing left on the target.

Also: loading broken checkpoints (what `from_pretrained` does with bad config.json / safetensors / pickles), and that
loading our remote code makes no network call and evaluates no config value.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from helpers import greedy, random_prompt, tiny_drafter, tiny_target, tiny_tokenizer
from packaging.version import Version
from safetensors.torch import load_file, save_file
from transformers import AutoModel, TextStreamer

import dflash_hf
from dflash_hf import DFlashDecoder, DFlashDraftModel
from dflash_hf.modeling.compat_dflash import generate_hook_installed

V5 = Version(transformers.__version__) >= Version("5.0.0")
MODELING = Path(dflash_hf.modeling.__file__).parent
NEW = 8  # new tokens of every recovery check


@dataclass
class Env:
    target: torch.nn.Module
    drafter: DFlashDraftModel
    prompt: torch.LongTensor  # [1, 6]
    reference: torch.LongTensor  # target's own greedy output, [1, 6 + NEW]


@pytest.fixture(scope="module")
def env() -> Env:
    target = tiny_target("qwen3", layers=6, hidden=64)
    drafter = tiny_drafter(target, layer_ids=[1, 3])
    prompt = random_prompt(6, seed=11)
    return Env(target, drafter, prompt, greedy(target, prompt, NEW))


def assert_clean(target) -> None:
    hooked = [name for name, module in target.named_modules() if module._forward_hooks or module._forward_pre_hooks]
    assert not hooked, f"hooks left on {hooked}"
    assert "_get_candidate_generator" not in target.__dict__
    assert generate_hook_installed()


def assert_recovers(env: Env, route: str = "both") -> None:
    """The same pair still works in the route that failed (one cheap call; `both` for the others)."""
    assert_clean(env.target)
    if route in ("plain", "both"):
        assert torch.equal(greedy(env.target, env.prompt, NEW, assistant_model=env.drafter), env.reference)
    if route in ("batched", "both"):
        out = dflash_hf.generate(env.target, env.drafter, env.prompt, max_new_tokens=NEW)
        assert torch.equal(out.sequences, env.reference)
    assert_clean(env.target)


def plain(env: Env, drafter=None, prompt=None, max_new_tokens=NEW, **kw):
    prompt = env.prompt if prompt is None else prompt
    return env.target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                               assistant_model=drafter if drafter is not None else env.drafter, **kw)


def batched(env: Env, drafter=None, input_ids=None, attention_mask=None, **kw):
    kw.setdefault("max_new_tokens", NEW)
    ids = env.prompt if input_ids is None else input_ids
    return dflash_hf.generate(env.target, drafter if drafter is not None else env.drafter, ids, attention_mask, **kw)


def other_drafter(env: Env, **kw) -> DFlashDraftModel:
    kw.setdefault("layer_ids", [1, 3])
    return tiny_drafter(env.target, **kw)


def fc_mismatch(env: Env) -> DFlashDraftModel:
    drafter = other_drafter(env, layer_ids=[1, 2, 3])  # fc: 3 x 64 = 192 inputs
    drafter.config.target_layer_ids = [1, 2]  # the target now gives 2 x 64 = 128
    return drafter


def with_config(env: Env, **changes) -> DFlashDraftModel:
    drafter = other_drafter(env)
    for key, value in changes.items():
        setattr(drafter.config, key, value)
    return drafter


def pair(env: Env) -> torch.LongTensor:
    return torch.cat([env.prompt, random_prompt(6, seed=12)])


def hidden48_drafter(env: Env) -> DFlashDraftModel:
    return tiny_drafter(tiny_target("qwen3", layers=6, hidden=48), layer_ids=[1, 3])  # fc 96 in, target gives 128


@dataclass
class Case:
    id: str
    call: Callable[[Env], object]
    exc: type[BaseException]
    needles: tuple[str, ...]  # substrings the message must contain (the value and the fix)
    xfail: str | None = None


def fit(name, make, needles, route="plain"):
    call = (lambda e: plain(e, drafter=make(e))) if route == "plain" else (lambda e: batched(e, drafter=make(e)))
    return Case(f"{route}-{name}", call, ValueError, needles)


FIT = [
    ("hidden-size", hidden48_drafter, ("fc expects 96", "128", "hidden_size 64", "another target")),
    ("mask-id-eq-vocab", lambda e: other_drafter(e, mask_token_id=96), ("mask_token_id 96", "96 rows", "dflash_config.mask_token_id")),
    ("mask-id-negative", lambda e: other_drafter(e, mask_token_id=-1), ("mask_token_id -1", "96 rows")),
    ("mask-id-huge", lambda e: other_drafter(e, mask_token_id=151669), ("151669", "96 rows")),
    ("mask-id-none", lambda e: with_config(e, mask_token_id=None), ("mask_token_id None", "set dflash_config.mask_token_id")),
    ("layer-ids-too-deep", lambda e: other_drafter(e, layer_ids=[1, 9, 17]), ("[9, 17]", "only 6 decoder layers", "0..5")),
    ("layer-id-negative", lambda e: other_drafter(e, layer_ids=[-1, 3]), ("[-1]", "6 decoder layers")),
    ("layer-ids-empty", lambda e: with_config(e, target_layer_ids=[]), ("no target_layer_ids", "dflash_config.target_layer_ids")),
    ("fc-input-size", fc_mismatch, ("fc expects 192", "2 layers", "= 128")),
    ("dtype-bf16", lambda e: other_drafter(e, dtype=torch.bfloat16), ("torch.bfloat16", "torch.float32", "same dtype")),
    ("dtype-fp16", lambda e: other_drafter(e, dtype=torch.float16), ("torch.float16", "torch.float32", "drafter.to(")),
    # `meta` is a second device on every machine, so the device check runs without a GPU.
    ("device-meta", lambda e: other_drafter(e).to("meta"), ("on meta", "on cpu", "drafter.to('cpu')")),
    ("block-size-1", lambda e: with_config(e, block_size=1), ("block_size 1", "at least 2")),
]

CASES: list[Case] = [fit(n, m, s) for n, m, s in FIT]
CASES += [fit(n, m, s, route="batched") for n, m, s in FIT if n in ("hidden-size", "mask-id-eq-vocab",
                                                                     "layer-ids-too-deep", "dtype-bf16", "device-meta")]
CASES += [
    # ------------------------------------------------------------------ plain generate(assistant_model=drafter)
    Case("plain-num-return-sequences-greedy", lambda e: plain(e, do_sample=False, num_return_sequences=2), ValueError,
         ("num_return_sequences", "2")),
    Case("plain-num-return-sequences-sample", lambda e: plain(e, do_sample=True, num_return_sequences=3), ValueError,
         ("num_return_sequences", "3")),
    Case("plain-max-new-tokens-0", lambda e: plain(e, max_new_tokens=0), ValueError, ("max_new_tokens", "0")),
    Case("plain-max-new-tokens-negative", lambda e: plain(e, max_new_tokens=-4), ValueError, ("max_new_tokens", "-4")),
    Case("plain-temperature-0-sampling", lambda e: plain(e, do_sample=True, temperature=0.0), ValueError,
         ("temperature", "0.0", "do_sample=False")),
    Case("plain-batch-of-2-repetition-penalty", lambda e: plain(e, prompt=pair(e), do_sample=False,
                                                                repetition_penalty=1.3), ValueError,
         ("batch of 2", "repetition_penalty", "one prompt at a time")),
    Case("plain-inputs-embeds", lambda e: e.target.generate(inputs_embeds=e.target.get_input_embeddings()(e.prompt),
                                                            max_new_tokens=NEW, assistant_model=e.drafter),
         ValueError, ("inputs_embeds", "input_ids")),
    Case("plain-empty-prompt", lambda e: plain(e, prompt=torch.zeros(1, 0, dtype=torch.long), do_sample=False),
         ValueError, ("prompt", "0")),
    # transformers' own behaviour without an assistant too (the embedding lookup fails before any output).
    Case("plain-token-id-outside-vocab", lambda e: plain(e, prompt=e.prompt + 90, do_sample=False), IndexError,
         ("index out of range",)),
    # ------------------------------------------------------------------ the batched loop, dflash_hf.generate
    Case("batched-right-padding", lambda e: batched(e, input_ids=pair(e), attention_mask=torch.tensor(
        [[1, 1, 1, 1, 1, 0], [1] * 6])), ValueError, ("left padding", "pad on the left")),
    Case("batched-all-zero-row", lambda e: batched(e, input_ids=pair(e), attention_mask=torch.tensor(
        [[0] * 6, [1] * 6])), ValueError, ("all zeros", "at least one real token")),
    Case("batched-max-new-tokens-0", lambda e: batched(e, max_new_tokens=0), ValueError, ("max_new_tokens", ">= 1", "0")),
    Case("batched-max-new-tokens-negative", lambda e: batched(e, max_new_tokens=-3), ValueError, ("got -3",)),
    Case("batched-temperature-0", lambda e: batched(e, do_sample=True, temperature=0.0), ValueError,
         ("temperature", "got 0.0", "do_sample=False")),
    Case("batched-temperature-negative", lambda e: batched(e, do_sample=True, temperature=-0.5), ValueError,
         ("got -0.5",)),
    Case("batched-temperature-nan", lambda e: batched(e, do_sample=True, temperature=float("nan")), ValueError,
         ("finite", "got nan")),
    Case("batched-temperature-inf", lambda e: batched(e, do_sample=True, temperature=float("inf")), ValueError,
         ("finite", "got inf")),
    Case("batched-top-p-above-1", lambda e: batched(e, do_sample=True, top_p=1.5), ValueError, ("top_p=1.5", "(0, 1]")),
    Case("batched-top-p-0", lambda e: batched(e, do_sample=True, top_p=0.0), ValueError, ("top_p=0.0", "(0, 1]")),
    Case("batched-top-k-negative", lambda e: batched(e, do_sample=True, top_k=-1), ValueError, ("top_k=-1", ">= 0")),
    Case("batched-streamer-batch-2", lambda e: batched(e, input_ids=pair(e), streamer=TextStreamer(tiny_tokenizer())),
         ValueError, ("batch 2", "batch 1 only")),
    Case("batched-past-position-limit", lambda e: batched(e, input_ids=random_prompt(505, seed=3), max_new_tokens=10),
         ValueError, ("515", "max_position_embeddings 512", "lower max_new_tokens")),
    Case("batched-empty-prompt", lambda e: batched(e, input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError,
         ("(1, 0)", "prompt_len >= 1")),
    Case("batched-decoder-max-length", lambda e: DFlashDecoder(e.target, e.drafter, max_length=8).generate(
        e.prompt, max_new_tokens=5), ValueError, ("11", "max_length 8", "max_length=11")),
    Case("batched-cuda-graphs-on-cpu", lambda e: batched(e, cuda_graphs=True), ValueError,
         ("cuda_graphs=True", "on cpu", "pass False")),
    Case("plain-dflash-cuda-graphs-on-cpu", lambda e: plain(e, do_sample=False, dflash_cuda_graphs=True), ValueError,
         ("cuda_graphs=True", "on cpu")),
    Case("batched-1d-input-ids", lambda e: batched(e, input_ids=e.prompt[0]), ValueError, ("(6,)", "[batch, prompt_len]")),
    Case("batched-mask-shape", lambda e: batched(e, attention_mask=torch.ones(1, 5, dtype=torch.long)), ValueError,
         ("(1, 5)", "(1, 6)")),
]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
             for c in CASES])
def test_bad_input_fails_clearly_then_recovers(env, case):
    try:
        with pytest.raises(case.exc) as info:
            case.call(env)
        message = str(info.value)
        missing = [n for n in case.needles if n not in message]
        assert not missing, f"message lacks {missing}: {message!r}"
    finally:
        assert_recovers(env, case.id.split("-", 1)[0])


def test_table_is_large_enough():
    assert len(CASES) >= 30


# ----------------------------------------------------------------------------------------------------------------------
# Generation options transformers handles itself: an error, or the assistant ignored -- never a wrong output
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, named",
    [
        (dict(do_sample=False, num_beams=2), "num_beams=2"),
        (dict(do_sample=True, num_beams=3, length_penalty=0.5), "num_beams=3"),
        (dict(do_sample=False, penalty_alpha=0.6, top_k=4), "penalty_alpha=0.6"),
        (dict(do_sample=False, num_beams=4, num_beam_groups=2, diversity_penalty=1.0), "num_beams=4"),
        (dict(do_sample=False, dola_layers="low"), "dola_layers='low'"),
    ],
    ids=["beam-2", "beam-sample-length-penalty", "contrastive", "group-beam", "dola"],
)
def test_decoding_modes_a_speculative_decoder_cannot_serve_raise(env, kw, named):
    """Beam search, contrastive search and DoLa are not what a drafter speeds up: asking for them with a DFlash
    drafter raises a ValueError naming the setting, instead of transformers' warning that drops the assistant."""
    try:
        with pytest.raises(ValueError, match=re.escape(named)):
            plain(env, **kw)
    finally:
        assert_recovers(env, "plain")


def test_a_temperature_too_small_for_float32_samples_the_argmax(env):
    """1e-300 is 0 in float32: the engine's sampler must give the greedy tokens, not NaN probabilities (token 0)."""
    out = batched(env, do_sample=True, temperature=1e-300)
    assert torch.equal(out.sequences, env.reference)


def test_drafter_vocab_size_differs_from_target(env):
    """The drafter reads the target's embedding and head, so its config `vocab_size` is unused by DFlash itself: both
    the batched loop and plain generate (which runs it) give the target's own output."""
    drafter = other_drafter(env)
    drafter.config.vocab_size = 1000
    assert torch.equal(batched(env, drafter=drafter).sequences, env.reference)
    assert torch.equal(greedy(env.target, env.prompt, NEW, assistant_model=drafter), env.reference)
    assert_recovers(env, "plain")


def test_pipeline_tokenizer_with_ids_past_the_target_vocab(env):
    """A tokenizer of another family (larger vocabulary) gives ids the target has no row for: the pipeline fails the
    same way with and without the DFlash assistant (no partial or wrong output)."""
    from transformers import pipeline

    tokenizer = tiny_tokenizer(vocab=200)
    text = "w10 w150 w20"  # w150 -> id 150 >= 96 rows
    errors = []
    for assistant in (None, env.drafter):
        extra = {"assistant_model": assistant} if assistant is not None else {}
        pipe = pipeline("text-generation", model=env.target, tokenizer=tokenizer, **extra)
        with pytest.raises(Exception) as info:
            pipe(text, max_new_tokens=4, do_sample=False)
        errors.append(type(info.value))
    assert errors[0] is errors[1], errors
    assert_recovers(env, "plain")


# ----------------------------------------------------------------------------------------------------------------------
# Loading broken checkpoints
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(env, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("drafter")
    env.drafter.save_pretrained(folder)
    assert (folder / "model.safetensors").exists() and (folder / "modeling_dflash.py").exists()
    return folder


def variant(saved: Path, tmp_path: Path, mutate: Callable[[Path], None]) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(saved, folder)
    mutate(folder)
    return folder


def rewrite_weights(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        tensors = change(load_file(str(folder / "model.safetensors")))
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return mutate


LOADERS = {
    "direct": lambda folder, **kw: DFlashDraftModel.from_pretrained(folder, **kw),
    "auto": lambda folder, **kw: AutoModel.from_pretrained(folder, trust_remote_code=True, **kw),
}


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage() + "\n"


def load_with_log(loader: str, folder: Path, **kw):
    handler = LogCapture()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        return LOADERS[loader](folder, **kw), handler.text
    finally:
        logger.removeHandler(handler)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


LOAD_ERRORS = [
    ("truncated-config", lambda f: (f / "config.json").write_text((f / "config.json").read_text()[:120]), OSError,
     ("config.json", "not a valid JSON"), None),
    ("config-not-json", lambda f: (f / "config.json").write_text("model_type = dflash"), OSError,
     ("config.json", "not a valid JSON"), None),
    ("config-without-layer-ids", lambda f: (f / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((f / "config.json").read_text()).items()
         if k not in ("target_layer_ids", "dflash_config", "num_target_layers")})), ValueError,
     ("target_layer_ids", "dflash_config.target_layer_ids"), None),
    ("no-weights", lambda f: (f / "model.safetensors").unlink(), OSError, ("model.safetensors",), None),
    ("truncated-safetensors", lambda f: os.truncate(f / "model.safetensors", (f / "model.safetensors").stat().st_size // 2),
     Exception, ("deserializing header",), None),
    ("wrong-shape", rewrite_weights(lambda sd: {**sd, "fc.weight": torch.zeros(64, 64)}), RuntimeError,
     ("ignore_mismatched_sizes",) if V5 else ("size mismatch", "torch.Size([64, 64])"), None),
]


@pytest.mark.parametrize("loader", ["direct", "auto"])
@pytest.mark.parametrize("name, mutate, exc, needles, xfail", LOAD_ERRORS, ids=[c[0] for c in LOAD_ERRORS])
def test_broken_checkpoint_raises(saved, tmp_path, loader, name, mutate, exc, needles, xfail):
    folder = variant(saved, tmp_path, mutate)
    with pytest.raises(exc) as info:
        LOADERS[loader](folder)
    message = str(info.value)
    assert all(n in message for n in needles), message


@pytest.mark.skipif(not V5, reason="transformers 4.57: AutoModel.from_pretrained on a folder without config.json hangs "
                                    "under pytest (observed; transformers' own code path, not ours)")
def test_missing_config_names_config_json_auto(saved, tmp_path):
    folder = variant(saved, tmp_path, lambda f: (f / "config.json").unlink())
    with pytest.raises((OSError, ValueError)) as info:
        LOADERS["auto"](folder)
    assert "config.json" in str(info.value)


def test_missing_config_names_config_json_class(saved, tmp_path):
    folder = variant(saved, tmp_path, lambda f: (f / "config.json").unlink())
    with pytest.raises((OSError, ValueError)) as info:
        LOADERS["direct"](folder)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("loader", ["direct", "auto"])
@pytest.mark.parametrize("kind", ["missing", "extra"])
def test_missing_or_extra_keys_warn_listing_the_keys(env, saved, tmp_path, loader, kind):
    """Observed on 4.57 and 5.x: the model loads, and transformers logs a warning that lists the keys (missing ones
    are randomly initialised). Loud, not silent; output stays lossless (the drafter only proposes)."""
    key = "layers.0.mlp.up_proj.weight" if kind == "missing" else "unused.weight"
    change = (lambda sd: {k: v for k, v in sd.items() if k != key}) if kind == "missing" else (
        lambda sd: {**sd, key: torch.zeros(3)})
    folder = variant(saved, tmp_path, rewrite_weights(change))
    model, log = load_with_log(loader, folder)
    assert key in log, log
    assert ("MISSING" in log or "newly initialized" in log) if kind == "missing" else (
        "UNEXPECTED" in log or "not used" in log), log
    if kind == "extra":
        assert same_weights(model, env.drafter)
    assert torch.equal(greedy(env.target, env.prompt, NEW, assistant_model=model.eval()), env.reference)


def test_checkpoint_with_no_matching_key_raises(saved, tmp_path):
    folder = variant(saved, tmp_path, rewrite_weights(lambda sd: {"model." + k: v for k, v in sd.items()}))
    with pytest.raises((ValueError, RuntimeError, OSError)) as info:
        LOADERS["direct"](folder)
    assert "model.fc.weight" in str(info.value)


class WritesAFile:
    """A pickle payload: unpickling it calls `open(path, 'w')`, i.e. runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def bin_only(env: Env, payload=None) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        state = dict(env.drafter.state_dict())
        if payload is not None:
            state["payload"] = payload
        torch.save(state, folder / "pytorch_model.bin")

    return mutate


@pytest.mark.parametrize("loader", ["direct", "auto"])
def test_pytorch_bin_loads_weights_only(env, saved, tmp_path, loader):
    """A plain state-dict .bin loads (tensors only, weights_only unpickling); `use_safetensors=True` refuses it."""
    folder = variant(saved, tmp_path, bin_only(env))
    assert same_weights(LOADERS[loader](folder), env.drafter)
    with pytest.raises(OSError, match="model.safetensors"):
        LOADERS[loader](folder, use_safetensors=True)


@pytest.mark.parametrize("loader", ["direct", "auto"])
def test_pickle_payload_in_bin_is_never_executed(env, saved, tmp_path, loader):
    marker = tmp_path / "pwned"
    folder = variant(saved, tmp_path, bin_only(env, payload=WritesAFile(str(marker))))
    with pytest.raises(Exception) as info:  # UnpicklingError (5.x) or OSError wrapping it (4.57)
        LOADERS[loader](folder)
    assert not marker.exists(), "loading a .bin ran code from its pickle"
    assert type(info.value).__name__ in ("UnpicklingError", "OSError"), repr(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# Loading safety: no network, no evaluated config values
# ----------------------------------------------------------------------------------------------------------------------


def test_loading_remote_code_makes_no_network_call(env, saved, monkeypatch):
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network call to {address} during loading")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    model = AutoModel.from_pretrained(saved, trust_remote_code=True)
    assert not attempts, attempts
    assert type(model).__name__ == "DFlashDraftModel" and same_weights(model, env.drafter)


def test_modeling_files_evaluate_no_config_value():
    """No eval/exec/compile of strings, no pickle or torch.load, no network module in the remote code."""
    pattern = re.compile(r"(?<![\w.])(eval|exec|compile|__import__)\s*\(|\bpickle\b|torch\.load\b|\burllib\b|"
                         r"\brequests\b|\bsocket\b|\bsubprocess\b|os\.system")
    offending = []
    for path in sorted(MODELING.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                offending.append(f"{path.name}:{number}: {line.strip()}")
    assert not offending, offending
    assert len(list(MODELING.glob("*.py"))) >= 5
