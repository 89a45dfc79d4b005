#!/bin/bash
# PID 1 inside user-mode Linux for the UML test harness (tests/uml/mod.rs).
#
# The root filesystem is the host's, through hostfs, so everything the job needs (binaries from
# target/, ipvsadm, iptables-legacy) is where it is on the host; the job's results go back as
# files in the work directory the host named with kpx_work= on the kernel command line:
#   in:  argv, env (NUL-separated), modules (one name a line)
#   out: modules.loaded, modules.failed ("NAME: error"), stdout, stderr, times, exit_code
# Whatever happens, this script ends by powering the kernel off; if it died instead, the kernel
# would panic ("Attempted to kill init") and UML would exit anyway.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
set -u

say() { echo "kpx-init: $*"; }

power_off() {
  # hostfs writes go through UML's page cache: flush them to the host before the power goes.
  sync
  echo o >/proc/sysrq-trigger
  sleep 10
  say "still running after sysrq poweroff"
  exit 1
}
trap power_off EXIT

mount -t proc proc /proc
mount -t sysfs sysfs /sys
uptime() { local up _; read -r up _ </proc/uptime; echo "$up"; }
say "started at $(uptime)s"

work=""
for arg in $(</proc/cmdline); do
  case "$arg" in kpx_work=*) work="${arg#kpx_work=}" ;; esac
done
if [[ -z "$work" || ! -d "$work" ]]; then
  say "no work directory (kpx_work=) on the kernel command line: $(</proc/cmdline)"
  exit 1
fi

# The host's /run, /tmp and /dev are visible through hostfs: cover them so that nothing done
# here (ip netns add writes /run/netns, iptables takes /run/xtables.lock) lands on the host.
# The work directory stays reachable even when it lives under one of them.
private_tmpfs() {
  local dir=$1
  case "$work/" in "$dir"/*)
    say "not covering $dir: the work directory is under it"
    return
    ;;
  esac
  mount -t tmpfs -o mode=0755 tmpfs "$dir"
}
private_tmpfs /run
private_tmpfs /tmp
chmod 1777 /tmp
[[ -e /dev/null ]] || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts

# modprobe -d DIR looks for DIR/lib/modules/$(uname -r); Debian ships UML's modules elsewhere.
release=$(uname -r)
modroot="$work/modroot"
mkdir -p "$modroot/lib/modules"
ln -sfn "/usr/lib/uml/modules/$release" "$modroot/lib/modules/$release"
mapfile -t modules <"$work/modules"
: >"$work/modules.loaded"
: >"$work/modules.failed"
# One modprobe for all (each process costs tens of ms under UML); one by one only to tell
# which failed.
if ((${#modules[@]} == 0)); then
  :
elif modprobe -a -d "$modroot" "${modules[@]}" 2>/dev/null; then
  printf '%s\n' "${modules[@]}" >"$work/modules.loaded"
else
  for module in "${modules[@]}"; do
    if err=$(modprobe -d "$modroot" "$module" 2>&1); then
      echo "$module" >>"$work/modules.loaded"
    else
      echo "$module: ${err//$'\n'/ }" >>"$work/modules.failed"
    fi
  done
fi
say "$(wc -l <"$work/modules.loaded") modules loaded, $(wc -l <"$work/modules.failed") failed, at $(uptime)s"

# Without a loopback device that is up, IPVS refuses destinations (EINVAL).
ip link set lo up

argv=()
mapfile -d '' argv <"$work/argv"
env_pairs=()
[[ -f "$work/env" ]] && mapfile -d '' env_pairs <"$work/env"
read -r up_start _ </proc/uptime
command_line="${argv[*]}"
say "running ${command_line:0:200}"
(cd "$work" && exec env "${env_pairs[@]}" "${argv[@]}") <"/dev/null" >"$work/stdout" 2>"$work/stderr"
code=$?
read -r up_end _ </proc/uptime
echo "$up_start $up_end" >"$work/times"
# Written last and renamed into place: its presence means the job ran to completion.
echo "$code" >"$work/exit_code.tmp" && mv "$work/exit_code.tmp" "$work/exit_code"
say "job exited with $code"
