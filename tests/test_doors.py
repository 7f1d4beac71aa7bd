"""The doors users know, `target.generate(assistant_model=drafter)` and `pipeline(..., assistant_model=drafter)`, run
the batched DFlash engine: left-padded batches, transformers' output format, and every generation option either
served by the engine, served on the stock assisted loop with a warning (batch 1), or refused with its name.

Exactness is checked row by row: each row of a batch must equal that row generated alone by plain greedy
`target.generate` (fp32, tiny random targets of three families).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from helpers import (StopAfterToken, first_new_token_after, greedy, random_prompt, tiny_chat_tokenizer, tiny_drafter,
                     tiny_target, tiny_tokenizer)
from transformers import GenerationMixin, StoppingCriteriaList, pipeline
from transformers.generation.utils import GenerateDecoderOnlyOutput

from dflash_hf import DFlashDecoder
from dflash_hf.modeling import integration_dflash

PAD = 0


def left_padded(prompts: list[torch.LongTensor]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`[n, 1, len_i]` prompts -> left-padded `input_ids` and `attention_mask` `[n, max_len]`."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - p.shape[1]:] = p[0]
        mask[r, width - p.shape[1]:] = 1
    return ids, mask


def expected_batch(target, prompts, ids, new: int, **kw) -> torch.LongTensor:
    """What generate must return for the left-padded batch: each row's own greedy continuation after its padded
    prompt, rows that end early padded with PAD, as wide as the longest row."""
    rows = [greedy(target, p, new, pad_token_id=PAD, **kw)[0, p.shape[1]:] for p in prompts]
    width = max(len(r) for r in rows)
    tail = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        tail[i, : len(r)] = r
    return torch.cat([ids, tail], dim=1)


PROMPTS = [random_prompt(n, seed=40 + n) for n in (5, 9, 3)]


@pytest.mark.parametrize("kind", ["random", "oracle"])
def test_left_padded_batch_equals_each_row_alone(target, kind, oracle):
    drafter = oracle if kind == "oracle" else tiny_drafter(target)
    ids, mask = left_padded(PROMPTS)
    free = greedy(target, PROMPTS[0], 30, eos_token_id=None)[0, 5:].tolist()
    _, eos = first_new_token_after(free, 6)  # row 0 stops early, the others may run to the budget
    expected = expected_batch(target, PROMPTS, ids, 30, eos_token_id=eos)
    out = target.generate(ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=30, do_sample=False,
                          eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out, expected)
    assert drafter.last_stats.steps > 0
    if kind == "oracle":
        assert max(drafter.last_stats.acceptance_lengths) > 1


def test_batch_of_one_runs_on_the_engine_and_reuses_it(target):
    drafter = tiny_drafter(target)
    prompt = random_prompt(7, seed=3)
    expected = greedy(target, prompt, 20)
    assert torch.equal(greedy(target, prompt, 20, assistant_model=drafter), expected)
    engine = drafter._dflash_engine.engine
    assert isinstance(engine, DFlashDecoder) and engine.target is target
    assert torch.equal(greedy(target, prompt[:, :4], 11, assistant_model=drafter), greedy(target, prompt[:, :4], 11))
    assert drafter._dflash_engine.engine is engine  # same pair, same options: caches kept between calls
    long_prompt = random_prompt(300, seed=4)
    assert torch.equal(greedy(target, long_prompt, 10, assistant_model=drafter), greedy(target, long_prompt, 10))
    assert drafter._dflash_engine.engine.max_length >= 310  # grown for the longer call
    # The engine belongs to this drafter object: a copy or a pickle starts without one, and works.
    copied = copy.deepcopy(drafter)
    assert copied._dflash_engine.engine is None
    assert torch.equal(greedy(target, prompt, 20, assistant_model=copied), expected)
    buffer = io.BytesIO()
    torch.save(drafter, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False)._dflash_engine.engine is None


def test_return_dict_in_generate(target, oracle):
    ids, mask = left_padded(PROMPTS)
    expected = expected_batch(target, PROMPTS, ids, 12, eos_token_id=None)
    out = target.generate(ids, attention_mask=mask, assistant_model=oracle, max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, expected)
    assert out.scores is None and out.logits is None
    with pytest.raises(ValueError, match="output_scores=True"):
        target.generate(ids, attention_mask=mask, assistant_model=oracle, max_new_tokens=12, do_sample=False,
                        return_dict_in_generate=True, output_scores=True)


def test_max_length_min_new_tokens_and_eos_list(target, oracle):
    ids, mask = left_padded(PROMPTS)
    free = greedy(target, PROMPTS[1], 30, eos_token_id=None)[0, 9:].tolist()
    _, eos_a = first_new_token_after(free, 1)
    _, eos_b = first_new_token_after(free, 3)
    kw = dict(eos_token_id=[eos_a, eos_b], min_new_tokens=6)
    width = ids.shape[1]
    for length_kw, new in ((dict(max_new_tokens=25), 25), (dict(max_length=width + 25), 25)):
        expected = expected_batch(target, PROMPTS, ids, new, **kw)
        assert (expected[:, width : width + 6] != PAD).all()  # nobody stopped before min_new_tokens
        for drafter in (oracle, tiny_drafter(target)):
            out = target.generate(ids, attention_mask=mask, assistant_model=drafter, do_sample=False,
                                  pad_token_id=PAD, **length_kw, **kw)
            assert torch.equal(out, expected)



def test_stop_strings_and_stopping_criteria_in_a_batch(target, oracle):
    tokenizer = tiny_chat_tokenizer()  # one character per token, so stop strings can span tokens
    ids, mask = left_padded(PROMPTS)
    free = [greedy(target, p, 30, eos_token_id=None)[0, p.shape[1]:].tolist() for p in PROMPTS]
    stop = tokenizer.decode(free[2][3:5])  # row 2's fourth and fifth tokens, as text
    alone = [greedy(target, p, 30, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer)[0, p.shape[1]:]
             for p in PROMPTS]
    assert len(alone[2]) <= 5  # a row that really stops on the string
    for drafter in (oracle, tiny_drafter(target)):
        out = target.generate(ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=30, do_sample=False,
                              eos_token_id=None, pad_token_id=PAD, stop_strings=[stop], tokenizer=tokenizer)
        assert out.shape[1] == ids.shape[1] + max(len(row) for row in alone)
        for r, row in enumerate(alone):
            got = out[r, ids.shape[1]:]
            assert torch.equal(got[: len(row)], row) and (got[len(row):] == PAD).all(), r
        # A user criterion, checked on each row with its own padded prompt in front, as transformers does.
        criteria = StoppingCriteriaList([StopAfterToken(free[2][4], ids.shape[1])])
        out = target.generate(ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=30,
                              do_sample=False, eos_token_id=None, pad_token_id=PAD, stopping_criteria=criteria)
        for r, p in enumerate(PROMPTS):
            row = greedy(target, p, 30, eos_token_id=None,
                         stopping_criteria=StoppingCriteriaList([StopAfterToken(free[2][4], p.shape[1])]))[0, p.shape[1]:]
            got = out[r, ids.shape[1]:]
            assert torch.equal(got[: len(row)], row) and (got[len(row):] == PAD).all(), r


def test_pipeline_list_of_prompts_in_batches(target, oracle):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    texts = [tokenizer.decode(p[0]) for p in PROMPTS]
    plain = pipeline("text-generation", model=target, tokenizer=tokenizer)
    expected = [plain(t, max_new_tokens=15, do_sample=False)[0]["generated_text"] for t in texts]
    assisted = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=oracle)
    got = assisted(texts, max_new_tokens=15, do_sample=False, batch_size=3)
    assert [g[0]["generated_text"] for g in got] == expected
    assert oracle.last_stats.steps > 0


def test_unsupported_processor_warns_once_at_batch_one_and_raises_for_a_batch(target, oracle, monkeypatch):
    monkeypatch.setattr(integration_dflash, "_warned", set())
    prompt = random_prompt(8, seed=8)
    expected = greedy(target, prompt, 20, repetition_penalty=1.5)
    with pytest.warns(UserWarning, match="repetition_penalty"):
        assert torch.equal(greedy(target, prompt, 20, assistant_model=oracle, repetition_penalty=1.5), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert torch.equal(greedy(target, prompt, 20, assistant_model=oracle, repetition_penalty=1.5), expected)
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match=r"batch of 3 cannot honour repetition_penalty"):
        target.generate(ids, attention_mask=mask, assistant_model=oracle, max_new_tokens=5,
                        repetition_penalty=1.5)


def test_engine_options(monkeypatch):
    """`dflash_cuda_graphs` and `dflash_compile` reach the engine (a new engine when they change) and are popped
    before transformers validates the kwargs; without a DFlash drafter they are not ours and transformers refuses them."""
    target = tiny_target("qwen3", layers=4)  # one family: compiling on CPU takes seconds
    drafter = tiny_drafter(target)
    prompt = random_prompt(6, seed=9)
    expected = greedy(target, prompt, 10)
    built = []
    real = integration_dflash.DFlashDecoder

    def recording(*args, **kwargs):
        built.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(integration_dflash, "DFlashDecoder", recording)
    assert torch.equal(greedy(target, prompt, 10, assistant_model=drafter, dflash_cuda_graphs=False), expected)
    assert torch.equal(greedy(target, prompt, 10, assistant_model=drafter, dflash_compile=True), expected)
    assert [(b["cuda_graphs"], b["compile"]) for b in built] == [(False, False), (None, True)]
    tokenizer = tiny_tokenizer()
    pipe = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=drafter)
    text = tokenizer.decode(prompt[0])
    plain = pipeline("text-generation", model=target, tokenizer=tokenizer)(text, max_new_tokens=10, do_sample=False)
    assert pipe(text, max_new_tokens=10, do_sample=False, dflash_cuda_graphs=False) == plain  # through the pipeline
    assert (built[-1]["cuda_graphs"], built[-1]["compile"]) == (False, False)
    with pytest.raises(ValueError, match="dflash_compile"):
        greedy(target, prompt, 10, dflash_compile=True)


def test_one_hook_on_generate_and_other_calls_untouched(target):
    assert getattr(GenerationMixin.generate, "_dflash_generate_hook", False)
    assert not hasattr(GenerationMixin._assisted_decoding, "__wrapped__")
    assert "_get_candidate_generator" not in target.__dict__
