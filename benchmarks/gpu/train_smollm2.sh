# The GPU run that trained the shipped SmolLM2 drafter: scripts/train_smollm2.sh on one H200, in two device calls
# (each call may run 10 minutes at most; /tmp survives between them while the machine stays warm):
#
#   STAGES=data  bash benchmarks/gpu/train_smollm2.sh    # call 1: make-data
#   STAGES=train bash benchmarks/gpu/train_smollm2.sh    # call 2: train, then copy the results to $OUT
#
# The weights come back split into <16 MiB parts (join with `cat model.safetensors.part* > model.safetensors`).
. benchmarks/gpu/setup.sh
RUN=/tmp/run
START=$(date +%s)
STAGES="$STAGES" bash scripts/train_smollm2.sh $RUN 2>&1 | grep -v -i -E "warn|^\s*$" | tail -40
echo "stage(s) '$STAGES' done in $(( $(date +%s) - START )) s"
cp $RUN/timings.txt $RUN/make_data_summary.json $OUT/ 2>/dev/null
if [[ " $STAGES " == *" train "* ]]; then
  split -b 15M $RUN/drafter/model.safetensors $OUT/model.safetensors.part
  cp $RUN/drafter/config.json $RUN/metrics.json $RUN/curves.png $RUN/train_summary.json $OUT/ 2>/dev/null
  ls -la $OUT
fi
