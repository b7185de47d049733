#!/usr/bin/env bash
# One-time set-up of a fresh machine: system packages, a virtual environment with pinned packages, fedasr itself.
# Idempotent: a second run checks and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "[setup] installing espeak-ng (system package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null
fi

# Flower's SuperLink installs a Flower app's dependencies with `uv sync` into a fresh environment before each run
# (Flower 1.42 default): for fedasr that is torch, SpeechBrain, ... again, and a CUDA torch. This venv already holds
# them, so every Python of the venv starts with FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 unless it is set (a
# .pth line runs at interpreter start-up): plain `flwr run .` then starts its local SuperLink with installation off.
ensure_flower_defaults() {
  [ -x "$VENV/bin/python" ] || return 0
  local site
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  printf '%s\n' "import os; os.environ.setdefault('FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION', '1')" \
    > "$site/fedasr-flower-defaults.pth"
}
ensure_flower_defaults

stamp="$VENV/.fedasr-setup-$(sha1sum requirements.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "[setup] installing pinned packages into $VENV (first run: about 2-3 minutes)"
# torch must be pinned in the same pip command as everything else, or pip pulls a CUDA build.
"$VENV/bin/pip" install -q -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/pip" install -q --no-deps -e .
# torchaudio's compiled extension is a CUDA build that cannot load beside CPU torch; speechbrain only needs
# torchaudio's pure-Python parts, which work once the extension libraries are gone.
"$VENV/bin/python" - <<'PY'
import glob, os, importlib.util
spec = importlib.util.find_spec("torchaudio")
if spec and spec.submodule_search_locations:
    root = list(spec.submodule_search_locations)[0]
    libs = glob.glob(os.path.join(root, "lib", "*.so")) + glob.glob(os.path.join(root, "lib", "*.so.*"))
    for lib in libs:
        os.remove(lib)
PY
"$VENV/bin/python" -c "import torch, speechbrain, flwr, sentencepiece, soundfile; print('[setup] ok: torch', torch.__version__, 'speechbrain', speechbrain.__version__, 'flwr', flwr.__version__)"
ensure_flower_defaults
rm -f "$VENV"/.fedasr-setup-*
touch "$stamp"
