#!/usr/bin/env bash
# Build a TensorRT engine from a QDQ INT8 ONNX model with trtexec, on the Jetson that will run it,
# for those who prefer trtexec to `edgecloud engine build` (same engine). Afterwards it writes the
# <engine>.meta.json sidecar the agent checks, with `edgecloud engine sidecar` from the agent's venv.
#
#   build_engine.sh MODEL.onnx ENGINE.plan --input NAME --row-shape CxHxW [options]
#
# Options:
#   --input NAME        the model's dynamic-batch input (e.g. image)
#   --row-shape DIMS    one row's shape, e.g. 3x64x64 (`edgecloud engine build MODEL.onnx --print-trtexec`
#                       prints the exact shapes read from the model)
#   --max-batch N       largest batch of the optimization profile (default 8)
#   --opt-batch N       batch size to tune for (default 1)
#   --workspace-mb N    builder workspace limit (default 1024)
#   --dla               build for DLA core 0 with GPU fallback (Jetson Orin)
#   --strongly-typed    --stronglyTyped instead of --int8 --fp16: precision from the Q/DQ graph only
#                       (TensorRT 11 removed the precision flags; JetPack 6 has TensorRT 10.3)
#   --dry-run           print the trtexec command instead of running it
set -euo pipefail

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

[ $# -ge 2 ] || { usage >&2; exit 2; }
MODEL=$1
ENGINE=$2
shift 2
INPUT=""
ROW_SHAPE=""
MAX_BATCH=8
OPT_BATCH=1
WORKSPACE_MB=1024
DLA=0
PRECISION=(--int8 --fp16)
LABEL=int8+fp16
FLAGS=(INT8 FP16)
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --input) INPUT=${2:?--input needs a tensor name}; shift ;;
    --row-shape) ROW_SHAPE=${2:?--row-shape needs dimensions like 3x64x64}; shift ;;
    --max-batch) MAX_BATCH=${2:?}; shift ;;
    --opt-batch) OPT_BATCH=${2:?}; shift ;;
    --workspace-mb) WORKSPACE_MB=${2:?}; shift ;;
    --dla) DLA=1 ;;
    --strongly-typed) PRECISION=(--stronglyTyped); LABEL=strongly-typed; FLAGS=(STRONGLY_TYPED) ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build_engine.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$INPUT" ] || [ -z "$ROW_SHAPE" ]; then
  echo "build_engine.sh: --input and --row-shape are required" >&2
  exit 2
fi
[[ $ROW_SHAPE =~ ^[0-9]+(x[0-9]+)*$ ]] || { echo "build_engine.sh: bad --row-shape $ROW_SHAPE" >&2; exit 2; }
[ "$OPT_BATCH" -le "$MAX_BATCH" ] || { echo "build_engine.sh: --opt-batch exceeds --max-batch" >&2; exit 2; }

TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}   # where JetPack puts it
CMD=("$TRTEXEC" "--onnx=$MODEL" "--saveEngine=$ENGINE" "${PRECISION[@]}"
     "--minShapes=$INPUT:1x$ROW_SHAPE" "--optShapes=$INPUT:${OPT_BATCH}x$ROW_SHAPE"
     "--maxShapes=$INPUT:${MAX_BATCH}x$ROW_SHAPE" "--memPoolSize=workspace:${WORKSPACE_MB}M")
if [ "$DLA" -eq 1 ]; then
  CMD+=(--useDLACore=0 --allowGPUFallback)
  FLAGS+=(DLA_CORE=0 GPU_FALLBACK)
fi
FLAGS+=("WORKSPACE_MB=$WORKSPACE_MB")

if [ "$DRY_RUN" -eq 1 ]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
[ -f "$MODEL" ] || { echo "build_engine.sh: $MODEL does not exist" >&2; exit 1; }
[ -x "$TRTEXEC" ] || { echo "build_engine.sh: trtexec not found at $TRTEXEC (set TRTEXEC=…)" >&2; exit 1; }
"${CMD[@]}"
SIZE=$(stat -c %s "$ENGINE")
BUDGET=1000000000
if [ "$SIZE" -gt "$BUDGET" ]; then
  echo "build_engine.sh: $ENGINE is $SIZE bytes, over the edge budget of $BUDGET" >&2
  exit 1
fi
echo "build_engine.sh: built $ENGINE ($SIZE bytes)"

EDGECLOUD=${EDGECLOUD:-/opt/edge-agent/venv/bin/edgecloud}
SIDECAR=("$EDGECLOUD" engine sidecar "$ENGINE" --onnx "$MODEL" --precision "$LABEL" --max-batch "$MAX_BATCH")
for flag in "${FLAGS[@]}"; do
  SIDECAR+=(--flag "$flag")
done
if [ -x "$EDGECLOUD" ]; then
  "${SIDECAR[@]}"
else
  echo "build_engine.sh: $EDGECLOUD not found; write the sidecar with: $(printf '%q ' "${SIDECAR[@]}")" >&2
fi
