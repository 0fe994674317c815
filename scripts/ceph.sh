#!/usr/bin/env bash
# A throw-away single-node Ceph with an S3 endpoint (radosgw), for tests and
# benchmarks, entirely under one directory: no /etc/ceph, no systemd, no
# keyrings (auth none), data in RAM (memstore OSD). Needs Debian's ceph-mon,
# ceph-osd, radosgw and ceph-common.
#
#   scripts/ceph.sh up DIR     start it (fails if DIR already holds a running one);
#                              prints the S3 settings as environment lines
#   scripts/ceph.sh env DIR    print those lines again
#   scripts/ceph.sh down DIR   stop every daemon by the PID it wrote, remove DIR
#
# The environment lines (also in DIR/env, mode 0600):
#   AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
#   QBACKUP_S3_PATH_STYLE=1 (radosgw here has no DNS names for buckets)
#   CEPH_RGW_PID (the radosgw process, which tests stop and restart)
#   CEPH_CONF (for ceph/radosgw-admin commands)
# Ports: CEPH_MON_PORT and CEPH_RGW_PORT, or free ones picked at start.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 up|env|down|restart-rgw DIR" >&2
  exit 2
fi

free_port() {
  node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# Waits up to $2 seconds for command $1 to succeed.
wait_for() {
  local what=$1 secs=$2 i
  for ((i = 0; i < secs * 4; i++)); do
    if eval "$what" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  echo "ceph.sh: timed out waiting for: $what (logs in $dir/log)" >&2
  return 1
}

stop_pid_file() {
  local f=$1 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

start_rgw() {
  # shellcheck disable=SC1091
  . "$dir/ports"
  setsid radosgw -f -c "$dir/ceph.conf" -n client.rgw >>"$dir/log/rgw.out" 2>&1 </dev/null &
  echo $! >"$dir/pid/rgw"
  wait_for "node -e 'fetch(\"http://127.0.0.1:$RGW_PORT/\").then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))'" 60
}

up() {
  if [ -f "$dir/pid/mon" ] && kill -0 "$(cat "$dir/pid/mon")" 2>/dev/null; then
    echo "ceph.sh: a cluster already runs in $dir" >&2
    exit 1
  fi
  rm -rf "$dir"
  mkdir -p "$dir"/{mon/a,osd/0,run,log,pid,rgw}
  chmod 700 "$dir"
  dir=$(cd "$dir" && pwd)
  local mon_port=${CEPH_MON_PORT:-$(free_port)} rgw_port=${CEPH_RGW_PORT:-$(free_port)}
  printf 'MON_PORT=%s\nRGW_PORT=%s\n' "$mon_port" "$rgw_port" >"$dir/ports"
  local fsid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
ms mon client mode = crc
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
[mon]
mon data = $dir/mon/\$id
[osd]
osd data = $dir/osd/\$id
osd objectstore = memstore
memstore device bytes = 8589934592
osd max object size = 134217728
[client.rgw]
ms mon client mode = crc
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw data = $dir/rgw
rgw dns name = 127.0.0.1
rgw enable usage log = false
EOF
  monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
  ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" >>"$dir/log/mkfs.out" 2>&1
  setsid ceph-mon -f -c "$dir/ceph.conf" -i a >>"$dir/log/mon.out" 2>&1 </dev/null &
  echo $! >"$dir/pid/mon"
  local c="ceph -c $dir/ceph.conf --connect-timeout 5"
  wait_for "$c mon stat" 30
  local osd_uuid
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  $c osd new "$osd_uuid" 0 >/dev/null
  ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/mkfs.out" 2>&1
  setsid ceph-osd -f -c "$dir/ceph.conf" -i 0 >>"$dir/log/osd.out" 2>&1 </dev/null &
  echo $! >"$dir/pid/osd"
  wait_for "$c osd stat | grep -q '1 up'" 30
  start_rgw
  local access secret
  access=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)
  secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  radosgw-admin -c "$dir/ceph.conf" -n client.rgw user create --uid=qbackup --display-name=qbackup \
    --access-key="$access" --secret-key="$secret" >/dev/null 2>>"$dir/log/admin.out"
  (
    umask 077
    cat >"$dir/env" <<EOF
AWS_ENDPOINT_URL_S3=http://127.0.0.1:$rgw_port
AWS_REGION=us-east-1
AWS_ACCESS_KEY_ID=$access
AWS_SECRET_ACCESS_KEY=$secret
QBACKUP_S3_PATH_STYLE=1
CEPH_CONF=$dir/ceph.conf
CEPH_RGW_PID_FILE=$dir/pid/rgw
EOF
  )
  cat "$dir/env"
}

case "$cmd" in
  up) up ;;
  env) cat "$dir/env" ;;
  restart-rgw)
    stop_pid_file "$dir/pid/rgw"
    start_rgw
    ;;
  stop-rgw) stop_pid_file "$dir/pid/rgw" ;;
  down)
    for d in rgw osd mon; do stop_pid_file "$dir/pid/$d"; done
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 up|env|down|stop-rgw|restart-rgw DIR" >&2
    exit 2
    ;;
esac
