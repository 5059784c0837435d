#!/usr/bin/env bash
# The Llama-3-8B load benchmark on a GPU machine without internet, in one command:
#   OUT=results-dir bash benchmarks/gpu_load.sh [run.py options...]
# Wheels in $WHEELS (default .whl/: transformers, instanttensor...) are installed into /tmp/site first; the random
# checkpoints (about 31 GB) are made on local disk under $WORK; results-load.{json,md} and the log go to $OUT.
set -uo pipefail
OUT=${OUT:-$PWD/bench-out}
WHEELS=${WHEELS:-.whl}
WORK=${WORK:-/var/tmp/hfbuilder-bench}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/log.txt") 2>&1
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv
echo "cores: $(nproc)"; free -g; df -hT "$WORK"; uname -r; uptime
python3 -c "import torch, transformers, safetensors, instanttensor, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, safetensors.__version__)"
python3 benchmarks/run.py --set load --workdir "$WORK" --out "$OUT" "$@"
