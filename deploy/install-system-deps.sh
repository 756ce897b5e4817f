#!/usr/bin/env bash
# The Debian packages the deployment checks need: promtool + prometheus (package `prometheus`) and
# docker-compose 1.29 (validates a compose file without a Docker engine). Installed only when
# missing; the tests fail, never skip, without them. The package may start a system Prometheus:
# the tests start their own on a free loopback port and never use it.
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v docker-compose >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
echo "installing Debian packages prometheus and docker-compose (needed by the deployment tests)"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus docker-compose >/dev/null
