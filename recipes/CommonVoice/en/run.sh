#!/usr/bin/env bash
# Common Voice 'en': recipes/CommonVoice/en/run.sh CV_DIR [--out DIR] [--stage S] [--stop-stage S] [--set KEY=VALUE ...]
# (see ../run_recipe.sh and recipes/README.md)
exec "$(dirname "${BASH_SOURCE[0]}")/../run_recipe.sh" en "$@"
