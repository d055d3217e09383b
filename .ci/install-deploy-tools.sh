#!/usr/bin/env bash
# Installs the offline validators of the deployment files, used by tests/deploy. Idempotent: a tool that is
# already there at a good version is left alone, so a second run installs nothing.
#
#   docker-compose        Debian's package (1.29): `docker-compose config -q` needs no Docker engine
#   kubectl               renders the kustomizations (`kubectl kustomize`, kustomize v4+ built in) with no
#                         cluster; this machine kind ships it (Google Cloud SDK's apt package `kubectl`).
#                         Debian's own `kubernetes-client` (1.20, kustomize v2) cannot render them.
#   kubernetes-validate   PyPI, pinned, into the project's virtual environment (run `make install` first);
#                         it carries the Kubernetes schemas and validates offline
#
# Usage: bash .ci/install-deploy-tools.sh   (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION="1.37.0"
VENV_PYTHON="${VENV_PYTHON:-.venv/bin/python}"

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
else
    SUDO=(sudo)
fi

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        "${SUDO[@]}" apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@"
}

# --- docker-compose (v1.29 from Debian)
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "install-deploy-tools: installing docker-compose (Debian)"
    apt_install docker-compose
fi
echo "install-deploy-tools: docker-compose $(docker-compose version --short)"

# --- kubectl with a kustomize that knows `labels` and `components` (v4+)
kustomize_major() {
    kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p'
}
if ! command -v kubectl >/dev/null 2>&1; then
    echo "install-deploy-tools: installing kubectl"
    apt_install kubectl || true
fi
if ! command -v kubectl >/dev/null 2>&1; then
    echo "install-deploy-tools: kubectl is not available from this machine's apt sources;" \
        "install kubectl >= 1.21 (it embeds kustomize v4+) from your Kubernetes distribution" >&2
    exit 1
fi
major="$(kustomize_major)"
if [ -z "$major" ] || [ "$major" -lt 4 ]; then
    echo "install-deploy-tools: kubectl's kustomize is too old (need v4+): $(kubectl version --client 2>&1 | tr '\n' ' ')" >&2
    exit 1
fi
echo "install-deploy-tools: $(kubectl version --client 2>/dev/null | tr '\n' ' ')"

# --- kubernetes-validate (PyPI, pinned) in the project's virtual environment
if [ ! -x "$VENV_PYTHON" ]; then
    echo "install-deploy-tools: no virtual environment at $VENV_PYTHON: run 'make install' first" >&2
    exit 1
fi
installed="$( ("$VENV_PYTHON" -m pip show kubernetes-validate 2>/dev/null || true) | sed -n 's/^Version: //p')"
if [ "$installed" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    echo "install-deploy-tools: installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    "$VENV_PYTHON" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
echo "install-deploy-tools: kubernetes-validate $("$(dirname "$VENV_PYTHON")/kubernetes-validate" --version)"
