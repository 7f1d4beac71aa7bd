# The GPU run that trained the shipped SmolLM2 drafter (one H200, one call). Output under $OUT (weights split into
# <16 MiB parts for the transfer; join with `cat model.safetensors.part* > model.safetensors`).
. benchmarks/gpu/setup.sh
RUN=/tmp/run; mkdir -p $RUN
START=$(date +%s)
python3 -m dflash_hf make-data --target smollm2 --dtype bfloat16 --device cuda --n-per-category 1000 \
  --max-new-tokens 256 --batch-size 384 --split train --output $RUN/train.jsonl --no-progress 2>&1 | tail -5
echo "make-data done in $(( $(date +%s) - START )) s"
timeout 330 python3 -m dflash_hf train --target smollm2 --dtype bfloat16 --device cuda --data $RUN/train.jsonl \
  --output $RUN/train --num-layers 3 --block-size 16 --epochs 6 --max-steps 900 --batch-size 16 --num-anchors 256 \
  --max-length 640 --eval-per-category 8 --eval-max-new-tokens 128 --eval-backend hf --save-every 150 \
  --no-progress 2>&1 | grep -v -i warn | tail -25
echo "train done in $(( $(date +%s) - START )) s"
D=$RUN/train/drafter; [ -f $D/model.safetensors ] || D=$(ls -d $RUN/train/checkpoints/step-* | sort -t- -k2 -n | tail -1)
echo "drafter: $D"; ls -la $D
split -b 15M $D/model.safetensors $OUT/model.safetensors.part
cp $D/config.json $OUT/; cp $RUN/train/metrics.json $RUN/train/curves.png $OUT/ 2>/dev/null
head -c 2000 $RUN/train/metrics.json; echo
