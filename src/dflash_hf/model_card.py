"""The README.md model card of an exported drafter.

Built with `huggingface_hub.ModelCard` / `ModelCardData`: Hub metadata (license, `base_model`, tags, and measured
results as a `model-index` of `EvalResult`s), then the text: what the drafter is, a short summary of what was
measured, install and usage that need no dflash-hf install, a note on bf16 exactness, vLLM / SGLang commands and the
limitations.

Measured results come from one of (see `summarize_metrics`):

- the JSON that `dflash-hf bench` writes (`benchmarks/results/NAME.json`),
- the `metrics.json` that `dflash-hf train` writes beside the trained `drafter/` folder,
- a small hand-written summary: `{"hardware": ..., "dtype": ..., "command": ..., "prompts": ...,
  "results": [{"category": ..., "tau": ..., "speedup": ...}, ...]}`,

or, when none is given, from the drafter folder itself (`training_results`: the training `metrics.json` beside it,
else the "Measured tau" line of its `TRAINING.md`). Only a curated summary reaches the card (tau per prompt category,
speedup against transformers' static-cache greedy decoding, hardware, dtype, versions, the command); file-system
paths never do.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

MODEL_TYPE = "dflash_draft"
TAU_METRIC = "mean_acceptance_length"
SPEEDUP_METRIC = "speedup"
PAPER = "https://arxiv.org/abs/2602.06036"

# How the card names the prompt sets that bench and train label their prompts with (dflash_hf.prompts).
_PROMPT_SETS = (
    ("dflash_hf.prompts.eval_prompts", "dflash-hf's independent evaluation set", "dflash_hf_eval_prompts"),
    ("dflash_hf.prompts.build_prompts(split='heldout')",
     "the held-out split of dflash-hf's training prompts (in-distribution)", "dflash_hf_heldout_prompts"),
)
# DFlash rows of a bench JSON, most representative first: the engine with its CUDA defaults, then the rest.
_DFLASH_METHODS = ("dflash_loop_compiled", "dflash_generate_compiled", "dflash_loop_graphs", "dflash_generate",
                   "dflash_loop_eager", "hf_dflash")
# Flags of dflash-hf commands whose value is a local path, and the placeholder the card shows instead; values that
# are not paths (bundled, smollm2, random:N) are kept.
_PATH_FLAGS = {"--drafter": "DRAFTER", "--target": "TARGET", "--prompt-file": "PROMPTS.json", "--data": "DATA.jsonl",
               "--output": "OUTPUT", "--init-from": "DRAFTER"}
_KEEP_VALUES = {"bundled", "smollm2", "default"}
# Where a command wrote its results: meaningless elsewhere, left out of the card.
_DROP_FLAGS = {"--results-dir", "--out"}
_LOOKS_LIKE_PATH = re.compile(r"^(~|/|\.{1,2}/|[A-Za-z]:[\\/])|[\\/]")


@dataclass
class Speedup:
    batch_size: int | None
    method: str
    tokens_per_second: float
    baseline_tokens_per_second: float
    speedup: float
    tau: float | None = None
    prompts: str | None = None  # where the speed was measured, when not on the prompts tau was measured on


@dataclass
class Measured:
    """A curated summary of measured results, all the card shows of a metrics file."""

    origin: str  # who measured: "`dflash-hf bench`", "`dflash-hf train`", ...
    prompts: str  # which prompts, in words
    dataset_type: str  # the model-index dataset type of those prompts
    tau: float | None = None
    tau_per_category: dict[str, float] = field(default_factory=dict)
    speedups: list[Speedup] = field(default_factory=list)
    hardware: str | None = None
    dtype: str | None = None
    software: str | None = None
    command: str | None = None
    details: list[str] = field(default_factory=list)  # short sentences on the settings (prompts, tokens, EOS)
    untrained: bool = False

    @property
    def empty(self) -> bool:
        return self.tau is None and not self.tau_per_category and not self.speedups


# ----------------------------------------------------------------------------------------------------------------------
# Reading measured results
# ----------------------------------------------------------------------------------------------------------------------


def prompt_set(source: str | None) -> tuple[str, str]:
    """`(words, model-index dataset type)` for a prompt-source label written by bench or train."""
    text = str(source or "")
    for prefix, words, kind in _PROMPT_SETS:
        if text.startswith(prefix):
            return words, kind
    if "independent" in text:
        return _PROMPT_SETS[0][1], _PROMPT_SETS[0][2]
    if "held-out" in text or "heldout" in text:
        return _PROMPT_SETS[1][1], _PROMPT_SETS[1][2]
    return "a prompt file of its own", "custom_prompts"


def scrub_command(command) -> str | None:
    """A dflash-hf command line as the card shows it: the program as `dflash-hf`, local paths replaced by
    placeholders (`--drafter DRAFTER`), output locations (`--results-dir`, `--out`) left out."""
    if not command:
        return None
    args = list(command) if isinstance(command, (list, tuple)) else shlex.split(str(command))
    args = [str(a) for a in args]
    # The program: `python -m dflash_hf`, a console script at some path, or torchrun ... -m dflash_hf.
    for i, arg in enumerate(args):
        if arg == "dflash_hf" and i > 0 and args[i - 1] == "-m":
            args = ["dflash-hf", *args[i + 1:]]
            break
        if Path(arg).name in ("dflash-hf", "__main__.py"):
            args = ["dflash-hf", *args[i + 1:]]
            break
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        flag, eq, value = arg.partition("=")
        if flag in _DROP_FLAGS:
            skip = not eq
            continue
        if flag in _PATH_FLAGS and eq:
            out.append(f"{flag}={_placeholder(flag, value)}")
            continue
        if i > 0 and args[i - 1] in _PATH_FLAGS:
            out.append(_placeholder(args[i - 1], arg))
            continue
        out.append("PATH" if _LOOKS_LIKE_PATH.search(arg) and not arg.startswith("-") else arg)
    return shlex.join(out)


def _placeholder(flag: str, value: str) -> str:
    if value.lower() in _KEEP_VALUES or value.lower().startswith("random:"):
        return value
    return _PATH_FLAGS[flag]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def from_bench(payload: dict) -> Measured:
    """The summary of a `dflash-hf bench` JSON: tau per category of its most representative DFlash row at batch 1,
    and per batch size that row's speedup against `ar_static` (HF greedy generate with a static cache)."""
    env, settings = payload.get("environment") or {}, payload.get("settings") or {}
    rows = [r for r in payload.get("results") or [] if isinstance(r, dict) and r.get("status") == "ok"
            and r.get("reported", True)]

    def rank(row):
        method = row.get("method", "")
        return _DFLASH_METHODS.index(method) if method in _DFLASH_METHODS else len(_DFLASH_METHODS)

    dflash = sorted((r for r in rows if str(r.get("method", "")).startswith(("dflash", "hf_dflash"))), key=rank)
    words, kind = prompt_set(settings.get("prompt_source"))
    measured = Measured(origin="`dflash-hf bench`", prompts=words, dataset_type=kind,
                        untrained=settings.get("drafter_trained") is False)
    if env.get("device", "").startswith("cuda"):
        measured.hardware = env.get("gpu_name") or "a CUDA GPU"
    elif env:
        measured.hardware = f"CPU ({env['cpu_count']} cores)" if env.get("cpu_count") else "CPU"
    measured.dtype = env.get("dtype")
    if env.get("torch") and env.get("transformers"):
        measured.software = f"torch {env['torch']}, transformers {env['transformers']}"
    measured.command = scrub_command(payload.get("command"))

    batch1 = [r for r in dflash if r.get("batch_size") == 1]
    headline = next((r for r in batch1 if r.get("per_category")), batch1[0] if batch1 else None)
    if headline is None and dflash:
        headline = dflash[0]
    if headline is not None:
        measured.tau = _number(headline.get("tau"))
        for category, entry in (headline.get("per_category") or {}).items():
            tau = _number((entry or {}).get("tau"))
            if tau is not None:
                measured.tau_per_category[str(category)] = tau
    baseline = {r["batch_size"]: r for r in rows if r.get("method") == "ar_static"}
    for batch in sorted({r.get("batch_size") for r in dflash if isinstance(r.get("batch_size"), int)}):
        row = next((r for r in dflash if r.get("batch_size") == batch and _number(r.get("speedup_vs_ar_static"))),
                   None)
        if row is None or batch not in baseline:
            continue
        measured.speedups.append(Speedup(
            batch_size=batch, method=str(row.get("label") or row.get("method")),
            tokens_per_second=float(row["tokens_per_second"]),
            baseline_tokens_per_second=float(baseline[batch]["tokens_per_second"]),
            speedup=float(row["speedup_vs_ar_static"]), tau=_number(row.get("tau"))))

    prompts = settings.get("prompts") or []
    if prompts:
        categories = sorted({str(p.get("category")) for p in prompts})
        template = "with the chat template" if settings.get("chat_template") else "without a chat template"
        measured.details.append(f"{len(prompts)} prompts ({', '.join(categories)}) {template}")
    if settings.get("max_new_tokens"):
        stop = ("each answer stopping at the target's end of turn" if settings.get("stop_token_ids")
                else "end of turn ignored, so every answer is exactly that long")
        measured.details.append(f"greedy, up to {settings['max_new_tokens']} new tokens, {stop}")
    return measured


def from_training_metrics(payload: dict) -> Measured:
    """The summary of the `metrics.json` that `dflash-hf train` writes: the final tau on its evaluation prompts."""
    run = payload.get("run") or {}
    source = payload.get("eval_source") or run.get("eval_source")
    if source is None:
        evals = payload.get("evals") or []
        source = (evals[-1] or {}).get("source") if evals else None
    words, kind = prompt_set(source)
    if source is None:
        words, kind = "its evaluation prompts", "dflash_hf_eval_prompts"
    measured = Measured(origin="`dflash-hf train` (final evaluation)", prompts=words, dataset_type=kind,
                        tau=_number(payload.get("final_tau")))
    for category, tau in (payload.get("final_tau_per_category") or {}).items():
        if _number(tau) is not None:
            measured.tau_per_category[str(category)] = float(tau)
    measured.dtype = str(run["dtype"]).replace("torch.", "") if run.get("dtype") else None
    device = str(run.get("device") or "")
    measured.hardware = "a CUDA GPU" if device.startswith("cuda") else ("CPU" if device else None)
    if run.get("torch") and run.get("transformers"):
        measured.software = f"torch {run['torch']}, transformers {run['transformers']}"
    measured.command = scrub_command(run.get("argv"))
    if run.get("eval_prompts"):
        measured.details.append(f"{run['eval_prompts']} prompts, greedy, with the real decode loop")
    return measured


def from_summary(data) -> Measured:
    """A hand-written summary: `{"results": [{"category" (or "dataset"), "tau", "speedup"}], "hardware", "dtype",
    "command", "prompts"}` (or just the list of rows). Other keys are ignored."""
    info = data if isinstance(data, dict) else {}
    rows = info.get("results", []) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("--metrics: 'results' must be a list of objects such as "
                         '{"category": "code", "tau": 3.2, "speedup": 2.1}.')
    words = str(info.get("prompts") or "the prompts named below")
    measured = Measured(origin="the publisher", prompts=words, dataset_type=prompt_set(words)[1],
                        hardware=_text(info.get("hardware")), dtype=_text(info.get("dtype")),
                        command=scrub_command(info.get("command")))
    for row in rows:
        category = str(row.get("category") or row.get("dataset") or row.get("task") or "all")
        tau, speedup = _number(row.get("tau")), _number(row.get("speedup"))
        if tau is not None:
            if category == "all":
                measured.tau = tau
            else:
                measured.tau_per_category[category] = tau
        if speedup is not None:
            batch = row.get("batch_size")
            measured.speedups.append(Speedup(batch_size=batch if isinstance(batch, int) else None,
                                              method=category if category != "all" else "DFlash",
                                              tokens_per_second=_number(row.get("tokens_per_second")) or float("nan"),
                                              baseline_tokens_per_second=float("nan"), speedup=speedup, tau=tau))
    return measured


def _text(value) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return None if _LOOKS_LIKE_PATH.match(text) else text


def summarize_metrics(data, *, config: dict | None = None) -> Measured:
    """The `Measured` summary of a `--metrics` JSON (bench, training or hand-written; see the module docstring).
    With `config` (the export's config.json), a bench JSON of another drafter (other target layers or block size) is
    refused."""
    if isinstance(data, Measured):
        return data
    if isinstance(data, dict) and isinstance(data.get("settings"), dict) and isinstance(data.get("results"), list):
        if config is not None:
            _check_same_drafter(data["settings"], config)
        measured = from_bench(data)
    elif isinstance(data, dict) and "final_tau" in data:
        measured = from_training_metrics(data)
    elif isinstance(data, (dict, list)):
        measured = from_summary(data)
    else:
        raise ValueError("--metrics JSON must be an object: a `dflash-hf bench` results file, a training "
                         "metrics.json, or {\"results\": [{\"category\": ..., \"tau\": ..., \"speedup\": ...}]}.")
    if measured.empty:
        raise ValueError("--metrics holds no measured tau or speedup (expected a `dflash-hf bench` results file, a "
                         "training metrics.json, or {\"results\": [{\"category\": ..., \"tau\": ...}]}).")
    return measured


def _check_same_drafter(settings: dict, config: dict) -> None:
    nested = config.get("dflash_config") or {}
    ids = config.get("target_layer_ids") or nested.get("target_layer_ids")
    measured_ids = settings.get("target_layer_ids")
    block, measured_block = config.get("block_size"), settings.get("block_size")
    if (ids is not None and measured_ids is not None and list(ids) != list(measured_ids)) or \
            (block is not None and measured_block is not None and block != measured_block):
        raise ValueError(
            f"--metrics measured a drafter with target_layer_ids {measured_ids} and block size {measured_block}, but "
            f"this export has {list(ids) if ids is not None else None} and {block}: it is another drafter's "
            "benchmark. Pass the results of `dflash-hf bench --drafter` run on this drafter."
        )


def from_training_md(text: str) -> Measured | None:
    """The measured tau (and benchmark speedup) that a drafter's TRAINING.md states, e.g.

        Measured tau on 48 held-out prompts (greedy, bf16, ...): **chat 1.87, code 3.61, math 5.67** (all 2.91).
        On the 12-prompt benchmark at batch 1: 877.5 tokens/s against 313.1 for HF's static cache + compile (2.80x)

    None when it states none."""
    flat = " ".join(text.replace("\u2011", "-").split())
    match = re.search(r"[Mm]easured tau on ([^:*]{3,200}?):\s*\*\*([^*]+)\*\*(?:\s*\(all (\d+(?:\.\d+)?)\))?", flat)
    if not match:
        return None
    kind = prompt_set(match.group(1))[1]
    measured = Measured(origin="the run that trained it (its TRAINING.md)", prompts=match.group(1).strip(),
                        dataset_type=kind)
    measured.tau_per_category = {name: float(value) for name, value in
                                 re.findall(r"([A-Za-z][\w-]*)\s+(\d+(?:\.\d+)?)", match.group(2))}
    measured.tau = float(match.group(3)) if match.group(3) else None
    where = re.search(r"[Tt]rained on (?:one |an? )?([^(.]{3,60}?)\s*\(([^)]{3,80})\)", flat)
    if where:
        measured.hardware = where.group(1).strip()
        measured.software = where.group(2).strip()
    if re.search(r"\bbf16\b|bfloat16", match.group(1)):
        measured.dtype = "bfloat16"
    bench = re.search(r"On the ([^:]{3,80}?) at batch (\d+):\s*([\d,]+(?:\.\d+)?) tokens/s against "
                      r"([\d,]+(?:\.\d+)?) for ([^(]{3,80}?)\s*\((\d+(?:\.\d+)?)x\)(?:,\s*tau (\d+(?:\.\d+)?))?", flat)
    if bench:
        measured.speedups.append(Speedup(
            batch_size=int(bench.group(2)), method="dflash-hf's engine", tokens_per_second=float(bench.group(3).replace(",", "")),
            baseline_tokens_per_second=float(bench.group(4).replace(",", "")), speedup=float(bench.group(6)),
            tau=float(bench.group(7)) if bench.group(7) else None, prompts=f"dflash-hf's {bench.group(1).strip()}"))
    return None if measured.empty else measured


def training_results(folder: str | Path | None) -> Measured | None:
    """Measured results a drafter folder carries: the `metrics.json` of `dflash-hf train` (beside a trained
    `OUTPUT/drafter/`, or inside the folder), else its TRAINING.md. None when there are none."""
    if folder is None:
        return None
    folder = Path(folder)
    for candidate in (folder / "metrics.json", folder.parent / "metrics.json"):
        if candidate.is_file() and (candidate.parent == folder or folder.name == "drafter"):
            try:
                data = json.loads(candidate.read_text())
            except ValueError:
                continue
            if isinstance(data, dict) and _number(data.get("final_tau")) is not None:
                return from_training_metrics(data)
    notes = folder / "TRAINING.md"
    if notes.is_file():
        return from_training_md(notes.read_text(errors="replace"))
    return None


# ----------------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------------


def card_title(*, name: str | None, repo_id: str | None, base_model: str | None, source: str | None = None) -> str:
    """The card's title: `name`, else the repo's name, else the release converted, else `<target>-DFlash`."""
    if name:
        return name
    if repo_id:
        return repo_id.rsplit("/", 1)[-1]
    if source:
        return source
    if base_model:
        return f"{base_model.rsplit('/', 1)[-1]}-DFlash"
    return "DFlash drafter"


def eval_results(measured: Measured | None) -> list[EvalResult]:
    """The model-index entries of `measured`: tau per category (dataset config = category, "all" = pooled) and the
    speedup per batch size."""
    if measured is None:
        return []
    dataset = {"task_type": "text-generation", "dataset_type": measured.dataset_type,
               "dataset_name": measured.prompts}
    results = []
    taus = dict(measured.tau_per_category)
    if measured.tau is not None:
        taus["all"] = measured.tau
    for category, tau in taus.items():
        results.append(EvalResult(**dataset, dataset_config=category, metric_type=TAU_METRIC,
                                  metric_value=round(tau, 3), metric_name=f"Mean acceptance length tau ({category})"))
    for s in measured.speedups:
        batch = f"batch {s.batch_size}" if s.batch_size is not None else None
        where = ", ".join(x for x in (batch, s.method if s.prompts is None and batch is None else None,
                                      measured.hardware, measured.dtype) if x)
        if s.prompts:
            dataset = {**dataset, "dataset_type": "dflash_hf_bench_prompts", "dataset_name": s.prompts}
        results.append(EvalResult(**dataset, dataset_config="all", metric_type=SPEEDUP_METRIC,
                                  metric_value=round(s.speedup, 3),
                                  metric_name=f"Speedup vs HF static-cache greedy generate ({where})"))
    return results


def _batch(speedup: Speedup) -> str:
    return "–" if speedup.batch_size is None else str(speedup.batch_size)


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:,.{digits}f}"


def results_markdown(measured: Measured | None, *, block: int) -> str:
    if measured is None:
        return ("## Measured results\n\nNot measured for this export yet. Acceptance length (tau) and speedup depend "
                "on the task, the chat template and the hardware; measure on your own prompts before relying on a "
                "number.\n")
    lines = ["## Measured results", ""]
    lines.append(f"Measured by {measured.origin} on {measured.prompts}" +
                 (f": {'; '.join(measured.details)}" if measured.details else "") + ".")
    hardware = "; ".join(x for x in (", ".join(x for x in (measured.hardware, measured.dtype) if x), measured.software)
                         if x)
    if hardware:
        lines[-1] += f" Hardware and software: {hardware}."
    if measured.untrained:
        lines += ["", "> These numbers were measured with an **untrained** drafter (random weights)."]
    taus = dict(measured.tau_per_category)
    if measured.tau is not None:
        taus["all"] = measured.tau
    if taus:
        lines += ["", f"Mean acceptance length tau: tokens committed per target forward, the target's own token "
                      f"included (1 = no gain, {block} = the block size, the ceiling).", "",
                  "| prompts | tau |", "|---|---|"]
        lines += [f"| {category} | {_num(tau)} |" for category, tau in taus.items()]
    if measured.speedups:
        where = {s.prompts for s in measured.speedups}
        where = f"on {where.pop()}" if len(where) == 1 and None not in where else "on the same prompts"
        lines += ["", "Speed against transformers' fastest plain greedy decoding (`generate` with a static cache, "
                      f"compiled on CUDA), {where}:", ""]
        rates = any(s.tokens_per_second == s.tokens_per_second for s in measured.speedups)  # not all NaN
        if rates:
            lines += ["| batch size | DFlash run | DFlash tokens/s | static-cache greedy tokens/s | speedup |",
                      "|---|---|---|---|---|"]
            lines += [f"| {_batch(s)} | {s.method} | {_num(s.tokens_per_second, 1)} | "
                      f"{_num(s.baseline_tokens_per_second, 1)} | {s.speedup:.2f}x |" for s in measured.speedups]
        else:
            lines += ["| batch size | DFlash run | speedup |", "|---|---|---|"]
            lines += [f"| {_batch(s)} | {s.method} | {s.speedup:.2f}x |" for s in measured.speedups]
    if measured.command:
        lines += ["", "Command (dflash-hf, installed from a clone of its source repository; words in capitals stand "
                      "for local folders, `DRAFTER` for this repository):", "", "```bash", measured.command, "```"]
    lines += ["", "tau and speed depend on the prompts (code and math accept more than open chat), the chat template "
                  "and the hardware; measure on your own prompts before relying on a number."]
    return "\n".join(lines) + "\n"


def build_model_card(*, config: dict, base_model: str | None, n_params: int, name: str | None = None,
                     repo_id: str | None = None, metrics=None, license: str = "apache-2.0",
                     source: str | None = None, trained: bool = True, custom_generate: bool = True) -> ModelCard:
    """The model card of an export (`config` is its config.json). `metrics`: a `Measured`, or a JSON document for
    `summarize_metrics`, or None (not measured)."""
    measured = summarize_metrics(metrics, config=config) if metrics is not None else None
    title = card_title(name=name, repo_id=repo_id, base_model=base_model, source=source)
    repo = repo_id or f"<namespace>/{title}"
    target = base_model or "<target model id>"
    nested = config.get("dflash_config") or {}
    ids = config.get("target_layer_ids") or nested.get("target_layer_ids")
    mask = config.get("mask_token_id", nested.get("mask_token_id"))
    block = config.get("block_size", 16)
    tags = ["dflash", "speculative-decoding", "block-diffusion", "custom_code"]
    if custom_generate:
        tags.append("custom_generate")
    data = ModelCardData(
        license=license, library_name="transformers", pipeline_tag="text-generation", base_model=base_model,
        tags=tags, model_name=title, eval_results=eval_results(measured) or None,
    )
    text = f"---\n{data.to_yaml()}\n---\n\n" + _body(
        title=title, repo=repo, target=target, config=config, ids=ids, mask=mask, block=block, n_params=n_params,
        measured=measured, source=source, trained=trained, custom_generate=custom_generate)
    return ModelCard(text)


def model_card(**kwargs) -> str:
    """README.md text of `build_model_card(**kwargs)`."""
    return str(build_model_card(**kwargs))


def _body(*, title, repo, target, config, ids, mask, block, n_params, measured, source, trained,
          custom_generate) -> str:
    warn = ""
    if not trained:
        warn = ("\n> **Untrained weights.** This export holds randomly initialised weights, useful only to test the "
                "plumbing: expect an acceptance length near 1 and no speedup.\n")
    provenance = f"\nConverted from `{source}` without changing a tensor.\n" if source else ""
    custom = ""
    if custom_generate:
        custom = f"""
Batches (left-padded) through this repository's `custom_generate/`, the same engine as a transformers
[custom generation method](https://huggingface.co/docs/transformers/generation_strategies#custom-generation-methods):

```python
tokenizer.padding_side = "left"
batch = tokenizer.apply_chat_template([messages, [{{"role": "user", "content": "Explain RoPE briefly."}}]],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                      padding=True).to(device)
out = target.generate(**batch, custom_generate="{repo}", trust_remote_code=True, assistant_model=drafter,
                      max_new_tokens=256)
print(tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
```

`custom_generate` takes `assistant_model` (required: the drafter loaded as above) plus every argument of
`generate`, and returns what `generate` returns; `cuda_graphs=` and `compile=` switch the engine's CUDA graphs and
`torch.compile`.
"""
    return f"""# {title}

A [DFlash]({PAPER}) block-diffusion **drafter** for speculative decoding with
[`{target}`](https://huggingface.co/{target}). DFlash drafts a whole block of {block - 1} tokens in one forward pass
of a small model that reads the target's hidden states; the target verifies the block in one forward pass and keeps
the longest prefix it agrees with, so greedy decoding returns the target's own greedy output (exactly in float32; see
[bf16](#exactness-and-bf16)) and sampling follows the target's distribution.
{warn}{provenance}
| | |
|---|---|
| draft layers | {config.get("num_hidden_layers")} |
| hidden size | {config.get("hidden_size")} |
| block size | {block} |
| target layers read (`target_layer_ids`) | {ids} |
| mask token id | {mask} |
| parameters | {n_params / 1e6:.1f} M (no embedding or LM head: the target's are used) |

The weights follow z-lab's released layout (`fc`, `hidden_norm`, `layers.N.*`, `norm`).

{results_markdown(measured, block=block)}
## Install

```bash
pip install torch "transformers>=4.57.1"
```

That is all: the model code ships in this repository (`configuration_dflash.py`, `modeling_dflash.py`, ...) and
loads with `trust_remote_code=True`. The dflash-hf tools that made it (training, benchmarks, an OpenAI-compatible
server) are not on PyPI; they install from a clone of the dflash-hf source repository with `pip install -e .`.

## Usage with transformers

```python
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32  # float32 is exact, bf16 see below

target = AutoModelForCausalLM.from_pretrained("{target}", dtype=dtype).to(device)
tokenizer = AutoTokenizer.from_pretrained("{target}")
drafter = AutoModel.from_pretrained("{repo}", trust_remote_code=True, dtype=dtype).to(device)

messages = [{{"role": "user", "content": "Write a Python function that checks whether a number is prime."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(device)

# Loading the drafter routes generate(assistant_model=drafter) to the batched DFlash engine (left-padded batches
# work too; CUDA graphs on CUDA, dflash_compile=True to also torch.compile it).
out = target.generate(**inputs, assistant_model=drafter, max_new_tokens=256, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print("mean acceptance length:", drafter.last_stats.mean_acceptance_length)
```

The text-generation pipeline (pass the loaded drafter object, not its name):

```python
from transformers import pipeline

pipe = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=drafter)
print(pipe(messages, max_new_tokens=128, do_sample=False)[0]["generated_text"][-1]["content"])
```

transformers' own DFlash route (transformers >= 5.15.1; one sequence at a time):

```python
out = target.generate(**inputs, assistant_model=drafter, speculation_type="dflash", max_new_tokens=256)
```
{custom}
Load target and drafter with the same dtype and on the same device. For a target that needs several GPUs, load it
with `device_map="auto"` (which needs `pip install accelerate`) and move the drafter to `target.device`. The
dflash-hf package, where installed, exposes the same engine as `dflash_hf.DFlashDecoder(target, drafter)`.

## Exactness and bf16

Greedy decoding with this drafter returns exactly the target's own greedy output in float32. In bfloat16 (or
float16) the target scores a drafted block in one forward pass where plain `generate` scores one token at a time;
the two round differently, so where two candidate tokens are nearly tied the greedy choice can flip, and from there
the output can differ from plain `generate` after some tokens. This is rounding, as in any bf16 speculative decoder,
not the drafter choosing tokens: every token is still the target's own choice. Use float32 where exact equality
matters.

## Usage with vLLM and SGLang

The weights and the nested `dflash_config` are in z-lab's layout, which both servers read. Use `block_size - 1 =
{block - 1}` speculative tokens:

```bash
vllm serve {target} \\
  --speculative-config '{{"method": "dflash", "model": "{repo}", "num_speculative_tokens": {block - 1}}}'

python -m sglang.launch_server --model-path {target} \\
  --speculative-algorithm DFLASH --speculative-draft-model-path {repo} \\
  --speculative-num-draft-tokens {block} --trust-remote-code
```

This config says `"model_type": "{MODEL_TYPE}"` (so transformers picks the code in this repository). A server version
that insists on z-lab's original `"model_type": "qwen3"` needs that one value changed back in a local copy; the
weights need no change.

## Limitations

- `generate(assistant_model=drafter)`, the pipeline and `custom_generate` run the batched engine; transformers'
  native route (`speculation_type="dflash"`) runs one sequence at a time.
- The drafter must run with the target it was trained for: `target_layer_ids` index that target's layers and the
  drafter borrows its embedding and LM head.
- Acceptance is highest on the kind of text the drafter was trained on, and drops with a chat template or thinking
  mode that differs from training.
"""


__all__ = [
    "Measured",
    "Speedup",
    "build_model_card",
    "card_title",
    "eval_results",
    "from_bench",
    "from_training_md",
    "from_training_metrics",
    "model_card",
    "scrub_command",
    "summarize_metrics",
    "training_results",
]
