"""Let ``import libp2p`` succeed where ``/etc/resolv.conf`` does not exist (Android/Termux).

py-libp2p builds dnspython resolvers for ``/dns*`` multiaddrs: one at import time
(``libp2p.discovery.bootstrap.bootstrap``), one in every ``Swarm.__init__``, and more when
dialing. dnspython configures each from ``/etc/resolv.conf`` and raises
``NoResolverConfiguration`` when the file is missing, as it is on Android. Termux keeps its
copy under ``$PREFIX/etc/resolv.conf``.

So, when the system file is missing, :func:`guard_resolv_conf` makes every resolver that
would read it read Termux's instead. Without either file, resolvers start with no
nameservers: a ``/dns*`` lookup then fails at once with ``NoNameservers`` and sends
nothing (a loopback nameserver would send packets and wait out dnspython's timeouts).
Salala itself dials only ``/ip4``/``/ip6`` addresses, so a node needs no DNS.

Where ``/etc/resolv.conf`` exists, nothing is changed. Importing this module applies the
guard; ``salala.mesh`` and ``salala.node`` import it before anything else, since either
may be imported first and both lead to libp2p.
"""

import functools
import os
from pathlib import Path
from typing import Any

SYSTEM_RESOLV_CONF = "/etc/resolv.conf"  # dnspython's default file on POSIX
TERMUX_PREFIX = "/data/data/com.termux/files/usr"  # Termux's $PREFIX, if the env lacks it


def guard_resolv_conf(
    system: Path = Path(SYSTEM_RESOLV_CONF), prefix: str | None = None
) -> None:
    """If ``system`` is missing, point dnspython's default configuration elsewhere.

    The replacement is ``<prefix>/etc/resolv.conf`` (``prefix`` defaults to ``$PREFIX``,
    else Termux's) when that file exists, and no nameservers otherwise. Idempotent.
    """
    if system.exists():
        return
    import dns.resolver  # only here: most devices never need it before libp2p does

    base = dns.resolver.BaseResolver
    if getattr(base.__init__, "_salala_guard", False):
        return
    termux = Path(prefix or os.environ.get("PREFIX") or TERMUX_PREFIX) / "etc" / "resolv.conf"
    original = base.__init__

    @functools.wraps(original)
    def __init__(self: Any, filename: Any = SYSTEM_RESOLV_CONF, configure: bool = True) -> None:
        if not configure or filename != SYSTEM_RESOLV_CONF:
            original(self, filename, configure)  # an explicit file or no configuration
        elif termux.exists():
            original(self, str(termux), True)
        else:
            original(self, configure=False)  # no nameservers: lookups fail, send nothing

    __init__._salala_guard = True  # type: ignore[attr-defined]
    base.__init__ = __init__  # type: ignore[method-assign]


guard_resolv_conf()  # importing this module is the guard: it must precede libp2p's import
