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
# Nor may a package start a system daemon (redis-server, prometheus): the tests start private
# instances on loopback. Debian's policy-rc.d (exit 101) tells invoke-rc.d not to start them.
guard=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    guard=yes
fi
trap '[ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
