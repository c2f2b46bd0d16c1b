"""A node starts where /etc/resolv.conf does not exist, as on Android (mesh/_resolver.py).

The slow test hides the file in a private mount namespace: /etc is covered by a directory
of symlinks to every entry of the real /etc except resolv.conf. The unit tests drive the
guard with paths of their own and restore dnspython afterwards.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dns.asyncresolver
import dns.resolver
import numpy as np
import onnxruntime as ort
import pytest
from conftest import minilm_inputs, minilm_path, start_node
from multiaddr.resolvers import DNSResolver
from salala.mesh._resolver import guard_resolv_conf

# Run inside the namespace: bind the real /etc aside ($0/orig), cover /etc with the
# symlinks ($0/etc), then become the command. The mounts vanish with the process.
HIDE = 'mount --bind /etc "$0/orig" && mount --bind "$0/etc" /etc && exec "$@"'


def hidden_resolv_conf(root: Path) -> tuple[str, ...]:
    """A command prefix that runs its command with /etc/resolv.conf missing; or skip."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    (root / "orig").mkdir(parents=True)
    (root / "etc").mkdir()
    for name in os.listdir("/etc"):
        if name != "resolv.conf":
            (root / "etc" / name).symlink_to(root / "orig" / name)
    reasons = []
    # As root a mount namespace is enough; others need a user namespace to mount in.
    for unshare in (("unshare", "-m"), ("unshare", "-r", "-m")):
        prefix = (*unshare, "sh", "-c", HIDE, str(root))
        probe = subprocess.run(
            [*prefix, "test", "!", "-e", "/etc/resolv.conf", "-a", "-e", "/etc/hosts"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return prefix
        reasons.append(f"{' '.join(unshare)}: {probe.stderr.strip() or probe.returncode}")
    pytest.skip(f"cannot hide /etc/resolv.conf in a mount namespace: {'; '.join(reasons)}")


@pytest.mark.slow
def test_a_node_starts_and_serves_without_etc_resolv_conf(tmp_path: Path) -> None:
    prefix = hidden_resolv_conf(tmp_path / "hide")
    # The namespace reproduces Android's failure: libp2p alone cannot be imported there.
    bare = subprocess.run(
        [*prefix, sys.executable, "-c", "import libp2p"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bare.returncode != 0 and "NoResolverConfiguration" in bare.stderr, bare.stderr

    node = start_node(tmp_path / "node", prefix=prefix)
    try:
        with node.client() as client:
            status = client.status()
            assert status["pid"] == node.process.pid  # the node inside the namespace
            assert status["addrs"]
            assert all(a.startswith("/ip4/127.0.0.1/tcp/") for a in status["addrs"])
            feeds = minilm_inputs(batch=2, tokens=16, seed=3)
            outputs = client.infer("minilm", feeds)
        plain = ort.InferenceSession(str(minilm_path()), providers=["CPUExecutionProvider"])
        assert np.abs(outputs["last_hidden_state"] - plain.run(None, feeds)[0]).max() <= 1e-5
    finally:
        assert node.stop() == 0, node.log()


@pytest.fixture
def dnspython(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the guard's change to dnspython when the test ends."""
    base = dns.resolver.BaseResolver
    monkeypatch.setattr(base, "__init__", base.__init__)


@pytest.mark.usefixtures("dnspython")
def test_an_existing_system_file_changes_nothing(tmp_path: Path) -> None:
    before = dns.resolver.BaseResolver.__init__
    system = tmp_path / "resolv.conf"
    system.write_text("nameserver 192.0.2.1\n")
    guard_resolv_conf(system, prefix=str(tmp_path))
    assert dns.resolver.BaseResolver.__init__ is before


@pytest.mark.usefixtures("dnspython")
def test_without_the_system_file_resolvers_read_termux_resolv_conf(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "resolv.conf").write_text("nameserver 192.0.2.53\nsearch lan\n")
    guard_resolv_conf(tmp_path / "missing", prefix=str(tmp_path))
    guard_resolv_conf(tmp_path / "missing", prefix=str(tmp_path))  # a second call: no-op
    for resolver in (dns.resolver.Resolver(), dns.asyncresolver.Resolver()):
        assert resolver.nameservers == ["192.0.2.53"]
        assert resolver.search == [dns.name.from_text("lan")]
    assert DNSResolver()._resolver.nameservers == ["192.0.2.53"]  # what libp2p builds


@pytest.mark.usefixtures("dnspython")
def test_without_any_resolv_conf_lookups_fail_at_once(tmp_path: Path) -> None:
    guard_resolv_conf(tmp_path / "missing", prefix=str(tmp_path))
    resolver = dns.resolver.Resolver()
    assert resolver.nameservers == []
    with pytest.raises(dns.resolver.NoNameservers):
        resolver.resolve("example.com")  # with no nameserver nothing is sent


@pytest.mark.usefixtures("dnspython")
def test_an_explicit_file_is_still_read(tmp_path: Path) -> None:
    guard_resolv_conf(tmp_path / "missing", prefix=str(tmp_path))
    explicit = tmp_path / "mine.conf"
    explicit.write_text("nameserver 192.0.2.7\n")
    assert dns.resolver.Resolver(str(explicit)).nameservers == ["192.0.2.7"]
    assert dns.resolver.Resolver(configure=False).nameservers == []
    with pytest.raises(dns.resolver.NoResolverConfiguration):
        dns.resolver.Resolver(str(tmp_path / "absent.conf"))
