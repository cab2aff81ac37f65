#!/usr/bin/env bash
# The demo's pipeline with GPU-sized settings, as run on an NVIDIA H200 for benchmarks/RESULTS.md ("A GPU").
# Usage, from the repository root:  bash benchmarks/gpu_demo.sh VQVAE_MINUTES PRIOR_MINUTES [extra training flags]
# Reads the demo cohort from .gpu/demodata (make it with `brainvq data demo --out .gpu/demodata`), trains into
# /tmp/gpurun, and leaves logs, results.tar and checkpoints.tar in $OUT (default /tmp/out). Environment: N samples
# for evaluate-samples (default 256), IB grids for the fast-vs-naive check (default 4; 0 skips it), NS generated
# pairs for benchmarks/segmentation_transfer.py with TS steps per arm (default 0: skipped; a joint run only).
# Where brainvq is not installed (a bare GPU machine), wheels of nibabel and nilearn in .whl/ are installed first.
set -x
VQ_MIN=$1; PRIOR_MIN=$2; shift 2
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/src:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, nibabel; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
R=/tmp/gpurun; DATA=$PWD/.gpu/demodata; rm -rf $R
pack() {
  (cd $R && tar cf $OUT/checkpoints.tar checkpoints/best.safetensors prior/checkpoints/best.safetensors config.json prior/config.json 2>/dev/null)
  (cd $R && tar cf $OUT/results.tar --exclude='*.safetensors' --exclude=codes --exclude=report.html --exclude=checkpoints . 2>/dev/null)
}
trap pack EXIT
T0=$SECONDS
python3 -m brainvq train-vqvae --data $DATA --out $R --batch-size 64 --epochs 1000 --max-minutes $VQ_MIN "$@" > $OUT/vqvae.log 2>&1 || { echo "vqvae failed $((SECONDS-T0))s; again without compile"; tail -c 3000 $OUT/vqvae.log; rm -rf $R; python3 -m brainvq train-vqvae --data $DATA --out $R --batch-size 64 --epochs 1000 --max-minutes $VQ_MIN --compile off "$@" > $OUT/vqvae2.log 2>&1; }; echo "vqvae rc=$? $((SECONDS-T0))s"
tail -c 1500 $R/metrics.jsonl
python3 -m brainvq evaluate $R --data $DATA --split test 2>&1 | tail -20; echo "eval $((SECONDS-T0))s"
python3 -m brainvq train-prior $R --batch-size 64 --epochs 1000 --max-minutes $PRIOR_MIN "$@" > $OUT/prior.log 2>&1 || { echo "prior failed $((SECONDS-T0))s; again without compile"; tail -c 3000 $OUT/prior.log; rm -rf $R/prior; python3 -m brainvq train-prior $R --batch-size 64 --epochs 1000 --max-minutes $PRIOR_MIN --compile off "$@" > $OUT/prior2.log 2>&1; }; echo "prior rc=$? $((SECONDS-T0))s"
tail -c 1200 $R/prior/metrics.jsonl; cat $R/prior/eval_prior.json
python3 -m brainvq evaluate-samples $R --n ${N:-256} > $OUT/evalsamples.log 2>&1; echo "evaluate-samples rc=$? $((SECONDS-T0))s"
cat $R/eval_samples.json
if [ "${IB:-4}" -gt 0 ]; then
  timeout 100 python3 benchmarks/sampler_identity.py $R --grids ${IB:-4} 2>&1 | tee $OUT/identity.jsonl; echo "identity $((SECONDS-T0))s"
fi
if [ "${NS:-0}" -gt 0 ]; then
  python3 -m brainvq sample $R --n $NS --out /tmp/generated > $OUT/sample.log 2>&1; echo "sample rc=$? $((SECONDS-T0))s"
  python3 benchmarks/segmentation_transfer.py --data $DATA --samples /tmp/generated --steps ${TS:-1000} \
    --json $OUT/transfer.json 2>&1 | tee $OUT/transfer.log; echo "transfer $((SECONDS-T0))s"
fi
