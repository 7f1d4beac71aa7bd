"""`dflash-hf bench` end to end on CPU: a tiny real model folder (safetensors + tokenizer) written here, an untrained
`random:2` drafter, the real CLI in a subprocess, and the JSON / Markdown / PNG it writes.

Also in-process checks of the pieces the GPU run depends on (truncated assistant, weight bytes, option validation).
"""

from __future__ import annotations

import argparse

import importlib.util
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

from dflash_hf import bench

MAX_NEW = 8
BATCHES = (1, 2)


def write_tiny_model(folder: Path) -> Path:
    """A 6-layer random Qwen3 causal LM with a character-level tokenizer, saved with save_pretrained."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", mask_token="<mask>")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper than N(0, 0.02): greedy paths far from ties, so fp32 comparisons are meaningful
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_bench(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m dflash_hf bench ARGS` in a subprocess, offline and single-threaded; asserts it succeeded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "dflash_hf", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("bench") / "tiny")


def test_bench_cli_end_to_end(tiny_folder: Path, tmp_path: Path):
    results = tmp_path / "results"
    args = ["--target", str(tiny_folder), "--drafter", "random:2", "--device", "cpu", "--dtype", "fp32",
            "--max-new-tokens", str(MAX_NEW), "--repeats", "1", "--warmup-tokens", "4",
            "--batch-sizes", ",".join(map(str, BATCHES)), "--block-size", "4", "--prompts", "chat:1,code:1",
            "--max-prompt-tokens", "24", "--bare-iters", "10", "--threads", "1",
            "--results-dir", str(results), "--out", "tiny"]
    proc = run_bench(args, cwd=tmp_path)

    payload = json.loads((results / "tiny.json").read_text())
    env_info, settings = payload["environment"], payload["settings"]
    assert env_info["torch"] == torch.__version__ and env_info["transformers"] == transformers.__version__
    assert env_info["dtype"] == "float32" and env_info["device"] == "cpu"
    assert "--drafter random:2" in payload["command"]
    assert settings["drafter_trained"] is False and "UNTRAINED" in settings["drafter"]
    assert settings["max_new_tokens"] == MAX_NEW and "EOS ignored" in settings["eos_policy"]
    assert [p["category"] for p in settings["prompts"]] == ["chat", "code"]
    assert all(0 < p["prompt_tokens"] <= 24 for p in settings["prompts"])

    rows = {(r["method"], r["batch_size"]): r for r in payload["results"]}
    expected_ok = [("ar_eager", b) for b in BATCHES] + [("ar_static", b) for b in BATCHES]
    expected_ok += [("dflash_loop_eager", b) for b in BATCHES] + [("ar_loop", b) for b in BATCHES]
    expected_ok += [("dflash_generate", b) for b in BATCHES]  # plain generate runs the engine, batches included
    expected_ok += [("assisted_truncated", 1), ("prompt_lookup", 1)]
    native_ok, _ = bench.native_dflash_available()
    if native_ok:
        expected_ok.append(("hf_dflash", 1))
    else:
        assert rows[("hf_dflash", 1)]["status"] == "skipped"
    for b in BATCHES:  # no CUDA here: said, not silently dropped
        for method in ("dflash_loop_graphs", "dflash_loop_compiled", "dflash_generate_compiled"):
            assert rows[(method, b)]["status"] == "skipped"
            assert "cuda" in rows[(method, b)]["reason"].lower()

    for key in expected_ok:
        row = rows[key]
        assert row["status"] == "ok", (key, row.get("reason"))
        batch = key[1]
        prompts_per_item = 1 if batch == 1 else batch
        items = 2 if batch == 1 else 1
        assert row["new_tokens"] == MAX_NEW * prompts_per_item * items, key
        assert row["tokens_per_row_ok"], key
        assert row["tokens_per_second"] > 0 and row["time_best_s"] > 0, key
        assert row["tau"] >= 1.0, key
        assert row["speedup_vs_ar_eager"] > 0 and row["speedup_vs_ar_static"] > 0, key
        # fp32: every method's greedy tokens equal AR eager's, row by row.
        assert row["lossless"]["exact"] is True, (key, row["lossless"])
        assert row["lossless"]["rows"] == prompts_per_item * items
        assert row["weight_bandwidth_Bps"] > 0, key
    for key in [(method, b) for method in ("dflash_loop_eager", "dflash_generate") for b in BATCHES]:
        row = rows[key]
        assert 1.0 <= row["tau"] <= 4.0, key  # block size 4
        assert row["steps"] >= (MAX_NEW - 1) / 4 * (2 if key[1] == 1 else 1), key
        assert row["ms_draft_per_step"] > 0 and row["ms_verify_per_step"] > 0, key
    for b in BATCHES:
        loop = rows[("dflash_loop_eager", b)]
        assert loop["ms_per_step_steady"] > 0 and loop["loop_overhead_ratio"] > 0
        assert loop["bare_floor_kind"] == "eager"
    assert rows[("ar_eager", 1)]["tau"] == 1.0 and rows[("ar_eager", 1)]["ms_verify_per_step"] > 0
    for b in BATCHES:  # the loop without a drafter: one token a step, nothing drafted
        ar_loop = rows[("ar_loop", b)]
        assert ar_loop["tau"] == 1.0 and ar_loop["ms_draft_per_step"] == pytest.approx(0.0, abs=0.05)
        assert ar_loop["speedup_vs_ar_loop"] == pytest.approx(1.0)

    bare = {entry["batch"]: entry for entry in payload["bare"]}
    assert sorted(bare) == list(BATCHES)
    for entry in bare.values():
        assert entry["block_size"] == 4 and entry["mode"].startswith("eager")
        for part in ("verify", "draft", "ar_1tok"):
            assert entry[part]["median_s"] > 0

    markdown = (results / "tiny.md").read_text()
    assert "| method | batch | tok/s (best)" in markdown and "UNTRAINED" in markdown
    for method, _ in expected_ok:
        assert f"`{method}`" in markdown
    assert "Cost floor" in markdown
    assert "Command: python -m dflash_hf bench" in proc.stdout and "| `ar_eager` | 1 |" in proc.stdout

    png = results / "tiny.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and payload["plot"] == str(png)
    else:
        assert payload["plot"] is None and not png.exists()


def test_bench_stop_at_eos(tiny_folder: Path, tmp_path: Path):
    """--stop-at-eos: every method stops each row at the target's EOS, rows are compared up to it, tokens/s counts
    only what was produced. The EOS is set (in the folder's generation_config) to a token the model emits early."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    spec = "chat:1,code:1"
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    prompts, _ = bench.load_prompts(bench.parse_prompt_spec(spec))
    ids = bench.tokenize_prompts(prompts, tokenizer, chat_template=True, max_prompt_tokens=24)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    greedy = [model.generate(r[None], attention_mask=torch.ones_like(r[None]), do_sample=False, max_new_tokens=MAX_NEW,
                             eos_token_id=None, pad_token_id=0)[0, len(r):].tolist() for r in ids]
    stop = next(t for t in greedy[0][2:] if t != tokenizer.pad_token_id)
    lengths = [row.index(stop) + 1 if stop in row else MAX_NEW for row in greedy]
    assert lengths[0] < MAX_NEW

    folder = tmp_path / "tiny_eos"
    shutil.copytree(tiny_folder, folder)
    generation = GenerationConfig.from_pretrained(folder)
    generation.eos_token_id = [stop]
    generation.save_pretrained(folder)

    results = tmp_path / "results"
    args = ["--target", str(folder), "--drafter", "random:2", "--device", "cpu", "--dtype", "fp32",
            "--max-new-tokens", str(MAX_NEW), "--repeats", "1", "--warmup-tokens", "4", "--batch-sizes", "1,2",
            "--block-size", "4", "--prompts", spec, "--max-prompt-tokens", "24", "--threads", "1", "--no-plot",
            "--methods", "ar_eager,ar_static,dflash_loop_eager,dflash_generate", "--stop-at-eos",
            "--results-dir", str(results), "--out", "eos"]
    run_bench(args, cwd=tmp_path)

    payload = json.loads((results / "eos.json").read_text())
    assert payload["settings"]["stop_token_ids"] == [stop]
    assert "stops a row at the target's EOS" in payload["settings"]["eos_policy"]
    assert "stops a row at the target's EOS" in (results / "eos.md").read_text()
    rows = {(r["method"], r["batch_size"]): r for r in payload["results"]}
    expected = [("ar_eager", 1), ("ar_eager", 2), ("ar_static", 1), ("ar_static", 2), ("dflash_loop_eager", 1),
                ("dflash_loop_eager", 2), ("dflash_generate", 1)]
    for key in expected:
        row = rows[key]
        assert row["status"] == "ok", (key, row.get("reason"))
        # Both prompts once per pass (one item each at batch 1, one item of both at batch 2).
        assert row["new_tokens"] == sum(lengths), (key, row["new_tokens"], lengths)
        assert row["tokens_per_row_ok"], key
        assert row["lossless"]["exact"] is True, (key, row["lossless"])


def test_stop_at_eos_stops_where_generate_does_and_needs_a_stop_id(tiny_folder: Path):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    assert bench.eos_policy_stop_ids(model, tokenizer) == [2]
    model.generation_config.eos_token_id = [7, 9]
    assert bench.eos_policy_stop_ids(model, tokenizer) == [7, 9]
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="--stop-at-eos: the target names no EOS token"):
        bench.eos_policy_stop_ids(model, tokenizer)


def test_truncated_assistant_shares_embedding_and_head(tiny_folder: Path):
    target = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    assistant = bench.build_truncated_assistant(target, 2)
    assert isinstance(assistant, transformers.PreTrainedModel)
    assert assistant.config.num_hidden_layers == 2 and len(assistant.model.layers) == 2
    assert assistant.get_input_embeddings() is target.get_input_embeddings()
    assert assistant.get_output_embeddings() is target.get_output_embeddings()
    for i in range(2):
        torch.testing.assert_close(assistant.model.layers[i].mlp.up_proj.weight, target.model.layers[i].mlp.up_proj.weight)
    # Shared modules are counted once; the lookup-only embedding is tied to the head here, so it counts.
    per_layer = sum(p.numel() * 4 for p in target.model.layers[0].parameters())
    assert bench.forward_weight_bytes(target) - bench.forward_weight_bytes(assistant) == 4 * per_layer
    with pytest.raises(ValueError, match="--assistant-layers 6"):
        bench.build_truncated_assistant(target, 6)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"drafter": "random:x"}, "random:N"),
        ({"methods": ["ar_eager", "beam"]}, "unknown \\['beam'\\]"),
        ({"batch_sizes": [1, 0]}, "--batch-sizes"),
        ({"prompts": "math:two"}, "category:count"),
        ({"max_new_tokens": 1}, "--max-new-tokens 1"),
    ],
)
def test_bad_options_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        bench.validate_options(bench.BenchOptions(**changes))


def test_error_reasons_fit_one_table_cell():
    reason = ("InductorError: SubprocException: in a subprocess:\n\nTraceback (most recent call last):\n  File x\n"
              "RuntimeError: PassManager::run failed\n\nSet TORCHDYNAMO_VERBOSE=1 for more")
    assert bench._one_line(reason) == ("InductorError: SubprocException: in a subprocess: ... "
                                       "RuntimeError: PassManager::run failed")
    assert bench._one_line("needs CUDA") == "needs CUDA" and bench._one_line("a|b") == "a/b"
    assert bench._one_line("a | b\nValueError: c | d") == "a / b ... ValueError: c / d"  # no stray table columns


def test_prompt_spec_and_left_padding():
    assert bench.parse_prompt_spec("2") == 2
    assert bench.parse_prompt_spec("math:2, chat:1") == {"math": 2, "chat": 1}
    ids, mask = bench.left_pad([torch.tensor([5, 6, 7]), torch.tensor([9])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="unknown category 'poetry'"):
        bench.load_prompts({"poetry": 1})


def test_prompt_sets():
    """The default is the independent evaluation set; the generator's held-out split is labelled in-distribution; an
    unknown set is refused by name."""
    from dflash_hf.prompts import EVAL_SOURCE, eval_prompts

    prompts, source = bench.load_prompts(bench.parse_prompt_spec("2"))
    assert source == EVAL_SOURCE
    written = {p["prompt"] for p in eval_prompts()}
    assert len(prompts) == 6 and all(p["prompt"] in written for p in prompts)
    prompts, source = bench.load_prompts(1, prompt_set="heldout")
    assert "in-distribution" in source and not {p["prompt"] for p in prompts} & written
    with pytest.raises(ValueError, match="'training'"):
        bench.load_prompts(1, prompt_set="training")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert parser.parse_args([]).prompt_set == "independent"
    assert parser.parse_args(["--prompt-set", "heldout"]).prompt_set == "heldout"


def test_prompt_file(tmp_path: Path):
    """--prompt-file: the shipped independent prompts load per category; a file of plain strings works; a file that is
    not a list of prompts is refused by name before any model loads."""
    shipped = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts" / "everyday.json"
    prompts, source = bench.load_prompts(bench.parse_prompt_spec("2"), prompt_file=str(shipped))
    assert source == str(shipped) and [p["category"] for p in prompts] == ["code"] * 2 + ["math"] * 2 + ["chat"] * 2
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(["Say hi.", "Count to three."]))
    prompts, _ = bench.load_prompts(2, prompt_file=str(plain))
    assert [p["prompt"] for p in prompts] == ["Say hi.", "Count to three."]
    for bad in ('{"prompt": "x"}', "[]", '[{"category": "chat"}]', "not json"):
        broken = tmp_path / "broken.json"
        broken.write_text(bad)
        with pytest.raises(ValueError, match="--prompt-file"):
            bench.validate_options(bench.BenchOptions(prompt_file=str(broken)))
