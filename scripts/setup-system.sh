#!/usr/bin/env bash
# Installs the Debian packages the real parts need (Slurm, munge, etcd, NATS, Open MPI with PMIx),
# only those that are missing, so a second run costs nothing.
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge etcd-server etcd-client nats-server
          openmpi-bin libopenmpi-dev libpmix-dev shellcheck)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && { echo "system packages: all present"; exit 0; }
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "error: missing Debian packages ${missing[*]}; run this script as root (or install sudo)" >&2; exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
