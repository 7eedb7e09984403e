#!/bin/bash
# evidence: eurosat vpt-deep at about equal time, input size against steps (lr 0.1, trainval -> test)
cd /work/main
for cfg in "112 4" "84 7" "56 12" "112 8" "168 2"; do
  set -- $cfg
  s=$(date +%s.%N)
  .venv/bin/vptune train --data eurosat --method vpt-deep --image-size $1 --epochs $2 --batch-size 32 --base-lr 0.1 \
    --weight-decay 0.0001 --train-split trainval --val-split none --no-progress --out /tmp/ev/deep-$1-$2 > /tmp/ev/deep-$1-$2.log 2>&1
  e=$(date +%s.%N)
  echo "deep $1 $2 $(echo "$e - $s" | bc) $(grep -o 'test_accuracy[^,]*' /tmp/ev/deep-$1-$2/metrics.jsonl | tail -1)" >> /tmp/ev/results.txt
done
