"""The model card of an export (`dflash_hf.model_card`).

- Measured results come from a real `dflash-hf bench` run (a tiny chat model pair, CPU, in a subprocess), reach the
  card only as a short summary and its model-index, and parse back with huggingface_hub's `ModelCard`.
- Without `--metrics`, the training results a drafter folder carries (TRAINING.md, or the metrics.json that training
  writes beside `drafter/`) are used.
- No file-system path reaches the card.
- The card's Python snippets run as written in a fresh interpreter where `dflash_hf` cannot be imported. The only
  change made to them: the card's two Hub ids (`TARGET_ID` and `REPO_ID`, given to the export as `base_model` and
  `repo_id`) are replaced by the local folders of the tiny target and the export.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from packaging.version import Version

from dflash_hf.export import export_drafter, load_metrics
from dflash_hf.model_card import from_training_md, scrub_command
from helpers import run_main, tiny_chat_tokenizer, tiny_drafter, tiny_target

TARGET_ID = "me/tiny-chat"
REPO_ID = "me/Tiny-Chat-DFlash"
NATIVE = Version(transformers.__version__) >= Version("5.15.1")
MACHINE_PATHS = ("/tmp/", "/root/", "/home/", "/work/", "/private/", "C:\\")


def model_index(card: ModelCard) -> dict[tuple[str, str], float]:
    """`{(metric type, dataset config): value}` of a parsed card's model-index."""
    found = {}
    for entry in card.data.to_dict()["model-index"]:
        for result in entry["results"]:
            for metric in result["metrics"]:
                found[(metric["type"], result["dataset"].get("config"))] = metric["value"]
    return found


def assert_no_machine_path(text: str, *paths: Path) -> None:
    for marker in MACHINE_PATHS + tuple(str(p) for p in paths):
        assert marker not in text, marker


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny chat target (ChatML character tokenizer) and a drafter for it, saved as folders."""
    tmp = tmp_path_factory.mktemp("card")
    tokenizer = tiny_chat_tokenizer()
    target = tiny_target(vocab=len(tokenizer))
    target.save_pretrained(tmp / "target")
    tokenizer.save_pretrained(tmp / "target")
    # As chat models' tokenizers do (SmolLM2, Qwen): no token_type_ids, which generate would refuse on 4.57.
    config_file = tmp / "target" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "model_input_names": ["input_ids", "attention_mask"]}, indent=2))
    drafter = tiny_drafter(target)
    drafter.save_pretrained(tmp / "run" / "drafter")
    return {"tmp": tmp, "target": tmp / "target", "drafter": drafter, "drafter_dir": tmp / "run" / "drafter"}


@pytest.fixture(scope="module")
def bench_json(pair) -> Path:
    """The JSON of a real `dflash-hf bench` run of the pair on CPU (two prompts of the independent evaluation set)."""
    results = pair["tmp"] / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "dflash_hf", "bench", "--target", str(pair["target"]), "--drafter",
         str(pair["drafter_dir"]), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "8", "--repeats", "1",
         "--warmup-tokens", "4", "--batch-sizes", "1,2", "--prompts", "chat:1,code:1", "--max-prompt-tokens", "32",
         "--methods", "ar_static,dflash_loop_eager", "--threads", "1", "--no-plot", "--results-dir", str(results),
         "--out", "tiny"],
        cwd=pair["tmp"], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return results / "tiny.json"


@pytest.fixture(scope="module")
def bench_export(pair, bench_json):
    out = pair["tmp"] / "hub" / "exp"
    export_drafter(pair["drafter"], out, repo_id=REPO_ID, base_model=TARGET_ID, metrics=load_metrics(bench_json),
                   dtype=torch.float32)
    return out


def test_card_from_bench_json_is_a_short_summary_and_a_model_index(pair, bench_json, bench_export):
    payload = json.loads(bench_json.read_text())
    text = (bench_export / "README.md").read_text()
    # The bench JSON carries machine paths, prompt texts and divergence records; none of it reaches the card.
    assert str(pair["drafter_dir"]) in payload["command"]
    assert_no_machine_path(text, pair["tmp"])
    for raw in ("divergences", "prompt_tokens", "weight_bytes", "times_s", "argv", "[bench]"):
        assert raw not in text, raw
    assert not any(p["text"][:40] in text for p in payload["settings"]["prompts"])

    card = ModelCard.load(bench_export / "README.md")  # the written file parses as a Hub card
    data = card.data.to_dict()
    assert data["base_model"] == TARGET_ID and data["license"] == "apache-2.0"
    assert {"dflash", "speculative-decoding", "custom_generate", "custom_code"} <= set(data["tags"])
    assert data["model-index"][0]["name"] == "Tiny-Chat-DFlash"
    assert text.split("\n---\n", 1)[1].lstrip().startswith("# Tiny-Chat-DFlash\n")  # title: the repo's name

    rows = {(r["method"], r["batch_size"]): r for r in payload["results"] if r.get("status") == "ok"}
    loop1 = rows[("dflash_loop_eager", 1)]
    index = model_index(card)
    for category, entry in loop1["per_category"].items():
        assert index[("mean_acceptance_length", category)] == pytest.approx(entry["tau"], abs=1e-3)
        assert f"| {category} | {entry['tau']:.2f} |" in text
    assert index[("mean_acceptance_length", "all")] == pytest.approx(loop1["tau"], abs=1e-3)
    assert index[("speedup", "all")] is not None
    speedups = [m for e in data["model-index"] for r in e["results"] for m in r["metrics"] if m["type"] == "speedup"]
    assert sorted(round(m["value"], 3) for m in speedups) == sorted(
        round(rows[("dflash_loop_eager", b)]["speedup_vs_ar_static"], 3) for b in (1, 2))
    assert all("CPU" in m["name"] and "float32" in m["name"] for m in speedups)
    assert "dflash_hf_eval_prompts" in text and "independent evaluation set" in text

    # The command, as the card shows it: the console script, placeholders for the local folders, no results dir.
    command = next(line for line in text.splitlines() if line.startswith("dflash-hf bench "))
    assert "--target TARGET --drafter DRAFTER" in command and "--results-dir" not in command
    assert "--out" not in command and "--methods ar_static,dflash_loop_eager" in command

    # The same text parsed from a string keeps the metrics (a round trip through huggingface_hub).
    again = ModelCard(str(card))
    assert model_index(again) == index
    assert {r.metric_type for r in again.data.eval_results} == {"mean_acceptance_length", "speedup"}


def test_card_install_and_bf16_notes(bench_export):
    text = (bench_export / "README.md").read_text()
    assert "pip install dflash-hf" not in text and "dflash-hf[" not in text
    assert 'pip install torch "transformers>=4.57.1"' in text and "not on PyPI" in text
    assert "pip install -e ." in text
    # device_map="auto" needs accelerate: the snippet does without, the text says what it needs.
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    assert "device_map" not in code and "accelerate" in text
    assert "## Exactness and bf16" in text and "bfloat16" in text and "float32" in text


def test_card_without_metrics_says_not_measured(pair, tmp_path):
    out = tmp_path / "folder-name-not-the-title"
    export_drafter(pair["drafter"], out, base_model=TARGET_ID, dtype=torch.float32)
    text = (out / "README.md").read_text()
    assert "Not measured" in text and "model-index" not in text
    assert "# tiny-chat-DFlash\n" in text and "folder-name-not-the-title" not in text
    assert ModelCard(text).data.to_dict()["base_model"] == TARGET_ID


def test_card_refuses_another_drafters_benchmark(pair, bench_json, tmp_path):
    other = tiny_drafter(tiny_target(vocab=102), layer_ids=[0, 2])
    with pytest.raises(ValueError, match="another drafter"):
        export_drafter(other, tmp_path / "out", metrics=load_metrics(bench_json), dtype=torch.float32)
    assert not (tmp_path / "out").exists()


def test_metrics_that_hold_no_measurement_are_refused(tmp_path, capsys, pair):
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"notes": "nothing measured", "path": "/root/out/x.png"}))
    code, _, err = run_main(["export", pair["drafter_dir"], "--target", pair["target"], "--out", tmp_path / "x",
                             "--metrics", bad], capsys)
    assert code == 2 and "no measured tau" in err and not (tmp_path / "x").exists()


def test_export_without_metrics_uses_the_bundled_training_md(tmp_path, capsys):
    from dflash_hf.assets import bundled_drafter_path, has_bundled_drafter

    if not has_bundled_drafter() or not (bundled_drafter_path() / "TRAINING.md").is_file():
        pytest.skip("no trained drafter with TRAINING.md is bundled in this install")
    notes = (bundled_drafter_path() / "TRAINING.md").read_text()
    out = tmp_path / "exp"
    code, _, err = run_main(["export", "bundled", "--target", "smollm2", "--out", out, "--dtype", "keep"], capsys)
    assert code == 0, err
    text = (out / "README.md").read_text()
    assert "Not measured" not in text and "# SmolLM2-135M-Instruct-DFlash\n" in text
    index = model_index(ModelCard.load(out / "README.md"))
    categories = {c for (kind, c) in index if kind == "mean_acceptance_length"} - {"all"}
    assert {"chat", "code", "math"} <= categories
    for category in categories:  # the card's numbers are the ones TRAINING.md states
        assert f"{category} {index[('mean_acceptance_length', category)]:.2f}" in " ".join(notes.split())
    assert_no_machine_path(text, tmp_path)


def test_export_without_metrics_uses_the_training_metrics_json(pair, tmp_path, capsys):
    from dflash_hf.prompts import EVAL_SOURCE
    from dflash_hf.training.recipe import TrainResult, write_metrics

    run = tmp_path / "run"
    pair["drafter"].save_pretrained(run / "drafter")
    evals = [{"step": 0, "tau": 1.0, "per_category": {"code": 1.0, "chat": 1.0}, "source": EVAL_SOURCE},
             {"step": 40, "tau": 2.5, "per_category": {"code": 3.25, "chat": 1.75}, "source": EVAL_SOURCE}]
    result = TrainResult(evals=evals, steps=40, output_dir=str(run))
    write_metrics(result, run / "metrics.json", {
        "argv": [str(tmp_path / "venv" / "bin" / "dflash-hf"), "train", "--target", str(pair["target"]), "--data",
                 str(tmp_path / "data.jsonl"), "--output", str(run), "--num-layers", "2"],
        "device": "cpu", "dtype": "torch.float32", "torch": torch.__version__,
        "transformers": transformers.__version__, "eval_prompts": 6, "eval_source": EVAL_SOURCE})
    out = tmp_path / "exp"
    code, _, err = run_main(["export", run / "drafter", "--target", pair["target"], "--base-model", TARGET_ID,
                             "--out", out], capsys)
    assert code == 0, err
    text = (out / "README.md").read_text()
    index = model_index(ModelCard.load(out / "README.md"))
    assert index[("mean_acceptance_length", "code")] == 3.25 and index[("mean_acceptance_length", "all")] == 2.5
    assert "| chat | 1.75 |" in text and "independent evaluation set" in text
    assert "dflash-hf train --target TARGET --data DATA.jsonl --output OUTPUT --num-layers 2" in text
    assert_no_machine_path(text, tmp_path)


def test_training_md_parser_reads_the_stated_tau_and_speed():
    measured = from_training_md(
        "Trained on one NVIDIA H200 (torch 2.11, transformers 5.17) by a script.\n"
        "- Measured tau on 48 held-out prompts (greedy, bf16, stopping at end of turn): **chat 1.87, code 3.61, math\n"
        "  5.67** (all 2.91). On the 12-prompt benchmark at batch 1: 877.5 tokens/s against 313.1 for HF's static\n"
        "  cache + compile (2.80x), tau 3.10.\n")
    assert measured.tau_per_category == {"chat": 1.87, "code": 3.61, "math": 5.67} and measured.tau == 2.91
    assert measured.hardware == "NVIDIA H200" and measured.dtype == "bfloat16"
    (speed,) = measured.speedups
    assert (speed.batch_size, speed.tokens_per_second, speed.baseline_tokens_per_second, speed.speedup) == \
        (1, 877.5, 313.1, 2.80)
    assert from_training_md("# Notes\n\nNo numbers here.\n") is None


@pytest.mark.parametrize("command, shown", [
    ("python -m dflash_hf bench --target smollm2 --drafter /tmp/run/drafter --out x --results-dir /root/out",
     "dflash-hf bench --target smollm2 --drafter DRAFTER"),
    (["/home/u/.venv/bin/dflash-hf", "bench", "--target=./models/t", "--drafter", "bundled", "--prompt-file",
      "C:\\p.json"], "dflash-hf bench --target=TARGET --drafter bundled --prompt-file PROMPTS.json"),
    ("dflash-hf bench --target smollm2 --drafter random:2 --methods ar_static", None),
    ("torchrun --nproc_per_node=2 -m dflash_hf train --data /data/d.jsonl --output runs/x --log /var/log/x",
     "dflash-hf train --data DATA.jsonl --output OUTPUT --log PATH"),
])
def test_scrub_command(command, shown):
    assert scrub_command(command) == (shown if shown is not None else command)


# ----------------------------------------------------------------------------------------------------------------------
# The card's snippets, run without dflash-hf
# ----------------------------------------------------------------------------------------------------------------------

EPILOGUE = '''
# --- test epilogue (not part of the card): what the snippets did ---
import json as _json, sys as _sys
_plain = target.generate(**inputs, max_new_tokens=256, do_sample=False)
_assisted = target.generate(**inputs, assistant_model=drafter, max_new_tokens=256, do_sample=False)
print("REPORT " + _json.dumps({
    "drafter_module": type(drafter).__module__,
    "assisted_equals_plain": _assisted.tolist() == _plain.tolist(),
    "dflash_hf_imported": sorted(m for m in _sys.modules if m == "dflash_hf" or m.startswith("dflash_hf.")),
}))
'''


def path_without_the_project(tmp: Path) -> str:
    """PYTHONPATH for `python -S`: this interpreter's site-packages, without dflash-hf. `-S` skips the .pth files
    (an editable install's import hook lives there); an install copied into site-packages is left out of a linked
    copy of that folder."""
    entries = []
    for number, folder in enumerate(Path(p) for p in site.getsitepackages() if Path(p).is_dir()):
        if not any(folder.glob("dflash_hf")):
            entries.append(str(folder))
            continue
        linked = tmp / f"site-{number}"
        linked.mkdir()
        for item in folder.iterdir():
            if not item.name.lower().startswith(("dflash_hf", "__editable__.dflash_hf", "dflash-hf")):
                (linked / item.name).symlink_to(item)
        entries.append(str(linked))
    return os.pathsep.join(entries)


def card_script(card: str, replacements: dict[str, str]) -> str:
    """The card's ```python blocks as one program, Hub ids replaced; the native-route block only where transformers
    has that route."""
    blocks = re.findall(r"^```python\n(.*?)^```", card, flags=re.S | re.M)
    assert len(blocks) >= 4, blocks
    code = []
    for block in blocks:
        if 'speculation_type="dflash"' in block and not NATIVE:
            continue
        for hub_id, folder in replacements.items():
            block = block.replace(f'"{hub_id}"', repr(folder))
        code.append(block)
    return "\n".join(code)


def test_card_snippets_run_without_dflash_hf(pair, bench_export, tmp_path):
    card = (bench_export / "README.md").read_text()
    assert f'"{TARGET_ID}"' in card and f'"{REPO_ID}"' in card
    script = tmp_path / "card_snippets.py"
    script.write_text(card_script(card, {TARGET_ID: str(pair["target"]), REPO_ID: str(bench_export)}) + EPILOGUE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=path_without_the_project(tmp_path), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-S"]

    probe = subprocess.run([*command, "-c", "import dflash_hf"], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode != 0 and "No module named 'dflash_hf'" in probe.stderr, probe.stderr

    result = subprocess.run([*command, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("REPORT "))[len("REPORT "):])
    assert report["dflash_hf_imported"] == []
    assert report["drafter_module"].startswith("transformers_modules")
    assert report["assisted_equals_plain"] is True  # float32 on CPU: exact
    assert "mean acceptance length:" in result.stdout
