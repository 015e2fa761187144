#!/usr/bin/env bash
# Same-call A/B of kvtransfer's data paths (tag vs auto = puts for few runs) and UCX progress
# modes, on the lent machine; each bench/transfer.py run measures its own raw ucxx baseline.
#   OUT=... GIT_COMMIT=... bash bench/transfer_ab.sh same|cross [reps]
# same: two processes sharing GPU 0, 1/16/256/4096 blocks; cross: GPU 0 -> GPU 1, 8/32/128/512.
# The runs' .json/.md land in one archive, $OUT/transfer-ab-<same|cross>.tar.gz (the device
# returns only a few files per call: session 9 lost the cross runs' eight files).
set -uo pipefail
where=${1:?same|cross}; reps=${2:-3}
: "${OUT:?set OUT}"
export PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n
if [ "$where" = cross ]; then extra="--gpus 0,1 --sizes 8,32,128,512"; pre=x2-; else extra="--sizes 1,16,256,4096"; pre=; fi
for mode in thread thread-polling; do
  for path in tag auto; do
    echo "== $where $path $mode"
    timeout 150 python3 bench/transfer.py --device cuda $extra --reps "$reps" --overlap-reps 3 \
      --overlap-layers llama --overlap-pattern contiguous --data-path $path --progress-mode $mode \
      --tag "${pre}v20-$path-$mode" --out "$OUT/ab-$where" 2>&1 | grep -E "blocks (contig|scatt)|overlap \(|rror|failed"
  done
done
tar czf "$OUT/transfer-ab-$where.tar.gz" -C "$OUT" "ab-$where" && rm -rf "${OUT:?}/ab-$where"
