#!/usr/bin/env bash
# The GPU checks of the issues, run on the lent machine (bench/gpu/prepare.sh packs .gpu/
# here first). Two calls, each well inside the 10-minute command limit:
#
#   bench/gpu/checks.sh train   carry .gpu: installs the wheels, keeps the model and the
#                               Taobao file under /root/gpu for the next call, then
#                               `tailstream bench finetune --device cuda` (seq 64 and 128)
#                               and the Taobao evaluation with the whole encoder fine-tuned
#                               on the GPU (peers, river and the transformer strategies
#                               named in EVAL_STRATEGIES)
#   bench/gpu/checks.sh stack   carry .gpu/stack: the embedded stack's wheels; then
#                               `tailstream bench serve --device cuda` (top-100 over 1 M
#                               items x 1,000 users, event→Redis latency with a fine-tune
#                               running, model_update_s)
#
# Everything it prints and writes goes to $OUT (the device tool brings it back).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /root/gpu /tmp/site
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH
export TAILSTREAM_ENCODER_PATH=/root/gpu/model TAILSTREAM_DEVICE=cuda
EVAL_STRATEGIES=${EVAL_STRATEGIES:-covisitation,river,adaptive}
EVAL_STEPS=${EVAL_STEPS:-150}

install() {  # wheels → /tmp/site (no index: nothing can be fetched there)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$@" 2>&1 | tail -3
}

case "${1:-}" in
  train)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    [ -d .gpu/model ] && cp -r .gpu/model .gpu/data /root/gpu/
    install .gpu/whl/*.whl
    python3 -c "import torch, transformers, tailstream; print('torch', torch.__version__,
      'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" \
      | tee -a "$OUT/gpu.txt"
    timeout 170 python3 -m tailstream.cli bench finetune --device cuda --seq-len 64,128 \
      --json "$OUT/finetune.json" > "$OUT/finetune.log" 2>&1
    echo "finetune exit $?"; tail -5 "$OUT/finetune.log"
    timer=""; [ -x /usr/bin/time ] && timer="/usr/bin/time -v"
    timeout 370 $timer python3 -m tailstream.cli eval /root/gpu/data/UserBehavior_head.csv \
      --format taobao --threads 8 --steps "$EVAL_STEPS" --strategies "$EVAL_STRATEGIES" \
      --out "$OUT/eval" > "$OUT/eval.log" 2>&1
    echo "eval exit $?"; grep -E "Elapsed|Maximum resident" "$OUT/eval.log"
    rm -f "$OUT"/eval/*.png  # the charts: not needed back, and the file count is limited
    ;;
  stack)
    install .gpu/stack/*.whl
    timeout 420 python3 -m tailstream.cli bench serve --device cuda --seconds 30 \
      --json "$OUT/serve.json" > "$OUT/serve.log" 2>&1
    echo "serve exit $?"; tail -25 "$OUT/serve.log"
    ;;
  *)
    echo "usage: $0 train|stack" >&2; exit 2 ;;
esac
