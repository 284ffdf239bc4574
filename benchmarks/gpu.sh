#!/usr/bin/env bash
# Issue 9's GPU figures in one short run (about 3-5 minutes on an H100/H200-class GPU):
#   1. loader: folder path (ImageFolder + PIL, one DataLoader worker per core) vs the cached path,
#      at 224 and 64 px, batch 128;
#   2. train: vgg16_v2, resnet18, resnet50 at 224 px, batch 128, bf16 autocast + channels_last,
#      synthetic tensors on the GPU vs the real cached loader (pipeline_efficiency = real / synthetic).
# Uses data/versions/v1 when built, else a synthetic version of real PNGs under /tmp (said aloud).
# Results: benchmarks/results/<host>-<date>.json (both sections). Extra args go to both commands.
#   bash benchmarks/gpu.sh [--dataset v3]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.__version__, torch.cuda.get_device_name())"

CACHE=$(mktemp -d /tmp/bench-cache-XXXX)
trap 'rm -rf "$CACHE"' EXIT

timeout 240 "$PY" -m benchmarks.loader --device cuda --sizes 224 64 --batch-size 128 --epochs 2 \
  --cache-root "$CACHE" "$@"
timeout 300 "$PY" -m benchmarks.train --device cuda --image-size 224 --batch-size 128 \
  --models vgg16_v2 resnet18 resnet50 --steps 40 --warmup 10 --repeats 2 --amp --channels-last \
  --cache-root "$CACHE" "$@"

"$PY" - <<'PY'
import json, pathlib
path = max(pathlib.Path("benchmarks/results").glob("*.json"), key=lambda p: p.stat().st_mtime)
data = json.loads(path.read_text())
print(f"\n== {path}")
for size, r in data.get("loader", {}).get("by_size", {}).items():
    print(f"loader {size:>4}px  folder {r['folder']['img_per_s']:>8.0f} img/s  cached {r['cached']['img_per_s']:>8.0f} img/s"
          f"  speedup {r['speedup']:.1f}x  (cache build {r['cache_build_s']:.1f} s)")
for name, r in data.get("train", {}).get("by_model", {}).items():
    print(f"train {name:>9}  synthetic {r['synthetic_img_per_s']:>8.0f} img/s  real {r['real_img_per_s']:>8.0f} img/s"
          f"  pipeline_efficiency {r['pipeline_efficiency']:.2f}")
PY
