# The GPU measurements that follow training (one H200): native-route comparison, memory soak, long context, server
# throughput. Each writes into $OUT as it finishes; `timeout` keeps every part inside the call.
#   PARTS="bench soak long serve" bash benchmarks/gpu/final_measurements.sh   (after benchmarks/gpu/setup.sh's carries)
. benchmarks/gpu/setup.sh
PARTS="${PARTS:-bench soak long serve}"
DRAFTER="${DRAFTER:-bundled}"
if [[ " $PARTS " == *" serve "* ]]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
fi
if [[ " $PARTS " == *" bench "* ]]; then
  timeout 160 python3 -m dflash_hf bench --target smollm2 --drafter $DRAFTER --dtype bf16 --device cuda --batch-sizes 1 \
    --max-new-tokens 128 --repeats 2 --prompts 1 --time-budget 120 --method-time-limit 20 --out native_route_h200 \
    --results-dir $OUT --methods ar_eager,dflash_loop_graphs,hf_dflash,dflash_generate --no-plot 2>&1 \
    | grep -v -i warn | grep -E "^\| |Command" | head -20
fi
if [[ " $PARTS " == *" soak "* ]]; then
  timeout 150 python3 benchmarks/memory_soak.py --drafter $DRAFTER --calls 10 --new-tokens 1024 --batch-sizes 1 \
    --out $OUT --name memory_soak_h200 2>&1 | grep -v -i warn | grep -E "^\||Growth" | tail -30
fi
if [[ " $PARTS " == *" long "* ]]; then
  timeout 100 python3 benchmarks/long_context.py --drafter $DRAFTER --lengths 512,2048,8000 --window 512 \
    --new-tokens 128 --out $OUT --name long_context_h200 2>&1 | grep -v -i warn | grep -E "^\|" | tail -25
fi
if [[ " $PARTS " == *" serve "* ]]; then
  timeout 240 python3 benchmarks/serve_bench.py --drafter $DRAFTER --dtype bfloat16 --device cuda --concurrency 1 8 32 \
    --requests-per-client 4 --level-seconds 15 --max-tokens 128 --out $OUT 2>&1 | grep -v -i warn | tail -25
fi
ls -la $OUT
