#!/bin/sh
# Installs Debian's redis-server package when we can (root + apt-get); otherwise says
# in one line what to install. With --optional a failure is not an error (the demo
# falls back to the in-process memory store).
set -u
optional=0
[ "${1:-}" = "--optional" ] && optional=1
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not found: installing Debian's redis-server package" >&2
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools) >/dev/null 2>&1; then
        # The package may start a system Redis on 6379; the tests and demo use their own ports.
        command -v redis-server >/dev/null 2>&1 && exit 0
    fi
fi
echo "redis-server not found: install Redis >= 7 (e.g. 'sudo apt-get install redis-server') and retry" >&2
[ "$optional" = "1" ] && exit 0
exit 1
