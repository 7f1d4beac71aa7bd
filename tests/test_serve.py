"""`dflash-hf serve`: the real server in a subprocess on 127.0.0.1, driven through the `openai` client.

The served model is a tiny random Qwen3 saved (with a word-level tokenizer and a Jinja chat template) into a temp
folder; the drafter is `random:2`. Every greedy answer is compared with the target's own `generate` in this process.
The tokenizer marks only `<eos>` as special, so each generated token is a visible word and equal text means equal
tokens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from openai import OpenAI

from helpers import VOCAB, tiny_target

MAX_BATCH = 4
EOS = 2
CHAT_TEMPLATE = (
    "{%- for m in messages -%}{{ {'system': 'w4', 'user': 'w5', 'assistant': 'w6'}[m['role']] }} {{ m['content'] }} "
    "{% endfor -%}{%- if enable_thinking -%}w7 {% endif -%}{%- if add_generation_prompt -%}w6{%- endif -%}"
)
HI = [{"role": "user", "content": "w5"}]
PROMPTS = ["w10 w11 w12", "w40 w41", "w20 w21 w22 w23 w24 w25", "w60", "w33 w9 w71", "w88 w87 w86 w85",
           "w14 w52", "w30 w31 w32 w33 w34 w35 w36 w37 w38"]


def build_tokenizer():
    """Word-level fast tokenizer over the tiny vocabulary, offline; only `<eos>` is special, so decoded text shows
    every other token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class Reference:
    """The target alone, loaded from the served folder: greedy continuations and the texts the server must send."""

    def __init__(self, folder: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self._runs: dict[tuple, list[int]] = {}

    def chat_ids(self, messages, **template_kwargs) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **template_kwargs)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def greedy(self, ids: list[int], max_tokens: int) -> list[int]:
        """The target's own greedy continuation (eos included when reached), via transformers' generate. One run per
        prompt, at least 24 tokens long, serves every shorter budget: greedy decoding is prefix-consistent."""
        key = tuple(ids)
        run = self._runs.get(key)
        if run is None or (len(run) < max_tokens and EOS not in run):
            x = torch.tensor([ids])
            with torch.no_grad():
                out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                          max_new_tokens=max(max_tokens, 24), eos_token_id=EOS, pad_token_id=EOS)
            run = out[0, len(ids):].tolist()
            self._runs[key] = run[: run.index(EOS) + 1] if EOS in run else run
        return self._runs[key][:max_tokens]

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t != EOS], skip_special_tokens=True)

    def finish(self, tokens: list[int]) -> str:
        return "stop" if tokens and tokens[-1] == EOS else "length"


# ----------------------------------------------------------------------------------------------------------------------
# The server process
# ----------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a raw request; 4xx/5xx are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class ServerProcess:
    def __init__(self, folder: Path, log: Path, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dflash_hf", "serve", "--target", str(folder), "--port", str(self.port),
             "--host", "127.0.0.1", "--max-batch-size", str(MAX_BATCH), *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
        )

    def wait_healthy(self, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if http("GET", self.base + "/health", timeout=2)[0] == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not healthy after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def client(self) -> OpenAI:
        # max_retries=0: a lost or failed request must show up as an error, not be silently retried.
        return OpenAI(base_url=self.base + "/v1", api_key="EMPTY", max_retries=0, timeout=90)

    def metrics(self) -> dict:
        return http("GET", self.base + "/metrics.json")[1]

    def prometheus(self) -> tuple[str, dict]:
        """(Content-Type, {sample name with its labels: value}) of GET /metrics, parsed by prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as response:
            content_type, text = response.headers["Content-Type"], response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return content_type, samples

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_served")
    tiny_target("qwen3").save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def servers(folder, tmp_path_factory):
    """Both servers start at once (their start-up, mostly imports, overlaps): DFlash with an untrained 2-layer
    drafter, and `--no-drafter` (plain batched target.generate), which the SIGTERM test shuts down."""
    logs = tmp_path_factory.mktemp("logs")
    procs = {"dflash": ServerProcess(folder, logs / "dflash.log", "--drafter", "random:2"),
             "plain": ServerProcess(folder, logs / "plain.log", "--no-drafter", "--shutdown-timeout", "1")}
    try:
        for proc in procs.values():
            proc.wait_healthy()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["dflash"]


@pytest.fixture(scope="module")
def ref(folder) -> Reference:
    return Reference(folder)


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return server.client()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def dflash_of(obj) -> dict:
    return obj.model_extra["dflash"]


# ----------------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------------


def test_models_health_metrics(server, client, folder):
    models = client.models.list().data
    assert [m.id for m in models] == [folder.name]
    status, health = http("GET", server.base + "/health")
    assert status == 200 and health["status"] == "ok" and health["mode"] == "dflash"
    metrics = server.metrics()
    assert metrics["max_batch_size"] == MAX_BATCH and metrics["mode"] == "dflash"
    assert {"requests", "tokens", "mean_acceptance_length", "batches", "queue"} <= set(metrics)


def test_prometheus_metrics_count_what_was_sent(server, client, ref, folder):
    """GET /metrics is Prometheus text (0.0.4) that prometheus_client parses; its counters move by exactly the requests,
    prompt tokens and completion tokens sent here, and /metrics.json reports the same totals."""
    content_type, before = server.prometheus()
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type

    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    chat = client.chat.completions.create(model="m", messages=user(PROMPTS[0]), max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model="m", messages=user(PROMPTS[1]), max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    streamed_usage = [c.usage for c in stream if c.usage][0]
    text = client.completions.create(model="m", prompt=[PROMPTS[2], PROMPTS[3]], max_tokens=4, temperature=0)
    assert http("POST", server.base + "/v1/completions", b"{not json")[0] == 400
    prompt_tokens = (len(ref.chat_ids(user(PROMPTS[0]))) + len(ref.chat_ids(user(PROMPTS[1])))
                     + len(ref.text_ids(PROMPTS[2])) + len(ref.text_ids(PROMPTS[3])))
    completion_tokens = chat.usage.completion_tokens + streamed_usage.completion_tokens + text.usage.completion_tokens
    assert prompt_tokens == chat.usage.prompt_tokens + streamed_usage.prompt_tokens + text.usage.prompt_tokens

    content_type, after = server.prometheus()
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    assert value(delta, "dflash_requests_total", kind="chat", stream="false") == 1
    assert value(delta, "dflash_requests_total", kind="chat", stream="true") == 1
    assert value(delta, "dflash_requests_total", kind="completions", stream="false") == 1
    assert value(delta, "dflash_requests_total", kind="completions", stream="true") == 0
    assert value(delta, "dflash_request_errors_total", status="400") == 1
    assert value(delta, "dflash_prompt_tokens_total") == prompt_tokens
    assert value(delta, "dflash_completion_tokens_total") == completion_tokens > 0
    assert value(delta, "dflash_generated_tokens_total") >= completion_tokens
    assert value(delta, "dflash_time_to_first_token_seconds_count") == 4  # one per row: 2 chats, 2 prompts
    assert value(delta, "dflash_queue_wait_seconds_count") == 4
    assert value(delta, "dflash_batch_size_count") >= 2
    steps = value(delta, "dflash_acceptance_length_count")
    assert steps > 0 and value(delta, "dflash_acceptance_length_bucket", le="+Inf") == steps
    assert value(delta, "dflash_acceptance_length_sum") >= steps
    [info] = [dict(labels) for name, labels in after if name == "dflash_server_info"]
    assert info["model"] == folder.name and info["mode"] == "dflash"
    assert value(after, "dflash_max_batch_size") == MAX_BATCH
    assert value(after, "dflash_requests_running") == 0 and value(after, "dflash_requests_waiting") == 0

    metrics = server.metrics()
    assert metrics["requests"]["total"] == sum(v for (name, _), v in after.items() if name == "dflash_requests_total")
    assert metrics["tokens"]["prompt"] == value(after, "dflash_prompt_tokens_total")
    assert metrics["tokens"]["completion"] == value(after, "dflash_completion_tokens_total")
    assert metrics["verify_steps"] == value(after, "dflash_acceptance_length_count")


def test_chat_greedy_equals_target_and_model_card_snippet(client, ref):
    # The DFlash model card's client call, unchanged but for the size of the answer.
    messages = [{"role": "system", "content": "w9 w8"}, {"role": "user", "content": "w10 w11 w12"}]
    response = client.chat.completions.create(
        model="z-lab/any-name-is-accepted", messages=messages, max_tokens=12, temperature=0.0,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    ids = ref.chat_ids(messages, enable_thinking=True)
    assert ids[-2:] == [7, 6]  # the template saw enable_thinking
    tokens = ref.greedy(ids, 12)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text(tokens)
    assert choice.finish_reason == ref.finish(tokens)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == len(tokens)
    assert response.usage.total_tokens == len(ids) + len(tokens)
    dflash = dflash_of(response)
    assert sum(dflash["acceptance_lengths"]) + 1 == len(tokens)  # prefill token + one entry per verify step
    assert dflash["mean_acceptance_length"] >= 1.0

    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    assert plain.usage.prompt_tokens == len(ids) - 1  # no enable_thinking, no w7
    assert plain.choices[0].message.content == ref.text(ref.greedy(ref.chat_ids(messages), 12))


def test_chat_streaming_equals_target(client, ref):
    messages = user("w40 w41")
    tokens = ref.greedy(ref.chat_ids(messages), 16)
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text(tokens)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == ref.finish(tokens)
    assert sum(dflash_of(finals[0])["acceptance_lengths"]) + 1 == len(tokens)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completions_text_list_and_token_prompts(client, ref):
    one = client.completions.create(model="m", prompt="w20 w21 w22", max_tokens=10, temperature=0)
    tokens = ref.greedy(ref.text_ids("w20 w21 w22"), 10)
    assert one.object == "text_completion"
    assert one.choices[0].text == ref.text(tokens) and one.usage.completion_tokens == len(tokens)

    prompts = ["w60", "w33 w9 w71"]
    many = client.completions.create(model="m", prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    for choice, prompt in zip(many.choices, prompts):
        assert choice.text == ref.text(ref.greedy(ref.text_ids(prompt), 8))
    assert many.usage.prompt_tokens == sum(len(ref.text_ids(p)) for p in prompts)

    ids = [50, 51, 52, 53]
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=6, temperature=0, stream=True)
    pieces = list(by_ids)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == ref.text(ref.greedy(ids, 6))
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text(client, ref):
    messages = user("w20 w21 w22 w23 w24 w25")
    tokens = ref.greedy(ref.chat_ids(messages), 24)
    full = ref.text(tokens)
    words = full.split()
    assert len(words) >= 4, f"the tiny model answered too little to test stop strings: {full!r}"
    stop = words[2]
    cut = full[: full.index(stop)]
    used = next(k for k in range(1, len(tokens) + 1) if stop in ref.text(tokens[:k]))
    response = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0,
                                              stop=[stop, "never-appears"])
    assert response.choices[0].message.content == cut
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == used
    # A stop string spanning two tokens: the first one must be held back until the second shows it is a stop.
    pair = f"{words[1]} {words[2]}"
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0, stop=pair,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.index(pair)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model="m", messages=user("w14 w52"), max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert dflash_of(first)["batch_size"] == 1  # a seeded request runs alone


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_torch_cannot_take_is_a_400_not_a_hang(client, seed):
    with pytest.raises(openai.BadRequestError, match="seed must be an integer"):
        client.with_options(timeout=30, max_retries=0).chat.completions.create(
            model="m", messages=user("w14"), max_tokens=3, temperature=0.7, seed=seed)
    response = client.chat.completions.create(model="m", messages=user("w14"), max_tokens=3, temperature=0.7,
                                              seed=2**64 - 1)  # the largest seed torch takes works
    assert response.usage.completion_tokens <= 3


def test_sampling_settings_do_not_pile_up_decoder_workspaces(server, client):
    from dflash_hf.serve import MAX_SAMPLING_WORKSPACES

    greedy = server.metrics()["decoder_workspaces"]
    for k in range(MAX_SAMPLING_WORKSPACES + 2):
        response = client.chat.completions.create(model="m", messages=user("w14"), max_tokens=2,
                                                  temperature=0.5 + 0.1 * k)
        assert response.usage.completion_tokens <= 2
    assert server.metrics()["decoder_workspaces"] <= greedy + MAX_SAMPLING_WORKSPACES


def _stream_text(client, messages, max_tokens, out: dict, key):
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True)
    out[key] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_requests_arriving_during_a_batch_join_the_next_one(server, client, ref):
    """While a long request runs, 3 greedy and 1 sampled request queue; the greedy ones share the next batch, the
    sampled one runs in its own; every greedy answer equals the target's."""
    results: dict = {}
    blocker_messages = user("w88 w87 w86 w85")
    blocker = threading.Thread(target=_stream_text, args=(client, blocker_messages, 80, results, "blocker"))
    blocker.start()
    deadline = time.monotonic() + 60
    while http("GET", server.base + "/health")[1]["running_batch"] == 0:
        assert time.monotonic() < deadline and blocker.is_alive(), "the long request never started"
        time.sleep(0.02)

    jobs = [(PROMPTS[0], 6, 0.0), (PROMPTS[1], 9, 0.0), (PROMPTS[2], 4, 0.0), (PROMPTS[3], 6, 0.7)]
    barrier = threading.Barrier(len(jobs))

    def ask(i, prompt, max_tokens, temperature):
        barrier.wait()
        results[i] = client.chat.completions.create(model="m", messages=user(prompt), max_tokens=max_tokens,
                                                    temperature=temperature)

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in [*threads, blocker]:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in [*threads, blocker])
    assert results["blocker"] == ref.text(ref.greedy(ref.chat_ids(blocker_messages), 80))
    for i, (prompt, max_tokens, temperature) in enumerate(jobs):
        response = results[i]
        dflash = dflash_of(response)
        assert dflash["queue_seconds"] > 0
        if temperature == 0:
            assert dflash["batch_size"] == 3, dflash
            assert response.choices[0].message.content == ref.text(ref.greedy(ref.chat_ids(user(prompt)), max_tokens))
        else:
            assert dflash["batch_size"] == 1, dflash
            assert response.usage.completion_tokens <= max_tokens
    assert server.metrics()["batches"]["sizes"].get("3", 0) >= 1


def test_client_disconnect_mid_stream_keeps_server_healthy(server, client, ref):
    before = server.metrics()["batches"]["aborted_live_generations"]
    stream = client.chat.completions.create(model="m", messages=user("w30 w31"), max_tokens=400, temperature=0,
                                            stream=True)
    iterator = iter(stream)
    for _ in range(3):
        next(iterator)
    stream.close()
    deadline = time.monotonic() + 30
    while server.metrics()["batches"]["aborted_live_generations"] == before:
        assert time.monotonic() < deadline, "the abandoned generation was not stopped"
        time.sleep(0.05)
    assert server.metrics()["requests"]["cancelled"] >= 1
    assert http("GET", server.base + "/health")[0] == 200
    response = client.chat.completions.create(model="m", messages=user("w60"), max_tokens=7, temperature=0)
    assert response.choices[0].message.content == ref.text(ref.greedy(ref.chat_ids(user("w60")), 7))


@pytest.mark.parametrize(
    "path, body, param, code",
    [
        ("/v1/chat/completions", b"{not json", None, "invalid_json"),
        ("/v1/chat/completions", b"[1, 2]", None, "invalid_json"),
        ("/v1/chat/completions", {"model": "m", "max_tokens": 4}, "messages", "missing_field"),
        ("/v1/chat/completions", {"messages": []}, "messages", None),
        ("/v1/chat/completions", {"messages": "w5"}, "messages", "invalid_type"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 0}, "max_tokens", None),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": "5"}, "max_tokens",
         "invalid_type"),
        ("/v1/chat/completions", {"messages": HI, "temperature": "hot"},
         "temperature", "invalid_type"),
        ("/v1/chat/completions", {"messages": HI, "temperature": -1}, "temperature",
         None),
        ("/v1/chat/completions", {"messages": HI, "top_p": 0}, "top_p", None),
        ("/v1/chat/completions", {"messages": HI, "n": 2}, "n", None),
        ("/v1/chat/completions", {"messages": HI, "stop": [""]}, "stop", None),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 600}, "messages",
         "context_length_exceeded"),
        ("/v1/completions", {"prompt": " ".join(["w9"] * 520), "max_tokens": 1}, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"prompt": [5, 999], "max_tokens": 1}, "prompt", None),
        ("/v1/completions", {"max_tokens": 3}, "prompt", "missing_field"),
    ],
)
def test_malformed_requests_get_openai_errors(server, path, body, param, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, reply = http("POST", server.base + path, raw)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 10
    assert error["param"] == param and error["code"] == code


@pytest.mark.parametrize("body, needle", [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone UTF-16 surrogate"),
    (b'{"prompt": "w9 \\udfff", "max_tokens": 2}', "lone UTF-16 surrogate"),
    (b"[" * 100_000, "nested more than 32 levels"),
    (b'{"messages": ' + b"[" * 500 + b"]" * 500 + b"}", "nested more than 32 levels"),
])
def test_hostile_json_bodies_get_a_400_naming_the_problem(server, body, needle):
    """Valid JSON that is not valid text (a lone surrogate escape) and bodies nested absurdly deep used to reach the
    tokenizer or the parser's recursion limit and come back as 500s."""
    path = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
    status, reply = http("POST", server.base + path, body)
    assert status == 400, reply
    assert reply["error"]["code"] == "invalid_json" and needle in reply["error"]["message"], reply
    assert http("GET", server.base + "/health")[0] == 200


def test_unknown_routes_and_client_errors(server, client):
    status, reply = http("GET", server.base + "/v1/nothing")
    assert status == 404 and "error" in reply
    status, reply = http("GET", server.base + "/v1/chat/completions")
    assert status == 405 and reply["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=user("w5"), max_tokens=0)
    assert info.value.status_code == 400 and "max_tokens" in str(info.value)
    assert http("GET", server.base + "/health")[0] == 200


def test_load_40_requests_from_8_threads(server, client, ref):
    """Bounded load: nothing lost, nothing corrupted, all within the time limit."""
    jobs = []
    for i in range(40):
        prompt, max_tokens = PROMPTS[i % len(PROMPTS)], 3 + (i % 4) * 2
        kind = ("chat", "chat-stream", "text", "text-stream")[i % 4]
        jobs.append((i, kind, prompt, max_tokens))
    expected = {}
    for i, kind, prompt, max_tokens in jobs:
        ids = ref.chat_ids(user(prompt)) if kind.startswith("chat") else ref.text_ids(prompt)
        expected[i] = ref.text(ref.greedy(ids, max_tokens))
    before = server.metrics()
    got: dict = {}
    errors: list = []
    lock = threading.Lock()

    def worker(my_jobs):
        for i, kind, prompt, max_tokens in my_jobs:
            try:
                if kind == "chat":
                    text = client.chat.completions.create(model="m", messages=user(prompt), max_tokens=max_tokens,
                                                          temperature=0).choices[0].message.content
                elif kind == "chat-stream":
                    out: dict = {}
                    _stream_text(client, user(prompt), max_tokens, out, "t")
                    text = out["t"]
                elif kind == "text":
                    text = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0).choices[0].text
                else:
                    stream = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                       stream=True)
                    text = "".join(c.choices[0].text for c in stream if c.choices)
                with lock:
                    got[i] = text
            except Exception as error:  # noqa: BLE001 - collected and reported below
                with lock:
                    errors.append((i, repr(error)))

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(jobs[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, 90 - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    assert not any(t.is_alive() for t in threads), f"load test still running after {elapsed:.0f} s"
    assert not errors, errors
    assert sorted(got) == list(range(40))
    wrong = {i: (got[i], expected[i]) for i in got if got[i] != expected[i]}
    assert not wrong, wrong
    after = server.metrics()
    assert after["requests"]["total"] - before["requests"]["total"] == 40
    batches = after["batches"]["count"] - before["batches"]["count"]
    assert batches < 40, "no two requests were ever batched together"
    assert after["queue"]["max_wait_seconds"] > 0


def test_sigterm_shuts_down_cleanly_with_a_request_in_flight(servers, ref):
    """--no-drafter mode (plain batched target.generate) answers exactly; then SIGTERM during a long stream: the
    process exits 0 within a few seconds."""
    proc = servers["plain"]
    client = proc.client()
    response = client.chat.completions.create(model="m", messages=user("w40 w41"), max_tokens=10, temperature=0)
    assert response.choices[0].message.content == ref.text(ref.greedy(ref.chat_ids(user("w40 w41")), 10))
    assert dflash_of(response)["mean_acceptance_length"] is None
    assert proc.metrics()["mode"] == "plain"

    stream = client.chat.completions.create(model="m", messages=user("w30 w31"), max_tokens=450, temperature=0,
                                            stream=True)
    next(iter(stream))
    assert http("GET", proc.base + "/health")[1]["running_batch"] == 1
    start = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    code = proc.proc.wait(timeout=30)
    elapsed = time.monotonic() - start
    stream.close()
    assert code == 0, proc.log.read_text()[-2000:]
    assert elapsed < 8, f"shutdown took {elapsed:.1f} s"


def test_every_row_of_a_batch_streams_while_its_batch_runs(ref):
    """The engine hands each row of a batch its tokens step by step (the decoder's `on_step`), not when the batch
    ends: every chunk is posted while `decoder.generate` is still running, the chunks are the target's answer, and a
    row that is done (here: the 5-token one) gets its end while the longer rows still run."""
    from dflash_hf.serve import Engine, Row, SamplingParams, random_drafter

    engine = Engine(ref.model, ref.tokenizer, random_drafter(ref.model, ref.tokenizer, 1), max_batch_size=4)
    running = False
    posts = []
    generate = engine.decoder.generate

    def tracked(*args, **kwargs):
        nonlocal running
        running = True
        try:
            return generate(*args, **kwargs)
        finally:
            running = False

    engine.decoder.generate = tracked
    engine._post = lambda row, item: posts.append((running, row, item))
    budgets = {PROMPTS[0]: 12, PROMPTS[1]: 5, PROMPTS[2]: 9}
    rows = [Row(ref.chat_ids(user(p)), SamplingParams(max_tokens=m, temperature=0.0), stream=True, queue=None)
            for p, m in budgets.items()]
    stats = engine._run_batch(rows)
    assert stats["rows"] == 3 and stats["padded"] == 4  # a bucket of 4: one filler row, never posted
    for row, (prompt, max_tokens) in zip(rows, budgets.items()):
        mine = [(during, item) for during, r, item in posts if r is row]
        assert mine[-1][1] == ("end", None) and [item for _, item in mine].count(("end", None)) == 1
        chunks = [payload for during, (kind, payload) in mine if kind == "chunk"]
        assert len(chunks) > 1 and all(during for during, (kind, _) in mine if kind == "chunk")
        assert [t for chunk in chunks for t in chunk] == ref.greedy(ref.chat_ids(user(prompt)), max_tokens)
    lengths = [len(ref.greedy(ref.chat_ids(user(p)), m)) for p, m in budgets.items()]
    short, longest = rows[1], rows[lengths.index(max(lengths))]
    assert lengths[1] == 5 < max(lengths)
    end_of_short = next(k for k, (_, r, item) in enumerate(posts) if r is short and item[0] == "end")
    last_of_longest = max(k for k, (_, r, item) in enumerate(posts) if r is longest and item[0] == "chunk")
    assert posts[end_of_short][0] and end_of_short < last_of_longest  # answered while the batch still ran
    assert {id(r) for _, r, _ in posts} == {id(r) for r in rows}  # the filler row posts nothing


def test_each_app_has_its_own_prometheus_registry(ref):
    """Two apps in one process: each /metrics shows its own engine's figures, and nothing lands in prometheus_client's
    process-wide default registry."""
    from fastapi.testclient import TestClient
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families

    from dflash_hf.serve import Engine, create_app

    def families(response) -> dict:
        return {f.name: f for f in text_string_to_metric_families(response.text)}

    apps = [create_app(Engine(ref.model, ref.tokenizer, None, max_batch_size=2, model_name=name))
            for name in ("first", "second")]
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        reply = first.post("/v1/completions", json={"prompt": "w10 w11", "max_tokens": 3, "temperature": 0})
        assert reply.status_code == 200, reply.text
        ones, twos = families(first.get("/metrics")), families(second.get("/metrics"))
        assert ones["dflash_server_info"].samples[0].labels["model"] == "first"
        assert twos["dflash_server_info"].samples[0].labels["model"] == "second"
        requests = {(s.labels["kind"], s.labels["stream"]): s.value for s in ones["dflash_requests"].samples
                    if s.name.endswith("_total")}
        assert requests[("completions", "false")] == 1 and sum(requests.values()) == 1
        assert sum(s.value for s in twos["dflash_requests"].samples if s.name.endswith("_total")) == 0
        assert first.get("/metrics.json").json()["requests"]["total"] == 1
    assert not [f.name for f in REGISTRY.collect() if f.name.startswith("dflash")]
