#!/usr/bin/env bash
# containers-conf.sh prints a containers.conf for podman on this machine,
# which the Makefile and the live test hand to podman with CONTAINERS_CONF
# (so the machine's own configuration is neither read nor changed):
#
#   - runtime runc: crun fails here on the rlimits and on hybrid cgroups;
#   - the containers' file and process limits at most what podman itself
#     may set: podman's defaults (1048576 open files) are above the hard
#     limits of a machine whose root lacks CAP_SYS_RESOURCE, and runc then
#     fails with "error setting rlimits";
#   - cgroupfs, and files for events and logs, which need no systemd.
set -euo pipefail
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
# podman caps its own process limit at 32768 before it starts a container.
[ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ] && nofile=1048576
[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
cat <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
