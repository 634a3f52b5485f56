"""Podman for the image test: build the Dockerfile from a locally made base image and run it.

No registry is reachable from CI, so the Dockerfile's ``BASE_IMAGE`` is a Debian root
filesystem made by ``debootstrap`` from the host's own apt mirror and imported into podman.
That takes a few minutes, so the result is kept under a tag derived from its recipe and
reused by later runs; a change to the recipe (or to the host's CA bundle) makes a new one.

What the host needs, found out the hard way:

- runtime ``runc``: crun, podman's first choice, cannot start containers on the CI
  machines' cgroup setup;
- explicit ulimits: podman's default limits are above the hard limits a process in an
  unprivileged CI container has, and runc then fails to create the container;
- ``--format docker``: the OCI image format has no HEALTHCHECK, podman would drop it;
- the host's CA bundle inside the base image: outbound TLS may be intercepted by a proxy
  whose CA only the host trusts, and pip inside the build must reach the package index.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

from deploy.stack.process import require_binary, run_logged

ROOT = Path(__file__).resolve().parents[1]

BASE_SUITE = "bookworm"
# The Dockerfile only needs a Python 3.11+ with venv: pip comes with the venv.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_REPOSITORY = "localhost/fastapi-ops-test-base"
# Bump to rebuild every cached base image after a change to how it is made.
BASE_RECIPE_VERSION = "1"
IMAGE_TAG = "localhost/fastapi-ops-service:test"
BUILDER_TAG = "localhost/fastapi-ops-service:test-builder"

# Where the base image keeps the host's CA bundle, and the variables that point at it.
_IMAGE_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_BASE_ENV = {"PIP_CERT": _IMAGE_CA_BUNDLE, "SSL_CERT_FILE": _IMAGE_CA_BUNDLE}
# Left out of the imported tree: apt's package cache and index, about 90 MB nobody uses.
_BASE_EXCLUDES = ("./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*")
_APT_SOURCES = Path("/etc/apt")

_WHY_PODMAN = "the image test builds and runs the Dockerfile (apt: podman runc)"
_WHY_DEBOOTSTRAP = "the image test makes its base image locally (apt: debootstrap)"
_SBIN = ("/usr/sbin", "/sbin")
_DEBOOTSTRAP_TIMEOUT = 1200
_BUILD_TIMEOUT = 1200
_COMMAND_TIMEOUT = 120
_NPROC_LIMIT = 4096


class PodmanError(RuntimeError):
    pass


@dataclass(frozen=True)
class Podman:
    binary: str

    @classmethod
    def find(cls) -> Podman:
        """Rootful podman with runc; skips the test without them (fails it when
        REQUIRE_SERVICES=1, as require_binary does)."""
        podman = require_binary("podman", why=_WHY_PODMAN, extra_dirs=_SBIN)
        require_binary("runc", why=_WHY_PODMAN, extra_dirs=_SBIN)
        if os.geteuid() != 0:
            # debootstrap needs root, and so do --network host and reading the
            # container's processes in /proc.
            message = "the image test needs root (rootful podman, debootstrap)"
            if os.environ.get("REQUIRE_SERVICES") == "1":
                pytest.fail(f"{message} (REQUIRE_SERVICES=1 makes this an error)", pytrace=False)
            pytest.skip(message)
        return cls(podman)

    def command(self, *args: str) -> list[str]:
        return [self.binary, "--runtime", "runc", *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = _COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def image_exists(self, reference: str) -> bool:
        return self.run("image", "exists", reference, check=False).returncode == 0

    def image_id(self, reference: str) -> str | None:
        result = self.run("image", "inspect", "--format", "{{.Id}}", reference, check=False)
        return result.stdout.strip() if result.returncode == 0 else None


def ulimit_options() -> list[str]:
    """``--ulimit`` options podman can grant inside an unprivileged CI container.

    Its defaults (about a million open files and four million processes) are above what
    such a process may set. Even the process limit pytest itself runs with was refused on
    the CI machines (podman was seen running with a lower one than its parent), so open
    files get this process's limits and processes a modest fixed number, plenty for a
    service that runs a handful.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    options = ["--ulimit", f"nproc={_NPROC_LIMIT}:{_NPROC_LIMIT}"]
    if hard != resource.RLIM_INFINITY:
        options += ["--ulimit", f"nofile={soft}:{hard}"]
    return options


def base_image(podman: Podman, work_dir: Path) -> str:
    """The tag of the local base image, made first if no earlier run left it."""
    ca_bundle = host_ca_bundle()
    tag = f"{BASE_REPOSITORY}:{_base_recipe_digest(ca_bundle)}"
    if not podman.image_exists(tag):
        _make_base_image(podman, tag, ca_bundle, work_dir)
    return tag


def build_image(podman: Podman, base: str, log_path: Path) -> str:
    """Build the Dockerfile on `base`; returns the image id. The build's output goes to
    `log_path`.

    The layer cache makes a rebuild of unchanged sources take seconds. The builder stage
    is tagged too, so that when the sources change the previous build's images (a tagged
    final image and a tagged builder stage) can be removed instead of left dangling.
    """
    previous = {tag: podman.image_id(tag) for tag in (BUILDER_TAG, IMAGE_TAG)}
    options = [
        "--format", "docker",
        *ulimit_options(),
        "--build-arg", f"BASE_IMAGE={base}",
        *(["--build-arg", f"PIP_INDEX_URL={index}"] if (index := host_pip_index()) else []),
    ]  # fmt: skip
    log_path.unlink(missing_ok=True)
    for target, tag in ((["--target", "builder"], BUILDER_TAG), ([], IMAGE_TAG)):
        run_logged(
            podman.command("build", *options, *target, "--tag", tag, str(ROOT)),
            log_path,
            what=f"podman build of {tag}",
            timeout=_BUILD_TIMEOUT,
        )
    image = podman.image_id(IMAGE_TAG)
    assert image is not None, f"podman build did not tag {IMAGE_TAG}"
    for tag, old in previous.items():
        if old is not None and old != podman.image_id(tag):
            # Fails harmlessly while a container still uses the old image.
            podman.run("rmi", old, check=False)
    return image


def host_ca_bundle() -> Path:
    """The CA bundle the host's OpenSSL trusts."""
    path = Path(ssl.get_default_verify_paths().openssl_cafile).resolve()
    if not path.is_file():
        raise PodmanError(f"the host has no CA bundle at {path} to give the base image")
    return path


def host_pip_index() -> str | None:
    """The host's pip index URL, if it sets one that a container can reach (http/https).

    A host that needs a mirror for PyPI needs it inside the build too; one that uses the
    default index gets the default there as well.
    """
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT,
        check=False,
    )
    # Lines look like `global.index-url='https://…'`; PIP_INDEX_URL shows as `:env:.index-url`.
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] == "index-url":
            url = value.strip().strip("'\"")
            if urlparse(url).scheme in ("http", "https"):
                return url
    return None


def debian_mirror(suite: str = BASE_SUITE) -> str:
    """The Debian mirror the host's apt uses for `suite` (one-line and deb822 sources)."""
    for uri, suites, components in _apt_sources():
        wanted = suite in suites and "main" in components
        if wanted and urlparse(uri).scheme in ("http", "https"):
            return uri
    raise PodmanError(
        f"no http(s) apt source for Debian {suite!r} main in {_APT_SOURCES}/sources.list(.d): "
        "debootstrap needs a mirror to make the base image"
    )


def _apt_sources() -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of every `deb` source, in apt's order."""
    sources: list[tuple[str, list[str], list[str]]] = []
    files = [_APT_SOURCES / "sources.list", *sorted((_APT_SOURCES / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            sources += _deb822_sources(text)
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                # `deb [arch=amd64 signed-by=…] URI SUITE COMPONENT…`
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    sources.append((words[1], [words[2]], words[3:]))
    return sources


def _deb822_sources(text: str) -> list[tuple[str, list[str], list[str]]]:
    sources = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        components = fields.get("components", "").split()
        sources += [(uri, suites, components) for uri in fields.get("uris", "").split()]
    return sources


def _base_recipe_digest(ca_bundle: Path) -> str:
    # The mirror is left out: any mirror of the suite gives the same image.
    recipe = "\n".join(
        [
            BASE_RECIPE_VERSION,
            BASE_SUITE,
            ",".join(BASE_PACKAGES),
            *_BASE_EXCLUDES,
            *(f"{name}={value}" for name, value in sorted(_BASE_ENV.items())),
            hashlib.sha256(ca_bundle.read_bytes()).hexdigest(),
        ]
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _make_base_image(podman: Podman, tag: str, ca_bundle: Path, work_dir: Path) -> None:
    debootstrap = require_binary("debootstrap", why=_WHY_DEBOOTSTRAP, extra_dirs=_SBIN)
    mirror = debian_mirror()
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=work_dir))
    log_path = work_dir / "debootstrap.log"
    try:
        log_path.unlink(missing_ok=True)
        run_logged(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                BASE_SUITE,
                str(rootfs),
                mirror,
            ],
            log_path,
            what="debootstrap",
            timeout=_DEBOOTSTRAP_TIMEOUT,
        )
        shutil.copyfile(ca_bundle, rootfs / _IMAGE_CA_BUNDLE.lstrip("/"))
        _import_rootfs(podman, rootfs, tag)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def _import_rootfs(podman: Podman, rootfs: Path, tag: str) -> None:
    # Numeric owners: names would be looked up in the host's user database, not the image's.
    tar_command = ["tar", "--numeric-owner", "-C", str(rootfs), "-c"]
    tar_command += [f"--exclude={pattern}" for pattern in _BASE_EXCLUDES]
    changes = [f"--change=ENV={name}={value}" for name, value in _BASE_ENV.items()]
    with subprocess.Popen(
        [*tar_command, "."], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as tar:
        assert tar.stdout is not None
        imported = subprocess.run(
            podman.command("import", *changes, "-", tag),
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=_DEBOOTSTRAP_TIMEOUT,
            check=False,
        )
        tar.stdout.close()
        tar_errors = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
    if tar.returncode != 0 or imported.returncode != 0:
        # A half-imported tag would be taken for a good base image by the next run.
        podman.run("rmi", "--force", tag, check=False)
        raise PodmanError(
            f"importing {rootfs} as {tag} failed (tar {tar.returncode}, podman import "
            f"{imported.returncode}):\n{tar_errors}{imported.stdout}{imported.stderr}"
        )
