"""`dflash-hf make-data` and `dflash-hf train` through real subprocesses, including 2-process gloo runs (DDP, and DDP
with the target sharded by FSDP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import tiny_chat_tokenizer, tiny_target

from dflash_hf import DFlashDraftModel
from dflash_hf.prompts import EVAL_SOURCE


def run_cli(*args: str, timeout: int = 240, module: tuple[str, ...] = ("-m", "dflash_hf")):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, *module, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny Qwen3 target with a real chat tokenizer, saved as a normal model folder."""
    folder = tmp_path_factory.mktemp("target")
    tokenizer = tiny_chat_tokenizer()
    model = tiny_target("qwen3", layers=4, vocab=len(tokenizer), eos=2)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    # Character-level tokens make the built-in prompts long (hundreds of tokens); RoPE has no length limit.
    model.config.max_position_embeddings = 4096
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(target_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "data.jsonl"
    result = run_cli("make-data", "--target", str(target_dir), "--output", str(out), "--categories", "math",
                     "--n-per-category", "8", "--max-new-tokens", "24", "--batch-size", "3", "--engine", "hf-static",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["records"] == 8 and summary["path"] == str(out)
    return out


def test_make_data_cli_writes_jsonl(data_file):
    records = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert len(records) == 8 and {r["category"] for r in records} == {"math"}
    for record in records:
        assert set(record) == {"category", "prompt", "response", "input_ids", "loss_mask"}
        assert len(record["input_ids"]) == len(record["loss_mask"])
        n_prompt = record["loss_mask"].index(1)
        assert record["loss_mask"] == [0] * n_prompt + [1] * (len(record["loss_mask"]) - n_prompt)
        assert record["input_ids"][0] == 1  # the chat template's <|im_start|>
        assert 1 <= len(record["input_ids"]) - n_prompt <= 24


def test_make_data_counts_per_category(target_dir, tmp_path, capsys):
    from dflash_hf.cli import main
    from dflash_hf.prompts import build_prompts

    out = tmp_path / "mixed.jsonl"
    assert main(["make-data", "--target", str(target_dir), "--output", str(out), "--n-per-category", "math=2,code=1",
                 "--humaneval", "no", "--max-new-tokens", "4", "--batch-size", "3", "--no-progress"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = build_prompts(2, categories=["math"]) + build_prompts(1, categories=["code"], include_humaneval=False)
    assert [(r["category"], r["prompt"]) for r in records] == [(e["category"], e["prompt"]) for e in expected]
    capsys.readouterr()
    assert main(["make-data", "--target", str(target_dir), "--output", str(out), "--n-per-category", "math=2",
                 "--categories", "code"]) == 2
    assert "drop --categories" in capsys.readouterr().err
    for bad in ("math=0", "math=2,math=3", "=4", "math=x"):
        with pytest.raises(SystemExit) as exit_info:
            main(["make-data", "--target", "x", "--output", str(out), "--n-per-category", bad])
        assert exit_info.value.code == 2 and "--n-per-category" in capsys.readouterr().err


def test_train_cli_writes_a_loadable_drafter_and_metrics(target_dir, data_file, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--target", str(target_dir), "--data", str(data_file), "--output", str(out),
                     "--num-layers", "1", "--block-size", "4", "--target-layer-ids", "1,2", "--max-steps", "6",
                     "--batch-size", "4", "--num-anchors", "8", "--eval-per-category", "1",
                     "--eval-max-new-tokens", "12", "--no-progress", "--no-plot")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final_tau_per_category"]) == {"code", "math", "chat"}
    assert all(1.0 <= tau <= 4.0 for tau in metrics["final_tau_per_category"].values())
    assert metrics["run"]["world_size"] == 1 and metrics["steps"] == 6
    # The default evaluation source is the independent set, and the report says so.
    assert metrics["eval_source"] == summary["eval_source"] == EVAL_SOURCE
    drafter = DFlashDraftModel.from_pretrained(out / "drafter", dtype=torch.float32)
    assert drafter.config.target_layer_ids == [1, 2] and drafter.config.block_size == 4
    assert drafter.config.mask_token_id == 4  # <|spare|>: the unused special token of the tiny tokenizer


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_train_cli_compile_trains_the_same_drafter(target_dir, data_file, tmp_path):
    """`train --compile` compiles the step and takes the same steps as the eager run (same losses, same weights)."""
    args = ["train", "--target", str(target_dir), "--data", str(data_file), "--num-layers", "1", "--block-size", "4",
            "--target-layer-ids", "1,2", "--max-steps", "3", "--batch-size", "4", "--num-anchors", "8",
            "--eval-per-category", "1", "--eval-max-new-tokens", "4", "--no-progress", "--no-plot"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = run_cli(*args, "--output", str(tmp_path / name), *extra)
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["compiled"]["extra"]["compile"] and not runs["eager"]["extra"]["compile"]
    assert runs["compiled"]["history"][-1]["loss"] == pytest.approx(runs["eager"]["history"][-1]["loss"], rel=1e-4)
    weights = [DFlashDraftModel.from_pretrained(tmp_path / name / "drafter", dtype=torch.float32) for name in runs]
    for a, b in zip(weights[0].parameters(), weights[1].parameters()):
        torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-2)  # saved in bf16


def test_train_cli_time_budget_replans_the_run(target_dir, data_file, tmp_path):
    """--time-budget-minutes: far more epochs than fit in 6 s; the run re-plans at step 30 so its cosine decay
    completes inside the budget, or stops at the budget."""
    out = tmp_path / "budget"
    result = run_cli("train", "--target", str(target_dir), "--data", str(data_file), "--output", str(out),
                     "--num-layers", "1", "--block-size", "4", "--target-layer-ids", "1,2", "--epochs", "5000",
                     "--batch-size", "4", "--num-anchors", "8", "--eval-per-category", "1",
                     "--eval-max-new-tokens", "4", "--time-budget-minutes", "0.1", "--no-progress", "--no-plot")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 30 <= summary["steps"] < 10_000 and metrics["extra"]["total_steps"] == summary["steps"]
    assert summary["train_seconds"] < 6.0 + 2.0  # the budget, plus at most one step and the stop check
    if not summary["stopped_by_time_budget"]:  # finished by the re-planned schedule: the LR decayed to ~0
        assert metrics["history"][-1]["lr"] < 0.05 * metrics["extra"]["lr"]
    for bad in ("0", "-1", "nan"):
        refused = run_cli("train", "--target", str(target_dir), "--data", str(data_file), "--output", str(out),
                          "--time-budget-minutes", bad)
        assert refused.returncode == 2 and "--time-budget-minutes" in refused.stderr


def two_process_train_args(target_dir, data_file) -> list[str]:
    """`dflash-hf train` arguments of the 2-process runs below (all but --output and the launcher)."""
    return ["train", "--target", str(target_dir), "--data", str(data_file), "--num-layers", "1", "--block-size", "4",
            "--target-layer-ids", "1,2", "--max-steps", "3", "--batch-size", "2", "--num-anchors", "8",
            "--eval-per-category", "1", "--eval-max-new-tokens", "8", "--eval-every", "2", "--no-progress",
            "--no-plot", "--save-dtype", "float32"]


def torchrun_train(target_dir, data_file, out, *extra: str) -> tuple[dict, dict]:
    """`torchrun --nproc_per_node=2 -m dflash_hf train ...` on CPU (gloo): `(metrics.json, drafter weights)`."""
    from safetensors.torch import load_file

    result = run_cli("--standalone", "--nproc_per_node=2", "-m", "dflash_hf",
                     *two_process_train_args(target_dir, data_file), "--output", str(out), *extra,
                     module=("-m", "torch.distributed.run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), load_file(out / "drafter" / "model.safetensors")


@pytest.fixture(scope="module")
def ddp_run(target_dir, data_file, tmp_path_factory) -> tuple[dict, dict]:
    """The 2-process DDP run with a whole target per process, which the other 2-process runs are compared with."""
    return torchrun_train(target_dir, data_file, tmp_path_factory.mktemp("ddp") / "out")


def test_train_cli_under_torchrun_and_accelerate_with_gloo(ddp_run, target_dir, data_file, tmp_path):
    """Two CPU processes (gloo): each trains on its own shard, DDP averages gradients, so both end with the very
    same weights; only rank 0 evaluates and writes. `accelerate launch` gives the same run."""
    metrics, _ = ddp_run
    assert metrics["extra"]["world_size"] == 2 and metrics["steps"] == 3
    checksums = metrics["extra"]["rank_parameter_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert [e["step"] for e in metrics["evals"]] == [0, 2, 3]

    # `accelerate launch` starts the same 2 processes (its multi-process launcher runs torchrun's; without GPUs the
    # command picks gloo): the same drafter, weight for weight.
    out = tmp_path / "accelerate"
    result = run_cli("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no", "-m", "dflash_hf", *two_process_train_args(target_dir, data_file),
                     "--output", str(out), module=("-m", "accelerate.commands.launch"))
    assert result.returncode == 0, result.stderr[-3000:]
    launched = json.loads((out / "metrics.json").read_text())
    assert launched["extra"]["world_size"] == 2
    assert launched["extra"]["rank_parameter_checksums"] == checksums
    assert (out / "drafter" / "model.safetensors").is_file()


def test_train_cli_shards_the_target_under_torchrun(ddp_run, target_dir, data_file, tmp_path):
    """--shard-target: the target's decoder layers are split over the 2 gloo processes (FSDP2), each holding half of
    them, and every process joins the evaluations. Gathering a layer's weights is exact, so the drafter is the very
    one a run with a whole target per process trains: same weights, same held-out tau."""
    from transformers import AutoModelForCausalLM

    whole, whole_weights = ddp_run
    sharded, sharded_weights = torchrun_train(target_dir, data_file, tmp_path / "sharded", "--shard-target")

    assert sharded["extra"]["target_sharded"] is True and whole["extra"]["target_sharded"] is False
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    total = sum(p.numel() for p in model.parameters())
    in_layers = sum(p.numel() for p in model.model.layers.parameters())
    assert whole["extra"]["target_parameters_per_rank"] == [total, total]
    assert sharded["extra"]["target_parameters_per_rank"] == [total - in_layers // 2] * 2
    assert sharded["extra"]["rank_parameter_checksums"][0] == sharded["extra"]["rank_parameter_checksums"][1]
    assert sharded_weights.keys() == whole_weights.keys()
    for key in whole_weights:
        assert torch.equal(sharded_weights[key], whole_weights[key]), key
    assert [e["step"] for e in sharded["evals"]] == [0, 2, 3]
    assert [e["per_category"] for e in sharded["evals"]] == [e["per_category"] for e in whole["evals"]]


def test_shard_target_needs_torchrun(data_file, tmp_path, capsys):
    from dflash_hf.cli import main

    assert main(["train", "--target", "smollm2", "--data", str(data_file), "--output", str(tmp_path / "o"),
                 "--shard-target"]) == 2
    err = capsys.readouterr().err
    assert "--shard-target" in err and "torchrun --nproc_per_node=N" in err


def test_cli_error_exit_code_in_a_real_process(tmp_path):
    missing = run_cli("train", "--target", "smollm2", "--data", str(tmp_path / "nope.jsonl"), "--output",
                      str(tmp_path / "o"))
    assert missing.returncode == 2
    assert "nope.jsonl" in missing.stderr and "make-data" in missing.stderr
    assert missing.stdout == ""


def test_cli_help_and_argument_errors(capsys, tmp_path):
    """The same `main` the console script runs (in-process, to spare interpreter start-ups)."""
    from dflash_hf.cli import main

    for command, options in (("train", ("--target", "--data", "--num-anchors", "--eval-per-category", "torchrun")),
                             ("make-data", ("--target", "--n-per-category", "--max-new-tokens", "--prompts-file"))):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(option in text for option in options), (command, text)
    assert main(["make-data", "--target", "smollm2", "--output", str(tmp_path / "d.jsonl"), "--categories",
                 "poetry"]) == 2
    assert "poetry" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"category": "math"}\n')
    assert main(["make-data", "--target", "smollm2", "--output", str(tmp_path / "d.jsonl"), "--prompts-file",
                 str(tmp_path / "bad.jsonl")]) == 2
    assert "record 1 has no non-empty" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--target", "x", "--data", "d", "--output", "o", "--num-layers", "0"])
    assert exit_info.value.code == 2 and "--num-layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--target", "x", "--data", "d", "--output", "o", "--target-layer-ids", "1,a"])
    assert "comma-separated list" in capsys.readouterr().err
