"""Hub-ready export and z-lab conversion.

The central check: an exported folder works with **no dflash-hf install**. A fresh Python process, in which importing
`dflash_hf` is blocked, loads the drafter with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and must
reproduce the target's greedy output through `target.generate(assistant_model=...)` and through
`target.generate(custom_generate=folder, trust_remote_code=True, ...)` (a left-padded batch).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file

from dflash_hf.export import AUTO_MAP, convert_zlab, export_drafter, remote_code_files
from helpers import (
    ZLAB_SPECS,
    run_main,
    target_for_spec,
    tiny_drafter,
    tiny_target,
    write_zlab_checkpoint,
    zlab_config_dict,
)

# Released layouts converted and run end to end: a Gemma-4 drafter (sliding layers, softcap, 6 context layers, a
# real token as mask id) and a Qwen3.5 drafter (eos == pad, untied), in tiny.
SPECS = ("gemma-4-26b-a4b", "qwen3.5-27b")

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter; `dflash_hf` cannot be imported there, so only the exported files can supply the code.
ISOLATED_CHILD = textwrap.dedent(
    r'''
    import importlib.abc, json, sys


    class BlockDflashHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dflash_hf" or name.startswith("dflash_hf."):
                raise ImportError(f"{name} is blocked: the export must work without dflash-hf")


    sys.meta_path.insert(0, BlockDflashHf())
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    jobs, max_new = json.loads(sys.argv[1]), int(sys.argv[2])
    report = {"targets": {}, "folders": {}}
    for target_dir, folders in jobs:
        target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
        vocab = target.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(6, vocab - 2, (1, n), generator=g) for n in (9, 14, 5)]
        plain = [target.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                                 max_new_tokens=max_new)[0].tolist() for p in prompts]
        report["targets"][target_dir] = {"plain": plain, "prompt_lengths": [p.shape[1] for p in prompts],
                                         "pad": target.generation_config.pad_token_id}
        width = max(p.shape[1] for p in prompts)
        batch = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding, as for batched generate
            batch[r, width - p.shape[1]:] = p[0]
            mask[r, width - p.shape[1]:] = 1
        for folder in folders:
            drafter = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
            entry = {"target": target_dir, "module": type(drafter).__module__, "class": type(drafter).__name__}
            assisted, stats = [], []
            for p in prompts:
                out = target.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=max_new,
                                      assistant_model=drafter)
                assisted.append(out[0].tolist())
                stats.append(list(drafter.last_stats.acceptance_lengths))
            entry["assisted"], entry["assisted_stats"] = assisted, stats
            try:
                seqs = target.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                       custom_generate=folder, trust_remote_code=True, assistant_model=drafter)
                entry["custom_rows"] = [seqs[r][mask[r].bool().tolist() + [True] * (seqs.shape[1] - width)].tolist()
                                        for r in range(len(prompts))]
                entry["custom_stats"] = list(drafter.last_stats.acceptance_lengths)
                if folder != jobs[0][1][0]:  # sampling is checked once, on the main export
                    report["folders"][folder] = entry
                    continue
                torch.manual_seed(0)
                sampled = target.generate(batch, attention_mask=mask, do_sample=True, temperature=0.8,
                                          max_new_tokens=max_new, custom_generate=folder, trust_remote_code=True,
                                          assistant_model=drafter)
                entry["sampled_shape"] = list(sampled.shape)
                entry["sampled_max_id"] = int(sampled.max())
            except Exception as error:  # reported, and asserted on by the tests
                entry["custom_error"] = f"{type(error).__name__}: {error}"
            report["folders"][folder] = entry
    report["dflash_hf_imported"] = sorted(k for k in sys.modules if k.startswith("dflash_hf"))
    print("REPORT " + json.dumps(report))
    '''
)


def run_isolated(tmp: Path, jobs: list[tuple[Path, list[Path]]], max_new: int = 20) -> dict:
    """Run the isolated child over `(target folder, [drafter folders])` jobs; returns its JSON report."""
    script = tmp / "isolated_child.py"
    script.write_text(ISOLATED_CHILD)
    # One thread: tiny models gain nothing from more, and OpenMP threads contending on a busy 2-core machine slow
    # them down by an order of magnitude.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "hf_modules"), TOKENIZERS_PARALLELISM="0",
               OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(script), json.dumps([[str(t), [str(f) for f in fs]] for t, fs in jobs]), str(max_new)],
        capture_output=True, text=True, env=env, cwd=str(tmp), timeout=600,
    )
    assert result.returncode == 0, f"isolated child failed:\n{result.stderr[-4000:]}"
    line = next(l for l in result.stdout.splitlines() if l.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def zlab_release(folder: Path, drafter, *, aliased: bool = False) -> Path:
    """A folder laid out like a z-lab release: model_type qwen3, auto_map dflash.DFlashDraftModel, nested
    dflash_config, bf16 weights without prefix (docs/DFLASH.md, "Released config and weight layout"). `aliased` renames fc/hidden_norm as MuseGlimmer does."""
    folder.mkdir(parents=True)
    c = drafter.config
    config = {
        "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3", "block_size": c.block_size, "num_target_layers": c.num_target_layers,
        "dflash_config": {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.target_layer_ids)},
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "silu", "attention_bias": False, "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size,
        "tie_word_embeddings": True, "layer_types": ["full_attention"] * c.num_hidden_layers,
        "sliding_window": None, "use_sliding_window": False, "max_window_layers": c.num_hidden_layers,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "dtype": "bfloat16", "transformers_version": "4.57.1",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in drafter.state_dict().items()}
    if aliased:
        state = {("encoder." + k.replace("hidden_norm", "output_norm_enc") if k.split(".")[0] in ("fc", "hidden_norm")
                  else k): v for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a release\n")
    return folder


def tensor_bytes(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).view(torch.uint8).numpy().tobytes() for k in f.keys()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny target folder and a tiny drafter exported in fp32; z-lab-style releases converted, with their targets."""
    tmp = tmp_path_factory.mktemp("export")
    target = tiny_target()
    target.save_pretrained(tmp / "target")
    drafter = tiny_drafter(target)
    result = export_drafter(drafter, tmp / "hub" / "tiny-dflash", base_model="Qwen/Qwen3-0.6B", dtype=torch.float32)
    zlab = zlab_release(tmp / "zlab" / "Tiny-DFlash-b8", tiny_drafter(target, seed=7))
    zlab_aliased = zlab_release(tmp / "zlab" / "Tiny-DFlash-aliased", tiny_drafter(target, seed=8), aliased=True)
    converted = convert_zlab(zlab, tmp / "hub" / "tiny-converted", base_model="Qwen/Qwen3-0.6B")
    converted_aliased = convert_zlab(zlab_aliased, tmp / "hub" / "tiny-converted-aliased")
    specs = {}
    for name in SPECS:
        spec = ZLAB_SPECS[name]
        target_for_spec(spec).save_pretrained(tmp / f"target-{name}")
        release = tmp / "zlab" / name
        write_zlab_checkpoint(release, zlab_config_dict(spec))
        specs[name] = {"target": tmp / f"target-{name}", "release": release,
                       "converted": convert_zlab(release, tmp / "hub" / f"{name}-converted")}
    return {"tmp": tmp, "target": tmp / "target", "drafter": drafter, "export": result, "zlab": zlab,
            "zlab_aliased": zlab_aliased, "converted": converted, "converted_aliased": converted_aliased,
            "specs": specs}


@pytest.fixture(scope="module")
def isolated_report(exported):
    # The aliased conversion differs from the plain one only in tensor names (checked byte for byte below), so one
    # converted folder is enough here.
    jobs = [(exported["target"], [exported["export"].folder, exported["converted"].folder])]
    jobs += [(entry["target"], [entry["converted"].folder]) for entry in exported["specs"].values()]
    return run_isolated(exported["tmp"], jobs)


def check_lossless(report: dict, folder: Path, block_size: int) -> None:
    """Assisted and custom_generate outputs of `folder` equal the target's own greedy output, row by row."""
    check_assisted(report, folder, block_size)
    check_custom_generate(report, folder, block_size)


def check_assisted(report: dict, folder: Path, block_size: int) -> None:
    """`target.generate(assistant_model=drafter)` with the exported drafter equals the target's greedy output."""
    entry = report["folders"][str(folder)]
    target = report["targets"][entry["target"]]
    plain = target["plain"]
    assert entry["class"] == "DFlashDraftModel" and entry["module"].startswith("transformers_modules")
    assert entry["assisted"] == plain
    # Every committed token after the prefill's first one is accounted for by a verify step.
    new = [len(row) - n for row, n in zip(plain, target["prompt_lengths"])]
    assert [sum(s) for s in entry["assisted_stats"]] == [n - 1 for n in new]
    assert all(1 <= n <= block_size for s in entry["assisted_stats"] for n in s)


def check_custom_generate(report: dict, folder: Path, block_size: int) -> None:
    """`target.generate(custom_generate=folder, ...)` on a left-padded batch equals each row's greedy output."""
    entry = report["folders"][str(folder)]
    target = report["targets"][entry["target"]]
    plain = target["plain"]
    assert "custom_error" not in entry, entry.get("custom_error")
    # Each batch row, left padding removed, is that row's greedy output followed only by padding.
    assert [row[: len(p)] for row, p in zip(entry["custom_rows"], plain)] == plain
    assert all(set(row[len(p):]) <= {target["pad"]} for row, p in zip(entry["custom_rows"], plain))
    assert entry["custom_stats"] and all(1 <= n <= block_size for n in entry["custom_stats"])


def test_export_layout(exported):
    folder = exported["export"].folder
    names = {name for name, _ in exported["export"].files}
    code = {p.name for p in remote_code_files()}
    assert {"configuration_dflash.py", "modeling_dflash.py", "generation_dflash.py", "dflash.py"} <= code
    expected = {"config.json", "model.safetensors", "README.md", "custom_generate/generate.py"}
    expected |= code | {f"custom_generate/{name}" for name in code}
    assert names == expected
    # Every .py is a byte copy of the single source in the installed package.
    for source in remote_code_files():
        assert (folder / source.name).read_bytes() == source.read_bytes()
        assert (folder / "custom_generate" / source.name).read_bytes() == source.read_bytes()

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["model_type"] == "dflash_draft" and config["architectures"] == ["DFlashDraftModel"]
    assert config["dflash_config"] == {"mask_token_id": 5, "target_layer_ids": [1, 3]}
    assert config["target_layer_ids"] == [1, 3] and config["block_size"] == 8
    # RoPE written for both 4.57 (rope_theta) and 5.x (rope_parameters).
    assert config["rope_theta"] == 10000.0 and config["rope_parameters"]["rope_theta"] == 10000.0
    assert "id2label" not in config and "_name_or_path" not in config


def test_export_weights_are_the_released_layout(exported):
    folder = exported["export"].folder
    drafter = exported["drafter"]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(drafter.state_dict())
        for key in keys:
            assert torch.equal(f.get_tensor(key), drafter.state_dict()[key])
    assert "fc.weight" in keys and not any("embed" in k or "lm_head" in k or "rotary" in k for k in keys)


def test_model_card_metadata(exported):
    card = (exported["export"].folder / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("license: apache-2.0", "library_name: transformers", "pipeline_tag: text-generation",
                 "base_model: Qwen/Qwen3-0.6B", "- dflash", "- speculative-decoding"):
        assert line in front, line
    for usage in ("assistant_model=drafter", "pipeline(", 'speculation_type="dflash"', "custom_generate=",
                  "vllm serve", "sglang.launch_server", "trust_remote_code=True"):
        assert usage in card, usage
    data = ModelCard(card).data.to_dict()
    assert {"dflash", "speculative-decoding", "custom_generate"} <= set(data["tags"])
    assert "# Qwen3-0.6B-DFlash\n" in card and "Not measured" in card  # no --metrics, no training results


def test_exported_drafter_loads_without_dflash_hf_and_is_lossless(exported, isolated_report):
    assert isolated_report["dflash_hf_imported"] == []
    check_lossless(isolated_report, exported["export"].folder, block_size=8)


def test_custom_generate_from_export_is_lossless_on_a_padded_batch(exported, isolated_report):
    check_custom_generate(isolated_report, exported["export"].folder, block_size=8)
    entry = isolated_report["folders"][str(exported["export"].folder)]
    assert entry["sampled_shape"][0] == 3 and entry["sampled_max_id"] < 96


def test_convert_keeps_every_tensor_byte_equal(exported):
    for source, result in ((exported["zlab"], exported["converted"]),
                           (exported["zlab_aliased"], exported["converted_aliased"])):
        before = tensor_bytes(source / "model.safetensors")
        after = tensor_bytes(result.folder / "model.safetensors")
        renamed = {("hidden_norm" + k[len("encoder.output_norm_enc"):] if k.startswith("encoder.output_norm_enc")
                    else k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in before.items()}
        assert after == renamed
    # Without aliases the weight file itself is copied unchanged.
    assert (exported["converted"].folder / "model.safetensors").read_bytes() == \
        (exported["zlab"] / "model.safetensors").read_bytes()
    config = json.loads((exported["converted"].folder / "config.json").read_text())
    original = json.loads((exported["zlab"] / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "dflash_draft"
    assert {k: v for k, v in config.items() if k in original and k not in ("auto_map", "model_type")} == \
        {k: v for k, v in original.items() if k not in ("auto_map", "model_type")}
    card = (exported["converted"].folder / "README.md").read_text()
    assert "license: mit" in card.split("---")[1]  # taken from the release's own card


def test_converted_release_loads_without_dflash_hf_and_is_lossless(exported, isolated_report):
    check_lossless(isolated_report, exported["converted"].folder, block_size=8)


@pytest.mark.parametrize("name", SPECS)
def test_converted_zlab_layouts_keep_tensors_and_run_lossless(name, exported, isolated_report):
    entry = exported["specs"][name]
    before = tensor_bytes(entry["release"] / "model.safetensors")
    assert tensor_bytes(entry["converted"].folder / "model.safetensors") == before
    config = json.loads((entry["converted"].folder / "config.json").read_text())
    assert config["dflash_config"]["target_layer_ids"] == ZLAB_SPECS[name]["target_layer_ids"]
    assert config["layer_types"] == ZLAB_SPECS[name]["layer_types"]
    folder = entry["converted"].folder
    check_assisted(isolated_report, folder, block_size=16)
    result = isolated_report["folders"][str(folder)]
    check_custom_generate(isolated_report, folder, block_size=16)


def test_convert_rejects_a_checkpoint_that_does_not_match_its_config(exported, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((exported["zlab"] / "config.json").read_text())
    config["hidden_size"] = 32  # the weights are 64 wide
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((exported["zlab"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="shape"):
        convert_zlab(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def cli(*args, env_extra=None, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("HF_TOKEN", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dflash_hf", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_cli_export_with_metrics_and_target_check(exported, tmp_path):
    drafter_dir = tmp_path / "drafter"
    exported["drafter"].save_pretrained(drafter_dir)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"hardware": "test rig", "results": [
        {"dataset": "humaneval", "tau": 3.25, "speedup": 2.5}, {"dataset": "gsm8k", "tau": 4.5, "speedup": 3.0}]}))
    out = tmp_path / "hub_upload" / "Tiny-DFlash"
    result = cli("export", drafter_dir, "--target", exported["target"], "--out", out, "--metrics", metrics,
                 "--base-model", "Qwen/Qwen3-0.6B", "--dtype", "keep")
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in result.stdout
    card = (out / "README.md").read_text()
    # A hand-written summary: tau per dataset and the speedups, in the text and in the model-index.
    assert "# Qwen3-0.6B-DFlash\n" in card and "Tiny-DFlash" not in card  # title: the model, not the folder
    assert "| humaneval | 3.25 |" in card and "| gsm8k | 4.50 |" in card
    assert "| – | humaneval | 2.50x |" in card and "Hardware and software: test rig" in card
    results = ModelCard(card).data.eval_results
    assert {(r.dataset_config, r.metric_type, r.metric_value) for r in results} == {
        ("humaneval", "mean_acceptance_length", 3.25), ("gsm8k", "mean_acceptance_length", 4.5),
        ("all", "speedup", 2.5), ("all", "speedup", 3.0)}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("fc.weight").dtype == torch.float32  # --dtype keep



def test_cli_export_refuses_overwrite_and_wrong_target(exported, tmp_path, capsys):
    drafter_dir = tmp_path / "drafter"
    exported["drafter"].save_pretrained(drafter_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = run_main(["export", drafter_dir, "--target", exported["target"], "--out", out], capsys)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").exists()
    # --overwrite replaces only a previous export, never a folder of the user's, nor the current folder.
    code, _, err = run_main(["export", drafter_dir, "--target", exported["target"], "--out", out, "--overwrite"],
                            capsys)
    assert code == 2 and "not a previous export" in err and (out / "keep.txt").read_text() == "user data"
    cwd = os.getcwd()
    try:
        os.chdir(out)
        code, _, err = run_main(["export", drafter_dir, "--target", exported["target"], "--out", ".", "--overwrite"],
                                capsys)
    finally:
        os.chdir(cwd)
    assert code == 2 and "current folder" in err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    code, _, err = run_main(["export", drafter_dir, "--target", exported["target"], "--out", out / "keep.txt"],
                            capsys)
    assert code == 2 and "is a file" in err
    previous = tmp_path / "previous"
    for _ in range(2):  # a previous export is replaced
        code, _, err = run_main(["export", drafter_dir, "--target", exported["target"], "--out", previous,
                                 "--overwrite"], capsys)
        assert code == 0, err
    assert (previous / "config.json").is_file() and not list(tmp_path.glob(".previous.*"))

    shallow = tmp_path / "shallow"
    tiny_target(layers=3).save_pretrained(shallow)
    code, _, err = run_main(["export", drafter_dir, "--target", shallow, "--out", tmp_path / "x"], capsys)
    assert code == 2
    assert "target_layer_ids [1, 3]" in err and "3 layers" in err
    assert not (tmp_path / "x").exists()

    code, _, err = run_main(["export", "bundled", "--target", shallow, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "export it with --target smollm2" in err


def test_cli_export_dry_run_lists_and_writes_nothing(exported, tmp_path):
    drafter_dir = tmp_path / "drafter"
    exported["drafter"].save_pretrained(drafter_dir)
    out = tmp_path / "never-written"
    dry = cli("export", drafter_dir, "--target", "Qwen/Qwen3-0.6B", "--out", out, "--dry-run", "--push", "me/tiny")
    assert dry.returncode == 0, dry.stderr
    assert "huggingface.co/me/tiny" in dry.stdout
    for name in ("config.json", "model.safetensors", "README.md", "custom_generate/generate.py"):
        assert re.search(rf"^\s+{re.escape(name)}\s", dry.stdout, flags=re.MULTILINE), name
    assert not out.exists()



def test_cli_push_needs_a_token_and_a_repo_id(exported, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))  # a login on this machine
    drafter_dir = tmp_path / "drafter"
    exported["drafter"].save_pretrained(drafter_dir)
    out = tmp_path / "never-written"
    code, _, err = run_main(["export", drafter_dir, "--target", "Qwen/Qwen3-0.6B", "--out", out, "--push",
                             "me/tiny"], capsys)
    assert code == 2 and "HF_TOKEN" in err
    assert not out.exists()  # failed before writing anything
    code, _, err = run_main(["export", drafter_dir, "--target", "Qwen/Qwen3-0.6B", "--out", out, "--push",
                             "not a repo"], capsys)
    assert code == 2 and "NAMESPACE/NAME" in err
    code, _, err = run_main(["convert", exported["zlab"], "--out", out, "--push", "me/tiny"], capsys)
    assert code == 2 and "HF_TOKEN" in err and not out.exists()


def test_cli_convert_dry_run_lists_and_writes_nothing(exported, tmp_path, capsys):
    out = tmp_path / "converted"
    code, stdout, _ = run_main(["convert", exported["zlab"], "--out", out, "--dry-run"], capsys)
    assert code == 0 and "model.safetensors" in stdout and "custom_generate/generate.py" in stdout
    assert not out.exists()


def test_exported_and_trained_weights_are_readable_like_other_files(exported, tmp_path):
    """safetensors writes weights 0600; an export (and a trained drafter) gives them the mode of its other files, so a
    shared model folder is readable by the users its config.json is readable by."""
    import os
    import stat

    from dflash_hf.training.recipe import save_drafter

    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    for folder in (exported["export"].folder, exported["converted"].folder):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
        assert modes["model.safetensors"] == want == modes["config.json"], modes
    saved = save_drafter(exported["drafter"], tmp_path / "trained", dtype=None)
    assert stat.S_IMODE((saved / "model.safetensors").stat().st_mode) == want


def _relative_imports(path: Path) -> set[str]:
    return set(re.findall(r"^from \.(\w+) import", path.read_text(), flags=re.M))


@pytest.mark.parametrize("entry", ["modeling/modeling_dflash.py", "modeling/dflash.py",
                                   "src/dflash_hf/data/custom_generate/generate.py"])
def test_remote_code_entry_files_import_every_module_they_need_directly(entry):
    """transformers 4.57 copies only the *direct* relative imports of a remote-code file (AutoModel's auto_map entries
    and custom_generate's generate.py): every module the entry needs, at any depth, must be imported by it directly,
    or loading from a Hub folder fails with a missing file on 4.57."""
    root = Path(__file__).resolve().parents[1]
    modeling = root / "modeling"
    direct = _relative_imports(root / entry)
    needed, todo = set(), list(direct)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(_relative_imports(modeling / f"{name}.py"))
    assert needed - {Path(entry).stem} <= direct, f"{entry} lacks direct imports of {sorted(needed - direct)}"
