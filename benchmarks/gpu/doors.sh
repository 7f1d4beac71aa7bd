# The doors against the engine, in one GPU call (after the GGUF parts were carried, see setup.sh):
#   PARTS="scale bench" bash benchmarks/gpu/doors.sh
# scale: plain generate(assistant_model=drafter) and transformers' native route against the loop at the Qwen3-8B shape
#        (random weights; needs no GGUF). bench: SmolLM2 + the bundled drafter on benchmarks/prompts/everyday.json
#        (written independently of the training data), stopping at end of turn, batch 1 and 8.
PARTS="${PARTS:-scale bench}"
if [[ " $PARTS " == *" bench "* ]]; then
  . benchmarks/gpu/setup.sh
else
  ln -sfn "$PWD/modeling" src/dflash_hf/modeling
  export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
fi
if [[ " $PARTS " == *" scale "* ]]; then
  timeout 330 python3 benchmarks/scale.py --models qwen3-8b --batch-sizes 1,8 --prompt-len 512 --steps 64 \
    --doors qwen3-8b --hf-static qwen3-8b --out doors_scale_qwen3_8b --results-dir $OUT 2>&1 | grep -v -i warn | tail -30
fi
if [[ " $PARTS " == *" bench "* ]]; then
  timeout 420 python3 -m dflash_hf bench --target smollm2 --drafter bundled --dtype bf16 --device cuda --batch-sizes 1,8 \
    --max-new-tokens 256 --repeats 2 --prompts 2 --prompt-file benchmarks/prompts/everyday.json --stop-at-eos \
    --methods ar_eager,ar_static,dflash_loop_graphs,dflash_generate,hf_dflash \
    --time-budget 360 --method-time-limit 15 --out doors_smollm2 --results-dir $OUT 2>&1 | grep -v -i warn \
    | grep -E "^\| |Command|failed" | head -40
fi
ls -la $OUT
