#!/usr/bin/env bash
# A one-node Ceph cluster for tests and benches: one mon, one mgr, one memstore OSD, all on
# 127.0.0.1, auth off, everything (config, data, logs, pid files, admin sockets) under DIR.
#
#   scripts/ceph-cluster.sh start DIR [POOL]   start it, create POOL (default rbd), print CEPH_CONF
#   scripts/ceph-cluster.sh stop DIR           stop every daemon by the PID in its pid file
#   scripts/ceph-cluster.sh status DIR         exit 0 when the cluster answers
#
# The daemons fork to the background; `stop` signals them by PID, never by name, so two clusters
# (or other Ceph users) on one machine do not touch each other. The monitor listens on a free
# pair of ports (v2 and v1, picked at random in 10000-32767, below the ephemeral range; set
# CEPH_MON_PORT to choose), not on 3300/6789, so two clusters can run at once.
set -euo pipefail

die() { echo "ceph-cluster: $*" >&2; exit 1; }

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 start|stop|status DIR [POOL]"
pool=${3:-rbd}
conf="$dir/ceph.conf"

# Wait until "$@" succeeds, up to $1 seconds (first argument), polling every 0.2 s.
wait_for() {
  local seconds=$1; shift
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

ceph_q() { timeout 20 ceph --conf "$conf" "$@"; }

osd_up() { ceph_q osd stat --format json | grep -q '"num_up_osds":1'; }
pgs_clean() {
  local out
  out=$(ceph_q pg stat) || return 1
  # "8 pgs: 8 active+clean; ..." : every PG active+clean
  [[ $out =~ ^([0-9]+)\ pgs:\ ([0-9]+)\ active\+clean\; ]] && [ "${BASH_REMATCH[1]}" = "${BASH_REMATCH[2]}" ]
}

stop_cluster() {
  local pidfile pid
  shopt -s nullglob
  for pidfile in "$dir"/run/*.pid; do
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] && kill "$pid" 2>/dev/null || true
  done
  for pidfile in "$dir"/run/*.pid; do
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

# True when something accepts connections on 127.0.0.1:$1.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_mon_port() {
  local port
  for _ in $(seq 50); do
    port=$((10000 + RANDOM % 22766))
    port_taken "$port" || port_taken "$((port + 1))" || { echo "$port"; return; }
  done
  die "no free port pair for the monitor"
}

start_cluster() {
  for bin in ceph-mon ceph-mgr ceph-osd ceph rbd; do
    command -v "$bin" >/dev/null || die "$bin not found: install ceph-mon ceph-mgr ceph-osd ceph-common"
  done
  [ -e "$conf" ] && die "$dir already holds a cluster (stop it and remove the directory first)"
  mkdir -p "$dir"/{mgr,osd,run,log}
  dir=$(cd "$dir" && pwd)
  conf="$dir/ceph.conf"
  local t0=$SECONDS attempt
  # Another cluster may take the ports between the check and the bind: then new ports, new mon.
  for attempt in 1 2 3; do
    write_conf "${CEPH_MON_PORT:-$(pick_mon_port)}"
    rm -rf "$dir/mon" && mkdir -p "$dir/mon"
    ceph-mon --conf "$conf" --id a --mkfs --keyring /dev/null >"$dir/log/mkfs-mon.out" 2>&1 || die "ceph-mon --mkfs failed: see $dir/log"
    ceph-mon --conf "$conf" --id a 2>>"$dir/log/daemons.err" && break
    [ "$attempt" -lt 3 ] && [ -z "${CEPH_MON_PORT:-}" ] || die "ceph-mon did not start: see $dir/log"
  done
  wait_for 30 ceph_q -s || die "the monitor did not answer within 30 s: see $dir/log"
  ceph-mgr --conf "$conf" --id x 2>>"$dir/log/daemons.err" || die "ceph-mgr did not start: see $dir/log"
  local id
  id=$(ceph_q osd create) || die "ceph osd create failed"
  ceph_q osd crush add "osd.$id" 1 root=default >/dev/null 2>&1
  ceph-osd --conf "$conf" --id "$id" --mkfs >"$dir/log/mkfs-osd.out" 2>&1 || die "ceph-osd --mkfs failed: see $dir/log"
  ceph-osd --conf "$conf" --id "$id" 2>>"$dir/log/daemons.err" || die "ceph-osd did not start: see $dir/log"
  wait_for 60 osd_up || die "the OSD did not come up within 60 s: see $dir/log"
  ceph_q osd pool create "$pool" 8 >/dev/null 2>&1
  timeout 30 rbd --conf "$conf" pool init "$pool"
  wait_for 60 pgs_clean || die "the placement groups were not clean within 60 s: see $dir/log"
  echo "ceph-cluster: up in $((SECONDS - t0)) s; pool $pool; monitor on 127.0.0.1:$mon_port" >&2
  echo "CEPH_CONF=$conf"
}

# ceph.conf for a monitor on 127.0.0.1:$1 (msgr v2) and :$1+1 (v1).
write_conf() {
  mon_port=$1
  cat >"$conf" <<CONF
[global]
fsid = $(cat /proc/sys/kernel/random/uuid)
mon host = [v2:127.0.0.1:$1,v1:127.0.0.1:$(($1 + 1))]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
osd crush chooseleaf type = 0
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail crit = 0
mon data avail warn = 0
run dir = $dir/run
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.\$pid.asok
keyring = /dev/null
osd objectstore = memstore
memstore device bytes = ${CEPH_MEMSTORE_BYTES:-4294967296}
[mon.a]
mon data = $dir/mon
public addrv = [v2:127.0.0.1:$1,v1:127.0.0.1:$(($1 + 1))]
[mgr.x]
mgr data = $dir/mgr
[osd.0]
osd data = $dir/osd
CONF
}

case "$cmd" in
  # die() exits the script, so a failed start stops what it started from the EXIT trap.
  start) trap stop_cluster EXIT; start_cluster; trap - EXIT ;;
  stop) [ -d "$dir/run" ] && stop_cluster; true ;;
  status) [ -e "$conf" ] && ceph_q -s >/dev/null ;;
  *) die "unknown command $cmd (start, stop or status)" ;;
esac
