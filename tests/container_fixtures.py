"""Container images for the container tests, built with podman from Debian packages only
(no image registry is needed; Debian's archive and the package index pip uses are).

- A **base image** per package set: ``mmdebstrap --variant=minbase`` of Debian bookworm,
  imported with ``podman import``. It stands in for ``python:3.12-slim`` (and for the Redis,
  PostgreSQL and nginx images of compose.yaml). Tagged by a hash of its recipe, so podman's
  own image store is the cache: a second run reuses it (cold: ~35 s per base).
- A **wheelhouse** for the base's Python: the hub's dependencies, downloaded on the host by
  the host's pip (a build container may not reach the package index), resolved for the
  base's interpreter. Cached under ``/var/tmp/revenge-ws-container-cache`` by a hash of
  pyproject.toml and that interpreter's version; mounted into the build at ``/wheelhouse``,
  which the Containerfile then installs from without an index.
- The **hub image**, built once per test session from the repository's Containerfile
  (``--build-arg BASE=<base image>``); podman's layer cache makes a rebuild after a source
  change cost one ``pip wheel``.

Without podman (or mmdebstrap, or a working ``podman run``) the tests are skipped, except
when ``CI`` is set: then they fail, so CI never passes without them.

Containers run with ``--runtime runc`` (crun refuses the hybrid cgroup layout of these
machines) and explicit ulimits; every port is published on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import email.parser
import fcntl
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

__all__ = [
    "HUB_PACKAGES",
    "RUN_FLAGS",
    "HubImage",
    "debian_base",
    "hub_image",
    "podman",
    "require_podman",
]

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("REVENGE_CONTAINER_CACHE", "/var/tmp/revenge-ws-container-cache"))
SUITE = "bookworm"
#: What the hub's base needs: the interpreter, its venv module, CA certificates.
HUB_PACKAGES = ("python3", "python3-venv", "ca-certificates")


def _ulimits() -> tuple[str, ...]:
    """Explicit limits (podman's defaults may exceed this process's hard limits, and then
    runc refuses to start), at most this process's own."""
    flags: list[str] = []
    for name, which, want in (
        ("nofile", resource.RLIMIT_NOFILE, 65536),
        ("nproc", resource.RLIMIT_NPROC, 8192),
    ):
        hard = resource.getrlimit(which)[1]
        n = want if hard == resource.RLIM_INFINITY else min(want, hard)
        flags += ["--ulimit", f"{name}={n}:{n}"]
    return tuple(flags)


#: The same limits for the RUN steps of ``podman build``.
BUILD_FLAGS = _ulimits()
#: Flags every ``podman run`` of these tests needs on these machines.
RUN_FLAGS = ("--runtime", "runc", *BUILD_FLAGS)
HUB_TAG = "localhost/revenge-ws:test"
#: A label of the hub image's final stage (Containerfile).
TITLE_LABEL = "org.opencontainers.image.title=revenge-ws"


def podman(
    *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``podman ARGS`` (``env`` is added to its environment); raises with its stderr when it
    fails and ``check`` is true."""
    out = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed:\n{out.stderr[-3000:]}")
    return out


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install podman, mmdebstrap and runc: see .ci/run)")
    pytest.skip(reason)


def require_podman() -> None:
    """Skip (fail under CI) unless podman, runc and mmdebstrap are installed and podman works."""
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is not installed (apt-get install podman runc mmdebstrap)")
    try:
        out = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"podman does not answer: {exc}")
        return
    if out.returncode != 0:
        _unavailable(f"podman does not work here: {out.stderr.strip()[-500:]}")


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """One builder at a time per machine (two test runs would race on the same cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def debian_base(name: str, packages: tuple[str, ...]) -> str:
    """A podman image of Debian ``SUITE`` (minbase) with ``packages``; built once per recipe."""
    recipe = json.dumps([SUITE, "minbase", sorted(packages)]).encode()
    tag = f"localhost/revenge-ws-base-{name}:{hashlib.sha256(recipe).hexdigest()[:12]}"
    with _cache_lock():
        if podman("image", "exists", tag, check=False).returncode == 0:
            return tag
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
            tar = Path(tmp) / "rootfs.tar"
            out = subprocess.run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    "--include=" + ",".join(packages),
                    SUITE,
                    str(tar),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"mmdebstrap failed:\n{out.stderr[-3000:]}")
            podman("import", str(tar), tag, timeout=300)
    return tag


def _target_environment(base: str) -> dict[str, str]:
    """The PEP 508 marker environment of the base image's ``python3``."""
    script = (
        "import json, os, platform, sys\n"
        "print(json.dumps({'implementation_name': sys.implementation.name,"
        " 'implementation_version': platform.python_version(),"
        " 'os_name': os.name, 'platform_machine': platform.machine(),"
        " 'platform_python_implementation': platform.python_implementation(),"
        " 'platform_release': platform.release(), 'platform_system': platform.system(),"
        " 'platform_version': platform.version(),"
        " 'python_full_version': platform.python_version(),"
        " 'python_version': '.'.join(platform.python_version_tuple()[:2]),"
        " 'sys_platform': sys.platform}))"
    )
    out = podman("run", "--rm", *RUN_FLAGS, "--network", "none", base, "python3", "-c", script)
    env: dict[str, str] = json.loads(out.stdout)
    return env


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        parsed = email.parser.Parser().parsestr(z.read(meta).decode())
    return parsed.get_all("Requires-Dist") or []


def _wheel_name(wheel: Path) -> str:
    return canonicalize_name(wheel.name.split("-")[0])


def wheelhouse(base: str) -> Path:
    """Wheels of every dependency of ``revenge-ws[redis,postgres,speed]`` (and the build
    backend) for the Python of ``base``; downloaded by the host's pip, cached."""
    target = _target_environment(base)
    key = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + json.dumps(target, sort_keys=True).encode()
    ).hexdigest()[:12]
    dest = CACHE / f"wheels-{key}"
    with _cache_lock():
        if (dest / ".complete").exists():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        pip = [sys.executable, "-m", "pip"]
        pyver = target["python_full_version"]
        download = [
            *pip,
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            pyver,
            "--implementation",
            "cp",
            "--dest",
            str(dest),
        ]

        def run(cmd: list[str]) -> None:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[2:4])} failed:\n{out.stderr[-3000:]}")

        with tempfile.TemporaryDirectory() as own:
            run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", own, str(ROOT)])
            (hub_wheel,) = Path(own).glob("revenge_ws-*.whl")
            extras = "[redis,postgres,speed]"
            run([*download, f"{hub_wheel}{extras}", "setuptools>=69", "wheel"])
            # pip evaluates environment markers for the host's interpreter, not the target's
            # (redis needs async-timeout below Python 3.11.3): add what the target's markers
            # ask for until nothing is missing.
            wanted = [Requirement(r) for r in _requires(hub_wheel)]
            wanted = [r for r in wanted if r.marker is None or any(
                r.marker.evaluate({**target, "extra": e}) for e in ("redis", "postgres", "speed")
            )]  # fmt: skip
            for _ in range(10):
                have = {_wheel_name(w) for w in dest.glob("*.whl")}
                missing = [str(r) for r in wanted if canonicalize_name(r.name) not in have]
                for wheel in dest.glob("*.whl"):
                    for text in _requires(wheel):
                        req = Requirement(text)
                        if req.marker is not None and not req.marker.evaluate(
                            {**target, "extra": ""}
                        ):
                            continue
                        if canonicalize_name(req.name) not in have:
                            missing.append(re.sub(r";.*", "", text).strip())
                if not missing:
                    break
                run([*download, *sorted(set(missing))])
            else:
                raise RuntimeError("the wheelhouse does not converge")
        (dest / ".complete").touch()
    return dest


@dataclass(frozen=True)
class HubImage:
    tag: str
    base: str
    #: Bytes, as podman reports it.
    size: int
    build_log: str


def hub_image() -> HubImage:
    """The hub image from the repository's Containerfile, on a Debian base."""
    base = debian_base("python", HUB_PACKAGES)
    wheels = wheelhouse(base)
    with _cache_lock():
        out = podman(
            "build",
            "--format",
            "docker",
            *BUILD_FLAGS,
            "--volume",
            f"{wheels}:/wheelhouse:ro",
            "--build-arg",
            f"BASE={base}",
            "--build-arg",
            f"SOURCE={ROOT}",
            "--file",
            str(ROOT / "Containerfile"),
            "--tag",
            HUB_TAG,
            str(ROOT),
            timeout=900,
        )
        # What earlier runs left: hub images replaced by this one (untagged now) and
        # wheelhouses of another pyproject.toml or interpreter.
        podman("image", "prune", "--force", "--filter", f"label={TITLE_LABEL}", check=False)
        for old in CACHE.glob("wheels-*"):
            if old != wheels:
                shutil.rmtree(old, ignore_errors=True)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", HUB_TAG).stdout.strip())
    return HubImage(HUB_TAG, base, size, out.stdout + out.stderr)


def random_secret() -> str:
    return secrets.token_hex(32)


#: Stand-ins for the official images compose.yaml names, built from Debian packages: the same
#: interface as far as compose.yaml uses it (commands, ports, POSTGRES_* variables, data
#: directories, /etc/nginx/conf.d).
SERVICES_PACKAGES = ("redis-server", "postgresql", "nginx", "ca-certificates")
_POSTGRES_ENTRYPOINT = r"""#!/bin/sh
# The official image's first-start initialisation, reduced to what compose.yaml uses.
set -eu
bin=$(echo /usr/lib/postgresql/*/bin)
data=/var/lib/postgresql/data
if [ ! -s "$data/PG_VERSION" ]; then
  pw=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" > "$pw"
  "$bin/initdb" --pgdata "$data" --username "$POSTGRES_USER" --pwfile "$pw" \
    --auth-local trust --auth-host scram-sha-256 > /dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >> "$data/pg_hba.conf"
  "$bin/pg_ctl" --pgdata "$data" --options "-c listen_addresses=''" --wait start > /dev/null
  "$bin/createdb" --username "$POSTGRES_USER" "$POSTGRES_DB"
  "$bin/pg_ctl" --pgdata "$data" --mode fast --wait stop > /dev/null
fi
exec "$bin/postgres" -D "$data" -c listen_addresses='*'
"""
_SERVICE_CONTAINERFILES = {
    "redis": """FROM {base}
RUN mkdir -p /data
WORKDIR /data
CMD ["redis-server", "--protected-mode", "no"]
""",
    "postgres": """FROM {base}
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
RUN chmod 755 /usr/local/bin/postgres-entrypoint.sh \\
 && mkdir -p /var/lib/postgresql/data /run/postgresql \\
 && chown postgres:postgres /var/lib/postgresql/data /run/postgresql \\
 && chmod 700 /var/lib/postgresql/data
USER postgres
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
""",
    "nginx": """FROM {base}
RUN rm -f /etc/nginx/sites-enabled/default \\
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
""",
}


def service_images() -> dict[str, str]:
    """``{"REDIS_IMAGE": tag, "POSTGRES_IMAGE": tag, "NGINX_IMAGE": tag}`` for compose.yaml."""
    base = debian_base("services", SERVICES_PACKAGES)
    tags: dict[str, str] = {}
    with _cache_lock(), tempfile.TemporaryDirectory() as ctx:
        (Path(ctx) / "postgres-entrypoint.sh").write_text(_POSTGRES_ENTRYPOINT)
        for name, text in _SERVICE_CONTAINERFILES.items():
            (Path(ctx) / f"{name}.Containerfile").write_text(text.format(base=base))
            tag = f"localhost/revenge-ws-test-{name}:latest"
            podman(
                "build",
                *BUILD_FLAGS,
                "--file",
                f"{ctx}/{name}.Containerfile",
                "--tag",
                tag,
                ctx,
                timeout=300,
            )
            tags[f"{name.upper()}_IMAGE"] = tag
    return tags
