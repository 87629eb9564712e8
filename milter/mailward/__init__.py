"""mailward: a policy-enforcing mail filter (milter) for Postfix and Sendmail."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Run from the Debian package, mailward uses the newer libraries it bundles
# (packaging/debian/vendor.txt) before Debian's own; from anywhere else, nothing changes.
_PRIVATE = "/usr/lib/mailward/python"
if (__file__.startswith("/usr/lib/python3/dist-packages/") and _os.path.isdir(_PRIVATE)
        and _PRIVATE not in _sys.path):
    _sys.path.insert(0, _PRIVATE)
