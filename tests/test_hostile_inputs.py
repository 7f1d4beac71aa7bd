"""Hostile and broken input to the `dflash-hf` commands, the drafter config and the server: each ends in one clear
line (CLI: `dflash-hf <cmd>: error: ...`, no traceback) or an OpenAI-style 4xx/503 body, never a hang, a long run or a
silently wrong result. Real subprocesses, real files, tiny random models built in code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_main, tiny_drafter, tiny_target
from test_cli import word_tokenizer


def cli(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The console entry point in a subprocess with stdin left open (an interactive prompt would wait on it, so a
    regression times out here instead of passing on EOF)."""
    base = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="0")
    base.pop("HF_TOKEN", None)
    base.update(env or {})
    with subprocess.Popen([sys.executable, "-m", "dflash_hf", *map(str, args)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"dflash-hf {' '.join(map(str, args))} still running after {timeout} s:\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line_error(result: subprocess.CompletedProcess, command: str, code: int = 2) -> str:
    """The single error line of a failed command (asserts the exit code and that no traceback was printed)."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"dflash-hf {command}: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    target = tiny_target()
    target.save_pretrained(tmp / "target")
    word_tokenizer().save_pretrained(tmp / "target")
    tiny_drafter(target).save_pretrained(tmp / "drafter")
    return {"target": tmp / "target", "drafter": tmp / "drafter"}


# ----------------------------------------------------------------------------------------------------------------------
# Argument values checked at parse time
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("value", ["10000000000000000000000000", str(2**64), str(-(2**63) - 1)])
def test_a_seed_torch_cannot_take_is_refused_at_parse_time(command, value, capsys):
    extra = ["--prompt", "w9"] if command == "generate" else []
    code, _, err = run_main([command, "--seed", value, *extra], capsys)
    assert code == 2
    assert f"argument --seed: must be an integer in [{-(2**63)}, {2**64 - 1}]" in err and f"got {value}" in err


def test_the_largest_and_smallest_seeds_torch_takes_parse():
    from dflash_hf.cli import build_parser

    for value in (2**64 - 1, -(2**63)):
        args = build_parser().parse_args(["generate", "--prompt", "w9", "--seed", str(value)])
        assert args.seed == value


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(command, value, capsys):
    extra = ["--prompt", "w9"] if command == "generate" else []
    code, _, err = run_main([command, "--temperature", value, *extra], capsys)
    assert code == 2
    assert "argument --temperature: must be a finite number >= 0 (0 = greedy), got" in err


# ----------------------------------------------------------------------------------------------------------------------
# Unusable folders and files: one line, exit 2
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(folders, tmp_path_factory) -> dict[str, Path]:
    """A target folder without weights, a drafter whose model.safetensors is cut to its first 100 bytes, a file."""
    tmp = tmp_path_factory.mktemp("broken")
    no_weights = tmp / "no_weights"
    no_weights.mkdir()
    for path in folders["target"].iterdir():
        if path.suffix != ".safetensors":
            (no_weights / path.name).write_bytes(path.read_bytes())
    corrupt = tmp / "corrupt_drafter"
    corrupt.mkdir()
    (corrupt / "config.json").write_bytes((folders["drafter"] / "config.json").read_bytes())
    (corrupt / "model.safetensors").write_bytes((folders["drafter"] / "model.safetensors").read_bytes()[:100])
    (tmp / "a_file").write_text("not a folder\n")
    return {"no_weights": no_weights, "corrupt": corrupt, "file": tmp / "a_file", "tmp": tmp}


@pytest.mark.parametrize("command", ["generate", "make-data"])
def test_a_target_folder_without_weights_is_one_line(command, folders, broken):
    args = (["--drafter", folders["drafter"], "--prompt", "w9"] if command == "generate"
            else ["--output", broken["tmp"] / "data.jsonl", "--device", "cpu"])
    line = one_line_error(cli(command, "--target", broken["no_weights"], *args), command)
    assert str(broken["no_weights"]) in line and "model.safetensors" in line and "save_pretrained" in line


def test_a_corrupt_drafter_is_one_line(folders, broken):
    line = one_line_error(cli("generate", "--target", folders["target"], "--drafter", broken["corrupt"],
                              "--prompt", "w9"), "generate")
    assert str(broken["corrupt"]) in line and "download it again" in line


def test_convert_of_a_corrupt_safetensors_file_is_one_line(broken, tmp_path):
    line = one_line_error(cli("convert", broken["corrupt"], "--out", tmp_path / "out"), "convert")
    assert f"{broken['corrupt'] / 'model.safetensors'} is not a readable safetensors file" in line
    assert not (tmp_path / "out").exists()


def test_export_out_under_a_file_is_one_line(folders, broken):
    out = broken["file"] / "sub"
    line = one_line_error(cli("export", folders["drafter"], "--target", folders["target"], "--out", out), "export")
    assert f"--out {out} lies under {broken['file']}, which is a file" in line
    assert broken["file"].read_text() == "not a folder\n"


# ----------------------------------------------------------------------------------------------------------------------
# --push: refused before writing when it cannot happen; a failed upload is one line, exit 1
# ----------------------------------------------------------------------------------------------------------------------


def test_push_while_offline_is_refused_before_anything_is_written(folders, tmp_path):
    out = tmp_path / "export"
    result = cli("export", folders["drafter"], "--target", folders["target"], "--out", out, "--push", "me/tiny",
                 env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token", "HF_HOME": str(tmp_path / "hf")})
    line = one_line_error(result, "export")
    assert "HF_HUB_OFFLINE" in line and "drop --push" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("token_from", ["HF_TOKEN", "saved login"])
def test_push_that_cannot_reach_the_hub_is_one_line_and_keeps_the_folder(token_from, folders, tmp_path):
    """No network here: the Hub endpoint is a local port nobody listens on, so the upload is refused at once. The
    token comes from HF_TOKEN or, as huggingface_hub reads it, from the login saved under HF_HOME."""
    from test_serve import free_port

    home = tmp_path / "hf_home"
    home.mkdir()
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(home),
           "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    if token_from == "HF_TOKEN":
        env["HF_TOKEN"] = "hf_not_a_real_token"
    else:
        (home / "token").write_text("hf_not_a_real_token\n")
    out = tmp_path / "export"
    result = cli("export", folders["drafter"], "--target", folders["target"], "--out", out, "--push", "me/tiny",
                 env=env, timeout=120)
    line = one_line_error(result, "export", code=1)
    assert f"uploading {out} to https://huggingface.co/me/tiny failed" in line and "--overwrite" in line
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Hostile drafter config.json: refused by name before anything is built
# ----------------------------------------------------------------------------------------------------------------------


def _drafter_with_config(folders, folder: Path, edit) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((folders["drafter"] / "model.safetensors").read_bytes())
    config = json.loads((folders["drafter"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    return folder


def _set(**changes):
    def edit(config):
        config.pop("layer_types", None)  # else transformers' own layer_types length check would answer first
        config.update(changes)
        config["dflash_config"].update({k: v for k, v in changes.items() if k in config["dflash_config"]})
        return config
    return edit


@pytest.mark.parametrize("name, edit, needles", [
    ("block_size", _set(block_size=200000), ("block_size 200000", "outside 2..1024")),
    ("num_hidden_layers", _set(num_hidden_layers=200000), ("num_hidden_layers 200000", "outside 1..256")),
    ("mask_token_id", _set(mask_token_id="<mask>"), ("mask_token_id must be an integer", "'<mask>' (str)")),
    ("json_list", lambda config: [config], ("config.json holds a JSON list, not an object",)),
])
def test_a_hostile_drafter_config_is_refused_quickly_and_by_name(name, edit, needles, folders, tmp_path):
    drafter = _drafter_with_config(folders, tmp_path / name, edit)
    # Before the bounds, 200000 layers took minutes to build; 120 s includes a loaded machine's start-up.
    result = cli("generate", "--target", folders["target"], "--drafter", drafter, "--prompt", "w9", timeout=120)
    line = one_line_error(result, "generate")
    assert all(needle in line for needle in needles), line


@pytest.mark.parametrize("command", ["generate", "make-data", "bench"])
def test_a_drafter_given_as_target_is_refused_not_prompted(command, folders, tmp_path):
    """A drafter folder's config names remote code; loading it as the target used to stop at transformers'
    interactive trust-remote-code question (stdin stays open here, so a regression waits and times out)."""
    args = {"generate": ["--drafter", folders["drafter"], "--prompt", "w9"],
            "make-data": ["--output", tmp_path / "data.jsonl", "--device", "cpu"],
            "bench": ["--drafter", folders["drafter"], "--device", "cpu", "--results-dir", tmp_path]}[command]
    line = one_line_error(cli(command, "--target", folders["drafter"], *args, timeout=90), command)
    assert f"--target {folders['drafter']} is a DFlash drafter, not a target model" in line
    assert f"--drafter {folders['drafter']}" in line


# ----------------------------------------------------------------------------------------------------------------------
# The server at SIGTERM: queued requests get 503, every stream ends with [DONE]
# ----------------------------------------------------------------------------------------------------------------------


def _sse_lines(response) -> list[str]:
    """The `data:` lines of a server-sent-event response read to its end (raises if the stream is cut)."""
    lines = []
    while True:
        line = response.readline()
        if not line:
            return lines
        if line.startswith(b"data: "):
            lines.append(line[len(b"data: "):].strip().decode())


def test_sigterm_answers_queued_requests_503_and_ends_every_stream_with_done(tmp_path):
    """A long stream runs; a plain and a streaming request wait behind it; SIGTERM. The waiting plain request gets a
    503 with an OpenAI error body, the waiting stream an error event then [DONE], the running stream (cut after
    --shutdown-timeout) an error event then [DONE] too, and the process exits 0."""
    import http.client
    import signal
    import time

    from test_serve import ServerProcess, build_tokenizer, http as http_json

    folder = tmp_path / "served"
    target = tiny_target()
    target.config.max_position_embeddings = 4096  # room for a stream long enough to be running at SIGTERM
    target.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    server = ServerProcess(folder, tmp_path / "server.log", "--no-drafter", "--shutdown-timeout", "1")
    try:
        server.wait_healthy()

        def post(body: dict) -> http.client.HTTPConnection:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            connection.request("POST", "/v1/chat/completions", json.dumps(body),
                               {"Content-Type": "application/json"})
            return connection

        messages = [{"role": "user", "content": "w30 w31"}]
        running = post({"messages": messages, "max_tokens": 4000, "temperature": 0, "stream": True}).getresponse()
        assert running.status == 200
        while not running.readline().startswith(b"data: {"):  # the stream is live: its batch is running
            pass
        queued_plain = post({"messages": messages, "max_tokens": 5, "temperature": 0})
        queued_stream = post({"messages": messages, "max_tokens": 5, "temperature": 0, "stream": True})
        deadline = time.monotonic() + 30
        while http_json("GET", server.base + "/health")[1]["queue_depth"] < 2:
            assert time.monotonic() < deadline, "the two requests never queued"
            time.sleep(0.05)

        server.proc.send_signal(signal.SIGTERM)
        reply = queued_plain.getresponse()
        body = json.loads(reply.read())
        assert reply.status == 503, body
        assert body["error"]["type"] == "service_unavailable" and "shutting down" in body["error"]["message"]

        for response in (queued_stream.getresponse(), running):
            events = _sse_lines(response)
            assert events[-1] == "[DONE]", events[-3:]
            error = json.loads(events[-2])["error"]
            assert error["type"] == "service_unavailable" and "shutting down" in error["message"], error
        assert server.proc.wait(timeout=30) == 0, server.log.read_text()[-3000:]
    finally:
        server.stop()
