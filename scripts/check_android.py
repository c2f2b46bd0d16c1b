"""Check on this machine that a Termux phone can install the node: `make check-android`.

Termux's pip installs only ``py3-none-any`` and ``android_*_arm64_v8a`` wheels, so every
dependency of the node is one of:

- packaged by Termux (``pkg install``): not fetched here, only listed;
- a wheel on PyPI for Android or for any platform: fetched with ``pip download
  --only-binary=:all: --platform android_2X_arm64_v8a --python-version 3.14``;
- neither: the phone builds it from its sdist. The sdist is built here with the build
  variables of ``scripts/install-termux.sh`` and against the system libraries Termux also
  packages (libsodium, libgmp, libsecp256k1), so a missing flag or library shows up here.

The walk follows every dependency (``--no-deps``, one package at a time, so one missing
wheel does not hide the rest) and the build requirements of every sdist: those are
installed on the phone too. Downloads and built wheels are cached in
``~/.cache/salala-android``, built wheels keyed by name and version, so a second run only
asks PyPI which versions are current. It prints a table, writes JSON, and exits 1 when a
dependency resolves to nothing or a source build fails.

Python here is not Termux's 3.14 and the compiler is not Android's clang: this shows that
the sources, flags and libraries fit together, not that the phone's toolchain accepts them.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version
from rich.console import Console
from rich.table import Table

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "scripts" / "termux-constraints.txt"
# Packages whose build needs other pins than the rest: coincurve 21's build hook fails on
# cffi 2's license layout, while pynacl's needs cffi 2. install-termux.sh installs these
# first, each with its own file.
OWN_CONSTRAINTS = {"coincurve": ROOT / "scripts" / "termux-constraints-coincurve.txt"}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "salala-android"
PYTHON_VERSION = "3.14"  # Termux's Python
# Termux is built for API level 24; its pip also takes wheels for older levels.
PLATFORMS = [f"android_{api}_arm64_v8a" for api in range(21, 25)]
# What `pkg install` provides (python-tokenizers is in the TUR repository): pip on the
# phone finds these installed and fetches nothing.
TERMUX_PACKAGES = {
    "onnxruntime": "python-onnxruntime",
    "numpy": "python-numpy",
    "cryptography": "python-cryptography",
    "psutil": "python-psutil",
    "grpcio": "python-grpcio",
    "msgpack": "python-msgpack",
    "tokenizers": "python-tokenizers",
    "pydantic-core": "python-pydantic-core",  # typer needs pydantic; its core is Rust
}
# Markers as Termux's Python evaluates them.
ANDROID: dict[str, str] = {
    "platform_release": "",
    "platform_version": "",
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.0",
    "implementation_version": f"{PYTHON_VERSION}.0",
    "sys_platform": "android",
    "platform_system": "Android",
    "platform_machine": "aarch64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
PIP_TIMEOUT_S = 1800  # a download of an sdist builds it
UNVERIFIED = "not checked here"  # the build fetches from a host this machine cannot reach


def build_env(python: str) -> dict[str, str]:
    """The variables install-termux.sh sets, for ``python``'s version and library."""
    probe = "import sys, sysconfig; print(f'{sys.version_info[0]}.{sys.version_info[1]}'), "
    probe += "print(sysconfig.get_config_var('LIBDIR'))"
    version, libdir = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    return {
        "SODIUM_INSTALL": "system",  # pynacl: link Termux's libsodium, build none
        "COINCURVE_IGNORE_SYSTEM_LIB": "OFF",  # coincurve: link Termux's libsecp256k1
        "SKIP_CYTHON": "1",  # zeroconf: pure Python
        "ANDROID_API_LEVEL": "24",  # Rust builds (maturin) targeting Android
        # coincurve's CMake build does not link libpython, which Android requires
        "LDFLAGS": f"-L{libdir} -lpython{version}",
    }


@dataclass
class Row:
    name: str
    version: str = ""
    needed_by: str = ""
    kind: str = "run"  # "run", or "build" for a build requirement of an sdist
    android_wheel: str = ""  # yes / pure / no / termux pkg / skipped
    needs_compiler: str = ""  # no / yes (C) / yes (Rust)
    source_build: str = ""  # ok / ok (cached) / failed: reason
    requires: list[str] = field(default_factory=list)


def pip(
    args: list[str],
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    constraints: Path = CONSTRAINTS,
) -> subprocess.CompletedProcess[str]:
    """pip with the Termux constraints, which also bind the build requirements it installs."""
    command = [python, "-m", "pip", "--disable-pip-version-check", *args]
    env = {**os.environ, **(env or {}), "PIP_CONSTRAINT": str(constraints)}
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 1, "", f"over {PIP_TIMEOUT_S} s")


def saved_file(output: str) -> Path | None:
    for line in (ln.strip() for ln in output.splitlines()):
        for lead in ("Saved ", "File was already downloaded "):
            if line.startswith(lead):
                return Path(line[len(lead) :].strip())
    return None


def download(
    requirement: Requirement, python: str = sys.executable, env: dict[str, str] | None = None
) -> tuple[Path | None, str]:
    """An Android or pure wheel, or (given ``env``) the sdist; or None and pip's reason.

    pip builds an sdist to read its metadata, so the sdist is fetched with the build
    variables. ``--no-binary`` names the one package: with ``:all:`` pip would also build
    its build requirements (cmake, ...) from source.
    """
    kinds = ["--only-binary=:all:", *(f"--platform={p}" for p in PLATFORMS)]
    if env is not None:
        kinds = [f"--no-binary={requirement.name}"]
    dest = CACHE / ("sdists" if env is not None else "wheels")
    done = pip(
        ["download", "--no-deps", *kinds, f"--python-version={PYTHON_VERSION}",
         "-d", str(dest), str(requirement)],
        python, env, OWN_CONSTRAINTS.get(canonicalize_name(requirement.name), CONSTRAINTS),
    )  # fmt: skip
    if done.returncode == 0:
        return saved_file(done.stdout), ""
    return None, reason(done.stdout + done.stderr)


def cached_sdist(name: str) -> tuple[Path, str] | None:
    """The sdist of the version termux-constraints.txt pins, if already fetched.

    pip builds an sdist just to download it; with the version pinned, a second run skips
    that and, its wheel being cached too, builds nothing.
    """
    pins = [Requirement(ln) for ln in CONSTRAINTS.read_text().splitlines() if ln[:1].isalnum()]
    for pin in pins:
        specs = list(pin.specifier)
        if canonicalize_name(pin.name) == name and len(specs) == 1 and specs[0].operator == "==":
            for sdist in (CACHE / "sdists").glob("*.tar.gz"):
                if parse_sdist_filename(sdist.name) == (name, Version(specs[0].version)):
                    return sdist, ""
    return None


def reason(log: str) -> str:
    """The line of a failed build that says why; a fetch outside PyPI is named as such."""
    lines = [ln.strip() for ln in log.splitlines() if "WARNING: Location" not in ln]
    for host in ("crates.io", "github.com"):
        if any(host in ln and "resolve" in ln.lower() for ln in lines):
            found = [ln for ln in lines if "has version" in ln]  # pkg-config: too old
            return f"{UNVERIFIED}: fetches from {host}" + (f" ({found[0]})" if found else "")
    raised = [ln for ln in lines if re.match(r"[\w.]*(Error|Exception): ", ln)]
    errors = [ln for ln in lines if "error" in ln.lower() and "subprocess" not in ln]
    return (raised or errors or lines or ["no output"])[-1][:160]


def wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def sdist_build_requires(sdist: Path) -> tuple[list[str], bool]:
    """The sdist's ``[build-system] requires`` and whether it holds Rust (a Cargo.toml)."""
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        top = names[0].split("/")[0]
        rust = any(n.endswith("/Cargo.toml") for n in names)
        try:
            member = archive.extractfile(f"{top}/pyproject.toml")
        except KeyError:
            member = None
        if member is None:  # a setup.py project: pip builds it with setuptools
            return ["setuptools>=40.8.0"], rust
        table = tomllib.loads(member.read().decode())
    return table.get("build-system", {}).get("requires", ["setuptools>=40.8.0"]), rust


def build(name: str, version: str, sdist: Path, python: str, env: dict[str, str]) -> str:
    """Build ``sdist`` into CACHE/built/NAME-VERSION; the outcome for the table."""
    out = CACHE / "built" / f"{name}-{version}"
    if list(out.glob("*.whl")):
        return "ok (cached)"
    out.mkdir(parents=True, exist_ok=True)
    constraints = OWN_CONSTRAINTS.get(name, CONSTRAINTS)
    done = pip(["wheel", "--no-deps", "-w", str(out), str(sdist)], python, env, constraints)
    (out / "build.log").write_text(done.stdout + done.stderr)
    if done.returncode == 0:
        return "ok"
    why = reason(done.stdout + done.stderr)
    return why if why.startswith(UNVERIFIED) else f"failed: {why} (log: {out}/build.log)"


def compiled(wheel: Path) -> bool:
    with zipfile.ZipFile(wheel) as archive:
        return any(n.endswith((".so", ".pyd")) for n in archive.namelist())


def wanted(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**ANDROID, "extra": e}) for e in extras or {""})


def check(python: str) -> tuple[list[Row], dict[str, str]]:
    env = build_env(python)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    rows: dict[str, Row] = {}
    queue = [(Requirement(r), "salala", "run") for r in project["dependencies"]]
    extras: dict[str, set[str]] = {}
    pool = ThreadPoolExecutor(max_workers=6)
    while queue:
        level = []
        for requirement, parent, kind in queue:
            if not wanted(requirement, extras.get(canonicalize_name(parent), set())):
                continue
            name = canonicalize_name(requirement.name)
            if name in rows:
                if requirement.extras - extras.setdefault(name, set()):
                    extras[name] |= requirement.extras  # walk the newly asked extras
                    level.append((requirement, rows[name]))
                if name in TERMUX_PACKAGES and requirement.specifier:
                    rows[name].version += f" {requirement.specifier}"
                continue
            row = rows[name] = Row(name, needed_by=parent, kind=kind)
            extras[name] = set(requirement.extras)
            if name in TERMUX_PACKAGES:
                row.android_wheel = f"termux pkg ({TERMUX_PACKAGES[name]})"
                row.version = str(requirement.specifier)
            else:
                level.append((requirement, row))
        queue = []
        fresh = [(req, row) for req, row in level if not row.version]
        wheels = pool.map(lambda item: download(item[0])[0], fresh)
        for (requirement, row), wheel in zip(fresh, list(wheels), strict=True):
            if wheel is not None:
                _, version, _, tags = parse_wheel_filename(wheel.name)
                row.version = str(version)
                pure = all(t.platform == "any" for t in tags)
                row.android_wheel, row.needs_compiler = ("pure" if pure else "yes"), "no"
                row.requires = wheel_requires(wheel)
                continue
            row.android_wheel = "no"
            sdist, why = cached_sdist(row.name) or download(requirement, python, env)
            if sdist is None:
                row.source_build = why if why.startswith(UNVERIFIED) else f"failed: {why}"
                row.needs_compiler = "yes (Rust)" if "crates.io" in why else ""
                continue
            row.version = str(parse_sdist_filename(sdist.name)[1])
            build_requires, rust = sdist_build_requires(sdist)
            queue += [(Requirement(r), row.name, "build") for r in build_requires]
            row.source_build = build(row.name, row.version, sdist, python, env)
            built = list((CACHE / "built" / f"{row.name}-{row.version}").glob("*.whl"))
            if built:
                row.requires = wheel_requires(built[0])
                row.needs_compiler = "yes (C)" if compiled(built[0]) else "no"
            if rust:
                row.needs_compiler = "yes (Rust)"
        for _, row in level:
            for text in row.requires:
                dependency = Requirement(text)
                queue.append((dependency, row.name, row.kind))
    pool.shutdown()
    return sorted(rows.values(), key=lambda r: (r.kind, r.android_wheel != "no", r.name)), env


def failed(row: Row) -> bool:
    return row.source_build.startswith("failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the Python that builds sdists")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/check-android.json")
    args = parser.parse_args()
    started = time.monotonic()
    rows, env = check(args.python)
    elapsed = time.monotonic() - started

    table = Table(title="Android (Termux) install path: every dependency of the node")
    for column in ("package", "version", "via", "android wheel", "compiler", "source build"):
        table.add_column(column)
    for row in rows:
        via = row.needed_by if row.kind == "run" else f"build of {row.needed_by}"
        table.add_row(
            row.name, row.version.strip(), via, row.android_wheel, row.needs_compiler,
            row.source_build or "-",
        )  # fmt: skip
    console = Console(width=200)
    console.print(table)
    version = subprocess.run(
        [args.python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    console.print(f"built with Python {version} on {sysconfig.get_platform()}; variables:")
    console.print(" ".join(f"{k}={v}" for k, v in env.items()), soft_wrap=True)
    for label, names in (
        ("Termux builds from sdists", [r.name for r in rows if r.android_wheel == "no"]),
        ("of which need a compiler", [r.name for r in rows if r.needs_compiler.startswith("y")]),
        ("not checked here", [r.name for r in rows if r.source_build.startswith(UNVERIFIED)]),
    ):
        console.print(f"{label}: {', '.join(names) or 'none'}")
    console.print(f"{len(rows)} packages in {elapsed:.0f} s")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "python": version,
        "platforms": PLATFORMS,
        "build_env": env,
        "seconds": round(elapsed, 1),
        "constraints": CONSTRAINTS.read_text(),
        "packages": [asdict(r) for r in rows],
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    bad = [r.name for r in rows if failed(r)]
    if bad:
        console.print(f"[red]failed: {', '.join(bad)}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
