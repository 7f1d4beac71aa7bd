# The doors against the engine, in one GPU call (after the GGUF parts were carried, see setup.sh):
#   PARTS="scale bench" bash benchmarks/gpu/doors.sh
# scale: plain generate(assistant_model=drafter) and transformers' native route against the loop at the Qwen3-8B shape
#        (random weights; needs no GGUF). bench: SmolLM2 + the bundled drafter on benchmarks/prompts/everyday.json
#        (written independently of the training data), stopping at end of turn, batch 1 and 8.
# pairs: step costs of the released pairs' other shapes, gemma-4-26B-A4B (MoE target, 4 sliding + 1 full drafter) and
#        Qwen3.5-27B (hybrid linear-attention target), against HF static AR and through the doors. The hybrid needs
#        transformers >= 5.25: carry .carry/tf/ (made with `pip download --no-deps transformers==5.25.0
#        huggingface-hub==2.5.0 httpx2 httpcore2 truststore -d .carry/tf`: huggingface_hub 2.5 imports httpx2, which the
#        GPU image lacks) and they are put first on the path; without them the hybrid row reports the engine's clear
#        error. A machine keeps ignored paths between calls: `rm -rf .carry/tf /tmp/site_tf` before a run on 5.17.
# families: benchmarks/gpu/families_check.py, losslessness on CUDA (graphs, compile, sampling generator) for every
#        target family of tests/test_target_families.py and the released pairs' shapes; its builders import pytest,
#        which the image lacks: carry .carry/pt/ (`pip download pytest -d .carry/pt`, packaging removed).
# A call that carries GGUF parts (.carry/p/gg_*) keeps them in /tmp/gg for the call that runs bench.
PARTS="${PARTS:-scale bench}"
if ls .carry/p/gg_* >/dev/null 2>&1; then
  mkdir -p /tmp/gg && cp .carry/p/gg_* /tmp/gg/
fi
if [[ " $PARTS " == *" bench "* ]]; then
  . benchmarks/gpu/setup.sh
else
  ln -sfn "$PWD/modeling" src/dflash_hf/modeling
  export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
fi
if ls .carry/tf/transformers-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site_tf .carry/tf/*.whl
  export PYTHONPATH=/tmp/site_tf:$PYTHONPATH
fi
if ls .carry/pt/pytest-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site_pt .carry/pt/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site_pt
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [[ " $PARTS " == *" families "* ]]; then
  timeout 300 python3 benchmarks/gpu/families_check.py --out $OUT 2>&1 | grep -v -i warn | tail -30
fi
if [[ " $PARTS " == *" scale "* ]]; then
  timeout 330 python3 benchmarks/scale.py --models qwen3-8b --batch-sizes 1,8 --prompt-len 512 --steps 64 \
    --doors qwen3-8b --hf-static qwen3-8b --out doors_scale_qwen3_8b --results-dir $OUT 2>&1 | grep -v -i warn | tail -30
fi
if [[ " $PARTS " == *" pairs "* ]]; then
  timeout 540 python3 benchmarks/scale.py --models gemma4-26b-a4b,qwen3.5-27b --batch-sizes 1,8 --prompt-len 512 \
    --steps 64 --doors gemma4-26b-a4b,qwen3.5-27b --hf-static gemma4-26b-a4b,qwen3.5-27b --out pairs_scale \
    --results-dir $OUT 2>&1 | grep -v -i warn | tail -40
fi
if [[ " $PARTS " == *" bench "* ]]; then
  timeout 420 python3 -m dflash_hf bench --target smollm2 --drafter bundled --dtype bf16 --device cuda --batch-sizes 1,8 \
    --max-new-tokens 256 --repeats 2 --prompts 2 --prompt-file benchmarks/prompts/everyday.json --stop-at-eos \
    --methods ar_eager,ar_static,dflash_loop_graphs,dflash_generate,hf_dflash \
    --time-budget 360 --method-time-limit 15 --out doors_smollm2 --results-dir $OUT 2>&1 | grep -v -i warn \
    | grep -E "^\| |Command|failed" | head -40
fi
ls -la $OUT
