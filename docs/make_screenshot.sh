#!/usr/bin/env bash
# Re-make docs/tensorboard.png: run the quickstart, serve TensorBoard on loopback, screenshot it headless.
# Needs Debian's chromium (apt-get install chromium). Run from the repository root.
set -euo pipefail
repo=$(pwd)
work=$(mktemp -d)
cd "$work"
lightning-align fit --config "$repo/configs/quickstart.yaml" --trainer.enable_progress_bar=false >/dev/null
tensorboard --logdir lightning_logs --port 6125 --host 127.0.0.1 >/dev/null 2>&1 &
tb=$!
trap 'kill $tb' EXIT
sleep 8
filter=$(python -c "import urllib.parse; print(urllib.parse.quote('align/cos/layers|sharpness/lr_x_max_eig|ntk/max_eig|elr/spread|rank/repr_effective/layers.[12]|ntk/distance|coord/delta/readout|elr/critical'))")
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking --disable-component-update \
  --disable-sync --user-data-dir="$work/chromium" --window-size=1500,1000 --virtual-time-budget=20000 \
  --screenshot="$repo/docs/tensorboard.png" "http://127.0.0.1:6125/#scalars&tagFilter=$filter"
