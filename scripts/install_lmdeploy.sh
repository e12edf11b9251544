#!/usr/bin/env bash
# Install LMDeploy for the CPU tests of mono.deploy.lmdeploy, without its CUDA stack.
#
#   scripts/install_lmdeploy.sh            # uses .venv/bin/python (override: PYTHON=/path/to/python)
#
# - LMDeploy 0.18.0 (removed Mono-InternVL; this project registers it) goes into the venv with --no-deps, plus
#   only the small pure or abi3 packages its modules import. `pip install lmdeploy` would pull ~4 GB (a CUDA
#   torch replacing the CPU one, nccl, cublas, ray, ...).
# - Older releases go into .venv/lmdeploy-<version> with --target; tests put such a folder on PYTHONPATH in a
#   subprocess: 0.14.0 (the last release that ships Mono-InternVL code), 0.12.2 (the first whose Mono-InternVL no
#   longer builds) and 0.12.1 (the last one that loads an exported folder natively).
# - The TurboMind binaries (_turbomind*.so, 347 MB; libxgrammar.a, 18 MB) are deleted from both: the PyTorch
#   engine's Python code does not load them and `lmdeploy.archs` falls back to the PyTorch engine without them.
#
# Idempotent: a package already installed at the pinned version is left alone. Serving on a GPU needs the real
# install instead (`pip install lmdeploy`, with its dependencies).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
LMDEPLOY_VERSION=0.18.0
LEGACY_VERSIONS=(0.14.0 0.12.2 0.12.1)
# What `import lmdeploy`, lmdeploy.archs, lmdeploy.pytorch.models.* and lmdeploy.pytorch.config import beyond
# this project's own requirements (torch, transformers, numpy, safetensors, pillow, psutil, requests, tqdm):
DEPS=(
    mmengine-lite==0.10.7  # lmdeploy.model: mmengine.Registry
    addict==2.4.0          # mmengine-lite
    yapf==0.43.0           # mmengine-lite
    termcolor==3.3.0       # mmengine-lite
    platformdirs==4.14.7   # yapf
    pybase64==1.5.1        # lmdeploy.vl.utils (imported by lmdeploy.messages)
    pyzmq==27.3.0          # lmdeploy.pytorch.engine (imported by lmdeploy.pytorch.models.patch)
)

if [[ ! -x "$PYTHON" ]]; then
    echo "install_lmdeploy: $PYTHON not found; create the venv first (make install) or set PYTHON" >&2
    exit 1
fi
PIP=("$PYTHON" -m pip --disable-pip-version-check -q)

installed_version() {  # $1 = distribution name; prints its version or nothing
    "$PYTHON" - "$1" <<'EOF'
import importlib.metadata as md
import sys
try:
    print(md.version(sys.argv[1]))
except md.PackageNotFoundError:
    pass
EOF
}

strip_binaries() {  # $1 = a folder holding the lmdeploy package
    local found
    found="$(find "$1" \( -name '_turbomind*.so' -o -name '*.a' \) -type f 2>/dev/null || true)"
    if [[ -n "$found" ]]; then
        echo "install_lmdeploy: removing TurboMind binaries:"
        du -ch $found | sed 's/^/    /'
        rm -f $found
    fi
}

# --- small dependencies -------------------------------------------------------------------------------------
for spec in "${DEPS[@]}"; do
    name="${spec%%==*}"
    want="${spec##*==}"
    have="$(installed_version "$name")"
    if [[ "$have" == "$want" ]]; then
        echo "install_lmdeploy: $name $want already installed"
    else
        echo "install_lmdeploy: installing $spec (--no-deps; had: ${have:-none})"
        "${PIP[@]}" install --no-deps "$spec"
    fi
done

# --- LMDeploy 0.18.0 into the venv --------------------------------------------------------------------------
have="$(installed_version lmdeploy)"
if [[ "$have" == "$LMDEPLOY_VERSION" ]]; then
    echo "install_lmdeploy: lmdeploy $LMDEPLOY_VERSION already installed"
else
    echo "install_lmdeploy: installing lmdeploy==$LMDEPLOY_VERSION (--no-deps; had: ${have:-none})"
    "${PIP[@]}" install --no-deps "lmdeploy==$LMDEPLOY_VERSION"
fi
package_dir="$("$PYTHON" -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("lmdeploy").origin))')"
strip_binaries "$package_dir"

# --- older releases, each into its own folder -----------------------------------------------------------------
for version in "${LEGACY_VERSIONS[@]}"; do
    dir="$ROOT/.venv/lmdeploy-$version"
    if [[ -d "$dir/lmdeploy-$version.dist-info" ]]; then
        echo "install_lmdeploy: lmdeploy $version already in $dir"
    else
        echo "install_lmdeploy: installing lmdeploy==$version into $dir (--no-deps --target)"
        rm -rf "$dir"
        "${PIP[@]}" install --no-deps --target "$dir" "lmdeploy==$version"
    fi
    strip_binaries "$dir/lmdeploy"
done

# --- check ---------------------------------------------------------------------------------------------------
"$PYTHON" -c "import lmdeploy, lmdeploy.archs, lmdeploy.pytorch.models.patch as p
print('install_lmdeploy: lmdeploy', lmdeploy.__version__, 'imports')"
for version in "${LEGACY_VERSIONS[@]}"; do
    PYTHONPATH="$ROOT/.venv/lmdeploy-$version" "$PYTHON" -c "import lmdeploy, lmdeploy.pytorch.models.internlm2_ve as m
print('install_lmdeploy: lmdeploy', lmdeploy.__version__, 'imports from', lmdeploy.__path__[0])"
done
