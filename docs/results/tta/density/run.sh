#!/bin/bash
cd /work/main; . .venv/bin/activate
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
run() {  # seed target density
  python -m hvd_rsgc.bench tta --links 100mbit --methods rsdgc-int8 --density $3 --target $2 \
      --extra "--seed $1" --out /tmp/tta_density/s$1_d$3 > /tmp/tta_density/s$1_d$3.log 2>&1
  echo "seed $1 density $3 rc=$?" >> /tmp/tta_density/done.txt
}
mkdir -p /tmp/tta_density
run 0 0.965 0.03
run 3 0.975 0.03
run 0 0.965 0.01
