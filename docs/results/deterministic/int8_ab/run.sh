set -x
C="--links 100mbit --methods rsdgc-int8 --target 0.965 --epochs_sparse 5 --no_stop"
python -m hvd_rsgc.bench tta $C --keep --extra '--seed 0' --out /tmp/ab/plain1
python -m hvd_rsgc.bench tta $C --reuse --keep --extra '--seed 0 --deterministic true' --out /tmp/ab/det1
python -m hvd_rsgc.bench tta $C --reuse --keep --extra '--seed 0 --deterministic true' --out /tmp/ab/det2
python -m hvd_rsgc.bench tta $C --reuse --extra '--seed 0' --out /tmp/ab/plain2
echo done
