#!/bin/sh
# Install the named Debian packages that are missing (as root), or say exactly what to run.
set -eu
missing=""
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "Missing Debian packages. Run as root:  apt-get install$missing" >&2
    exit 1
fi
echo "Installing Debian packages:$missing"
apt-get update -qq
# Postfix must not configure itself as a system MTA: mailward's lab runs its own instances.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
