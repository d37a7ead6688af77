#!/usr/bin/env bash
# Install the Debian 12 packages that the local single-node SLURM cluster needs
# (devtools/local_slurm/): controller, node daemon, clients, munge, slurmdbd, MariaDB.
#
# Idempotent: exits quickly when everything is already there. Must run as root.
# The packages' own services are kept stopped: the test cluster runs private instances
# (own munge socket, own MariaDB socket/port, own Slurm ports) under a throwaway directory,
# and system-wide daemons would only compete for CPU or, worse, answer on default sockets.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
# The daemons install to sbin, which some CI images leave off PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
# One binary per package, so a quick `command -v` pass tells whether anything is missing.
BINARIES=(slurmctld slurmd sbatch munged slurmdbd mariadbd mariadb-install-db)
# Init script -> pid file of the system-wide instance a package postinst may have started.
# Only these pid files are looked at, so private cluster instances are never touched.
declare -A SERVICE_PIDFILES=(
    [slurmd]=/run/slurmd.pid
    [slurmctld]=/run/slurmctld.pid
    [slurmdbd]=/run/slurmdbd.pid
    [mariadb]=/run/mysqld/mysqld.pid
    [munge]=/run/munge/munged.pid
)
POLICY=/usr/sbin/policy-rc.d

all_installed() {
    local bin pkg
    for bin in "${BINARIES[@]}"; do
        command -v "$bin" >/dev/null 2>&1 || return 1
    done
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
            || return 1
    done
}

stop_system_services() {
    # No systemd here: postinst scripts go through invoke-rc.d and the SysV init scripts.
    # `status` of the slurm init scripts exits 0 without a config, so check the pid instead.
    local svc pidfile pid
    for svc in "${!SERVICE_PIDFILES[@]}"; do
        pidfile=${SERVICE_PIDFILES[$svc]}
        [[ -r "$pidfile" ]] || continue
        pid=$(tr -dc '0-9' <"$pidfile")
        if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
            continue
        fi
        echo "stopping system service $svc (the local cluster runs its own instance)"
        "/etc/init.d/$svc" stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    done
}

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install_system_deps.sh: must run as root" >&2
    exit 1
fi

if all_installed; then
    echo "system dependencies already installed"
    stop_system_services
    exit 0
fi

# Forbid service starts during installation (exit 101 = "action not allowed" for invoke-rc.d)
# unless the machine already has a policy; ours is removed again on exit.
created_policy=0
if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    created_policy=1
fi
cleanup() {
    if [[ "$created_policy" -eq 1 ]]; then
        rm -f "$POLICY"
    fi
}
trap cleanup EXIT

start=$(date +%s)
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
stop_system_services

if ! all_installed; then
    echo "install_system_deps.sh: packages installed but some binaries are missing" >&2
    exit 1
fi
echo "system dependencies installed in $(( $(date +%s) - start )) s"
