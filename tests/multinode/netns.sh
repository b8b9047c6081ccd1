#!/bin/sh
# Run a command inside a private network namespace whose only interface is loopback (up):
#   tests/multinode/netns.sh python -m pytest -m multinode tests/multinode
# A multi-node Ray cluster on one machine must not bind the machine's real interfaces, and
# in a namespace of its own it cannot: Ray falls back to 127.0.0.1, and every service the
# tests start (S3, MLflow, Ray nodes) lives in the same namespace.
# Needs root, or unprivileged user namespaces (then `unshare -rn`).
set -eu
UP='import fcntl, socket, struct
s = socket.socket(); req = struct.pack("16sH", b"lo", 0)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, req))[1]   # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))   # SIOCSIFFLAGS: IFF_UP'
PY=${PYTHON:-python3}
if unshare -n true 2>/dev/null; then
    FLAGS=-n
elif unshare -rn true 2>/dev/null; then
    FLAGS=-rn
else
    echo "netns.sh: cannot create a network namespace here (needs root or unprivileged" \
         "user namespaces); the multi-node tests cannot run" >&2
    exit 1
fi
exec unshare $FLAGS -- "$PY" -c "$UP
import os, sys
os.execvp(sys.argv[1], sys.argv[1:])" "$@"
