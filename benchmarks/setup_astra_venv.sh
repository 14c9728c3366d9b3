#!/usr/bin/env bash
# Create benchmarks/.venv-astra: a separate virtual environment with ASTRA Toolbox, the GPL-3.0
# peer that benchmarks/bench_astra.py compares our reconstruction with. ASTRA is a benchmark
# peer only, never a dependency of tomopipe: it is never installed into the project's .venv, and
# the benchmark runs it in this venv through a subprocess (arrays exchanged as .npy files).
#
# Its wheel pulls the CUDA runtime and cuFFT wheels (~380 MB) even for CPU use (the .so files
# link against them); its 2-D CPU algorithms (FBP, SIRT) work without a GPU. Never call its
# 3-D functions on a machine without a GPU: they are CUDA-only and can kill the process.
#
#   bash benchmarks/setup_astra_venv.sh [PYTHON]      (default: python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-astra"
python="${1:-python3}"
ASTRA_VERSION="2.5.0"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip >/dev/null
"$venv/bin/python" -m pip install numpy scipy "astra-toolbox==$ASTRA_VERSION"
"$venv/bin/python" - <<'PY'
import astra
import numpy as np

# a CPU smoke test: FBP of a disc from 90 parallel views
vol = astra.create_vol_geom(32, 32)
proj = astra.create_proj_geom("parallel", 1.0, 48, np.linspace(0, np.pi, 90, endpoint=False))
projector = astra.create_projector("linear", proj, vol)
yy, xx = np.mgrid[:32, :32] - 15.5
disc = (xx**2 + yy**2 < 64).astype(np.float32)
sino_id, sino = astra.create_sino(disc, projector)
rec_id = astra.data2d.create("-vol", vol)
cfg = astra.astra_dict("FBP")
cfg.update(ReconstructionDataId=rec_id, ProjectionDataId=sino_id, ProjectorId=projector)
alg = astra.algorithm.create(cfg)
astra.algorithm.run(alg)
rec = astra.data2d.get(rec_id)
c = np.corrcoef(rec.ravel(), disc.ravel())[0, 1]
print(f"astra {astra.__version__}: CPU FBP smoke test, correlation {c:.3f}, CUDA available: {astra.use_cuda()}")
assert c > 0.9
PY
echo "ASTRA venv ready: $venv"
