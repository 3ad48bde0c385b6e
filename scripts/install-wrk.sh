#!/bin/sh
# Installs Debian's wrk package when we can (root + apt-get); otherwise says in one line
# what to install. The benchmark runs without wrk too (a slower asyncio load generator
# stands in), so with --optional a failure is not an error.
set -u
optional=0
[ "${1:-}" = "--optional" ] && optional=1
if command -v wrk >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "wrk not found: installing Debian's wrk package" >&2
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) >/dev/null 2>&1; then
        command -v wrk >/dev/null 2>&1 && exit 0
    fi
fi
echo "wrk not found: install it (e.g. 'sudo apt-get install wrk') for the real load generator; the benchmark falls back to a slower asyncio one" >&2
[ "$optional" = "1" ] && exit 0
exit 1
