"""Load generator for `dflash-hf serve`: throughput and time to first token at several client concurrencies, for the
server with its drafter (DFlash) and the same server with `--no-drafter` (plain batched `target.generate`).

By default it starts each server itself (a subprocess on 127.0.0.1, a free port), warms it up, runs every concurrency
level, reads /metrics.json, and stops it with SIGTERM. `--url` benchmarks a server that is already running instead.

Each client is a thread that sends streaming chat requests (temperature 0, fixed `max_tokens`) back to back; a level
ends after `--requests-per-client` requests per client or `--level-seconds`, whichever comes first (a request in
flight then still completes). Time to first token (TTFT) is measured to the first chunk with text. Only the Python
standard library is used on the client side.

    python benchmarks/serve_bench.py --target smollm2 --drafter bundled --dtype bfloat16 --device cuda
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --concurrency 1 8

Writes `<out>/serve_bench.json` and `<out>/serve_bench.md`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from short_prompts import PROMPTS


# ----------------------------------------------------------------------------------------------------------------------
# Client side
# ----------------------------------------------------------------------------------------------------------------------


def _connection(base: str, timeout: float) -> http.client.HTTPConnection:
    url = urlparse(base)
    return http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)


def get_json(base: str, path: str, timeout: float = 10) -> tuple[int, dict]:
    conn = _connection(base, timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def stream_chat(base: str, prompt: str, max_tokens: int, prompts_are_raw: bool, timeout: float = 600) -> dict:
    """One streaming request; returns latency, TTFT, completion tokens (from the usage chunk) and the text."""
    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if prompts_are_raw:
        path, body["prompt"] = "/v1/completions", prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    conn = _connection(base, timeout)
    start = time.perf_counter()
    ttft, text, usage, error = None, [], None, None
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {response.read()[:300]!r}"}
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"].get("message")
                break
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    text.append(piece)
    except OSError as exc:
        error = repr(exc)
    finally:
        conn.close()
    latency = time.perf_counter() - start
    if error:
        return {"error": error}
    return {"latency": latency, "ttft": ttft if ttft is not None else latency,
            "completion_tokens": (usage or {}).get("completion_tokens", 0), "text": "".join(text)}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run_level(base: str, concurrency: int, requests_per_client: int, level_seconds: float, max_tokens: int,
              raw: bool) -> dict:
    """`concurrency` client threads sending requests back to back; bounded by count and by time."""
    results: list[dict] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + level_seconds

    def client(index: int):
        for k in range(requests_per_client):
            if time.perf_counter() >= deadline:
                return
            outcome = stream_chat(base, PROMPTS[(index + k * concurrency) % len(PROMPTS)], max_tokens, raw)
            with lock:
                results.append(outcome)

    before = get_json(base, "/metrics.json")[1]
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = get_json(base, "/metrics.json")[1]

    ok = [r for r in results if "error" not in r]
    tokens = sum(r["completion_tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok]
    latencies = [r["latency"] for r in ok]
    sizes_before = before["batches"]["sizes"]
    sizes = {k: v - sizes_before.get(k, 0) for k, v in after["batches"]["sizes"].items() if v - sizes_before.get(k, 0)}
    n_batches = sum(sizes.values())
    steps = after["verify_steps"] - before["verify_steps"]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": [r["error"] for r in results if "error" in r][:5],
        "error_count": len(results) - len(ok),
        "wall_seconds": round(wall, 3),
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else None,
        "requests_per_second": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_mean": round(statistics.fmean(ttfts), 4) if ttfts else None,
        "ttft_p50": _round(_percentile(ttfts, 0.5)),
        "ttft_p90": _round(_percentile(ttfts, 0.9)),
        "latency_p50": _round(_percentile(latencies, 0.5)),
        "latency_p90": _round(_percentile(latencies, 0.9)),
        "server_batch_sizes": sizes,
        "server_mean_batch_size": (round(sum(int(k) * v for k, v in sizes.items()) / n_batches, 2)
                                   if n_batches else None),
        "server_mean_acceptance_length": (
            round((after["mean_acceptance_length"] * after["verify_steps"]
                   - (before["mean_acceptance_length"] or 0) * before["verify_steps"]) / steps, 3)
            if steps and after["mean_acceptance_length"] is not None else None),
        "texts_sample": [r["text"][:80] for r in ok[:2]],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# ----------------------------------------------------------------------------------------------------------------------
# Server side
# ----------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def convert_gguf(gguf: Path, folder: Path) -> Path:
    """A GGUF model (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) -> a bf16 safetensors folder with its tokenizer (once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(config))
    model.load_state_dict(quantised.state_dict())
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Server:
    def __init__(self, args, mode: str, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "dflash_hf", "serve", "--target", args.target, "--port", str(self.port),
                   "--max-batch-size", str(args.max_batch_size or max(args.concurrency)), "--dtype", args.dtype]
        if args.device:
            command += ["--device", args.device]
        if args.max_model_len:
            command += ["--max-model-len", str(args.max_model_len)]
        if args.compile:
            command.append("--compile")
        command += ["--no-drafter"] if mode == "plain" else ["--drafter", args.drafter]
        self.command = command
        self.proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait(self, timeout: float) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if get_json(self.base, "/health", timeout=2)[0] == 200:
                    return time.perf_counter() - start
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> float:
        start = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        "# dflash-hf serve: throughput and time to first token",
        "",
        f"Target `{config['target']}`, drafter `{config['drafter']}`, dtype {config['dtype']}, device "
        f"{config['device']}; {config['max_tokens']} new tokens per request, greedy, streaming requests; levels "
        f"bounded to {config['requests_per_client']} requests per client or {config['level_seconds']} s. "
        f"Machine: {report['machine']}.",
        "",
        "Requests that arrive while a batch runs wait for the next batch. With the drafter every row streams live, one "
        "chunk per verify step (TTFT = queueing + prefill); without it (plain `target.generate`) a row of a batch of "
        "two or more arrives when its batch ends.",
        "",
        "| mode | clients | requests | errors | tokens | wall s | tokens/s | req/s | TTFT p50 s | TTFT p90 s | "
        "latency p50 s | mean batch | tau |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, run in report["modes"].items():
        if "error" in run:
            lines.append(f"| {mode} | failed: {run['error'][:200]} |")
            continue
        for level in run["levels"]:
            cells = [mode] + [level[k] for k in (
                "concurrency", "requests", "error_count", "completion_tokens", "wall_seconds", "tokens_per_second",
                "requests_per_second", "ttft_p50", "ttft_p90", "latency_p50", "server_mean_batch_size",
                "server_mean_acceptance_length")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if {"dflash", "plain"} <= set(report["modes"]) and all("levels" in r for r in report["modes"].values()):
        lines += ["", "| clients | DFlash tokens/s | plain tokens/s | speedup |", "|---|---|---|---|"]
        plain = {lv["concurrency"]: lv for lv in report["modes"]["plain"]["levels"]}
        for level in report["modes"]["dflash"]["levels"]:
            other = plain.get(level["concurrency"])
            if other and other["tokens_per_second"] and level["tokens_per_second"]:
                ratio = level["tokens_per_second"] / other["tokens_per_second"]
                lines.append(f"| {level['concurrency']} | {level['tokens_per_second']} | "
                             f"{other['tokens_per_second']} | {ratio:.2f}x |")
    for mode, run in report["modes"].items():
        if "startup_seconds" in run:
            shutdown = run.get("shutdown_seconds", float("nan"))
            lines.append(f"\n{mode}: server start {run['startup_seconds']:.1f} s (load + warm-up), shutdown after "
                         f"SIGTERM {shutdown:.1f} s, exit code {run.get('exit_code')}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="benchmark this running server (one mode) instead of starting any")
    parser.add_argument("--target", default="smollm2", help="served target (smollm2 or a folder)")
    parser.add_argument("--gguf", default=None, help="convert this GGUF to a folder (--model-dir) first, serve that")
    parser.add_argument("--model-dir", default="/tmp/serve_bench_model", help="where --gguf is converted to")
    parser.add_argument("--drafter", default="bundled", help="drafter for the DFlash mode (folder, bundled, random:N)")
    parser.add_argument("--modes", nargs="+", default=["dflash", "plain"], choices=["dflash", "plain"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", action="store_true", help="pass --compile to the DFlash server")
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: the largest concurrency")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--level-seconds", type=float, default=25.0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--raw-prompts", action="store_true", help="use /v1/completions instead of chat")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gguf:
        args.target = str(convert_gguf(Path(args.gguf), Path(args.model_dir)))
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "url"} | {"url": args.url},
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
        "modes": {},
    }
    try:
        import torch

        if torch.cuda.is_available():
            report["machine"] += f", {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass

    modes = ["server"] if args.url else args.modes
    for mode in modes:
        server = None
        run: dict = {}
        try:
            if args.url:
                base = args.url.rstrip("/")
            else:
                server = Server(args, mode, out / f"serve_bench_{mode}.log")
                run["command"] = " ".join(server.command)
                run["startup_seconds"] = server.wait(args.startup_timeout)
                base = server.base
            run["server"] = get_json(base, "/v1/models")[1]["data"][0]
            stream_chat(base, PROMPTS[0], 8, args.raw_prompts)  # first-request costs out of the measurement
            run["levels"] = []
            for concurrency in args.concurrency:
                level = run_level(base, concurrency, args.requests_per_client, args.level_seconds, args.max_tokens,
                                  args.raw_prompts)
                run["levels"].append(level)
                print(f"[{mode}] {concurrency:>3} clients: {level['requests']} requests, {level['tokens_per_second']} "
                      f"tok/s, TTFT p50 {level['ttft_p50']} s, mean batch {level['server_mean_batch_size']}, "
                      f"errors {level['error_count']}", flush=True)
            run["final_metrics"] = get_json(base, "/metrics.json")[1]
        except Exception as error:  # noqa: BLE001 - recorded; the other mode still runs
            run["error"] = f"{type(error).__name__}: {error}"
            print(f"[{mode}] failed: {run['error']}", file=sys.stderr, flush=True)
        finally:
            if server is not None:
                run["shutdown_seconds"] = server.stop()
                run["exit_code"] = server.proc.returncode
        report["modes"][mode] = run

    (out / "serve_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serve_bench.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all("error" not in r and not any(lv["error_count"] for lv in r["levels"])
                    for r in report["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
