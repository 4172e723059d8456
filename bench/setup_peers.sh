#!/usr/bin/env bash
# Installs what the relay benchmark's peers need, idempotently:
#   - nginx (Debian package) for the WebSocket pass-through floor;
#   - the `ws` package for the Node.js peer relay (pinned by package-lock.json).
# Node.js itself (v18+) must already be on PATH. Run as root (or with sudo available).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    $sudo_cmd apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y --no-install-recommends nginx
fi
# The Debian package enables a system service on port 80; the benchmark runs its own nginx
# child with a generated config, so the service is not needed (and may not be running at all
# in a container without systemd).

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "setup_peers.sh: node and npm are required for the Node ws peer (apt-get install nodejs npm)" >&2
    exit 1
fi
cd "$here/peers/node_ws_relay"
if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
else
    npm install --no-audit --no-fund --loglevel=error
fi

echo "nginx: $(command -v nginx || echo /usr/sbin/nginx) ($( (nginx -v || /usr/sbin/nginx -v) 2>&1))"
echo "node:  $(node --version), ws $(node -e 'console.log(require("ws/package.json").version)')"
