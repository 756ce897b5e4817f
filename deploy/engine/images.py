"""The testbed's images, built from what this host reaches: Debian's mirror and PyPI, no registry.

1. The base image (once): ``debootstrap --variant=minbase --include=ca-certificates bookworm`` from the
   mirror apt already uses, slimmed like the official ``-slim`` images (no docs, man pages or locales,
   apt lists and caches cleaned, services never start during a build), with this host's extra CA
   certificates (``/usr/local/share/ca-certificates``) trusted: HTTPS from a container here goes
   through a TLS-inspecting proxy. ``docker import`` tags it ``fedmedclip/debian:bookworm-slim`` and
   ``debian:bookworm-slim``, so unmodified ``FROM`` lines resolve locally. It is rebuilt only when
   its inputs (mirror, certificates, this recipe) change.
2. The wheelhouse (once per requirements change): ``.wheelhouse/`` in the build context, filled by
   ``pip download`` through this host's pip (its local indexes hold the torch wheels), so the
   project image installs offline and fast.
3. ``fedmedclip:latest`` (deploy/Dockerfile) and ``fedmedclip-prometheus:latest``
   (deploy/prometheus/Dockerfile), with BuildKit, progress in plain text.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

from deploy.engine.daemon import Engine, EngineError, say

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
BASE_TAG = "fedmedclip/debian:bookworm-slim"
BASE_ALIASES = ("debian:bookworm-slim",)
BASE_LABEL = "org.fedmedclip.base-inputs"
RECIPE = "2"  # bump when the base image recipe below changes
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
WHEELHOUSE = REPO_ROOT / ".wheelhouse"
IMAGE = os.environ.get("FEDMEDCLIP_IMAGE", "fedmedclip:latest")
PROMETHEUS_IMAGE = os.environ.get("FEDMEDCLIP_PROMETHEUS_IMAGE", "fedmedclip-prometheus:latest")
BUILD_LOG = REPO_ROOT / ".cache" / "testbed" / "builds.jsonl"

SLIM_DPKG = """\
# fedmedclip base image: no documentation, manual pages or translations (as Debian's -slim images)
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""
_RM_CACHES = "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"
APT_CLEAN = f"""\
# fedmedclip base image: no package archives or binary caches left in a layer (as Debian's -slim images)
DPkg::Post-Invoke {{ "{_RM_CACHES}"; }};
APT::Update::Post-Invoke {{ "{_RM_CACHES}"; }};
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
"""
POLICY_RC = "#!/bin/sh\n# fedmedclip base image: services never start during a build\nexit 101\n"


# ---------------------------------------------------------------------- the base image


def debian_mirrors() -> tuple[str, str]:
    """(archive, security) URIs apt uses on this host (deb822 .sources or sources.list)."""
    override = os.environ.get("FEDMEDCLIP_DEBIAN_MIRROR")
    archive, security = override, None
    files = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for path in files:
        for stanza in Path(path).read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.lstrip().startswith("#"):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            uris, suites = fields.get("uris", "").split(), fields.get("suites", "").split()
            if not uris or not uris[0].startswith("http"):
                continue
            if f"{SUITE}-security" in suites:
                security = security or uris[0]
            elif SUITE in suites and "debian" in uris[0]:
                archive = archive or uris[0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = [p for p in line.split() if not p.startswith("[")]
            if len(parts) >= 3 and parts[0] == "deb" and parts[1].startswith("http"):
                if parts[2] == f"{SUITE}-security":
                    security = security or parts[1]
                elif parts[2] == SUITE and "debian" in parts[1]:
                    archive = archive or parts[1]
    archive = (archive or "http://deb.debian.org/debian").rstrip("/")
    security = (security or archive.rsplit("/", 1)[0] + "/debian-security").rstrip("/")
    return archive, security


def extra_ca_certificates() -> list[Path]:
    return sorted(EXTRA_CA_DIR.glob("*.crt")) if EXTRA_CA_DIR.is_dir() else []


def base_inputs() -> str:
    archive, security = debian_mirrors()
    h = hashlib.sha256(f"{RECIPE}\n{SUITE}\n{archive}\n{security}\n".encode())
    for cert in extra_ca_certificates():
        h.update(cert.name.encode() + b"\0" + cert.read_bytes())
    return h.hexdigest()[:16]


def image_label(engine: Engine, tag: str, label: str) -> str | None:
    result = engine.docker("image", "inspect", "-f", f'{{{{ index .Config.Labels "{label}" }}}}', tag, check=False)
    return result.stdout.decode().strip() if result.returncode == 0 else None


def image_size(engine: Engine, tag: str) -> int:
    return int(engine.docker_out("image", "inspect", "-f", "{{.Size}}", tag))


def ensure_base(engine: Engine, force: bool = False) -> dict:
    """The registry-free base image; built only when missing or its inputs changed."""
    want = base_inputs()
    if not force and image_label(engine, BASE_TAG, BASE_LABEL) == want:
        for alias in BASE_ALIASES:
            engine.docker("tag", BASE_TAG, alias)
        say(f"base image {BASE_TAG} is up to date (inputs {want}): reused")
        return {"image": BASE_TAG, "built": False, "seconds": 0.0, "size": image_size(engine, BASE_TAG)}
    archive, security = debian_mirrors()
    if not Path("/usr/sbin/debootstrap").exists():
        raise EngineError("debootstrap is missing: python -m deploy.engine up installs it")
    say(f"building the base image {BASE_TAG}: debootstrap --variant=minbase {SUITE} from {archive} (about a minute)")
    t0 = time.monotonic()
    rootfs = Path(tempfile.mkdtemp(prefix="fedmedclip-rootfs-", dir="/var/tmp"))
    log = engine.log_dir / "debootstrap.log"
    engine.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("w") as fh:
            proc = subprocess.Popen(
                [
                    "/usr/sbin/debootstrap",
                    "--variant=minbase",
                    "--include=ca-certificates",
                    SUITE,
                    str(rootfs),
                    archive,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            shown = 0
            for line in proc.stdout:
                fh.write(line)
                if line.startswith("I: ") and not line.startswith(
                    ("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking", "I: Configuring")
                ):
                    say("  debootstrap " + line[3:].strip())
                elif line.startswith(("I: Unpacking", "I: Configuring")) and shown % 25 == 0:
                    say("  debootstrap " + line[3:].strip() + " ...")
                shown += 1
            if proc.wait() != 0:
                raise EngineError(f"debootstrap failed (exit {proc.returncode}); its log: {log}")
        _slim_and_trust(rootfs, archive, security)
        say(f"importing the root file system ({_du(rootfs) / 1e6:.0f} MB)")
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
            "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
            "ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt",
            f"LABEL {BASE_LABEL}={want}",
            f"LABEL org.fedmedclip.base-recipe=debootstrap-minbase-{SUITE}",
            'CMD ["bash"]',
        ]
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        )
        args = [a for c in changes for a in ("--change", c)]
        result = subprocess.run(
            ["/usr/bin/docker", "import", *args, "-", BASE_TAG], stdin=tar.stdout, env=engine.env(), capture_output=True
        )
        tar.stdout.close()
        if tar.wait() != 0 or result.returncode != 0:
            raise EngineError(f"docker import failed: {result.stderr.decode(errors='replace')}")
    finally:
        _remove_rootfs(rootfs)
    for alias in BASE_ALIASES:
        engine.docker("tag", BASE_TAG, alias)
    seconds = time.monotonic() - t0
    size = image_size(engine, BASE_TAG)
    say(f"base image {BASE_TAG} (also {', '.join(BASE_ALIASES)}): {size / 1e6:.0f} MB in {seconds:.0f}s")
    return {"image": BASE_TAG, "built": True, "seconds": seconds, "size": size}


def _slim_and_trust(rootfs: Path, archive: str, security: str) -> None:
    (rootfs / "etc/apt/sources.list").write_text(
        f"deb {archive} {SUITE} main\ndeb {archive} {SUITE}-updates main\ndeb {security} {SUITE}-security main\n"
    )
    (rootfs / "etc/dpkg/dpkg.cfg.d/fedmedclip-slim").write_text(SLIM_DPKG)
    (rootfs / "etc/apt/apt.conf.d/fedmedclip-clean").write_text(APT_CLEAN)
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text(POLICY_RC)
    policy.chmod(0o755)
    for pattern in (
        "usr/share/doc/*/*",
        "usr/share/man/*",
        "usr/share/groff/*",
        "usr/share/info/*",
        "usr/share/lintian/*",
        "usr/share/locale/*",
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*",
        "var/log/*.log",
        "var/log/apt/*",
        "var/cache/debconf/*-old",
        "tmp/*",
    ):
        for path in rootfs.glob(pattern):
            if path.name == "copyright" or path.name in ("partial", "lock", "auxfiles"):
                continue
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for conf in ("etc/resolv.conf", "etc/hostname"):  # the engine provides both at run time
        p = rootfs / conf
        if p.exists() or p.is_symlink():
            p.unlink()
            p.touch()
    certs = extra_ca_certificates()
    if certs:
        target = rootfs / "usr/local/share/ca-certificates"
        target.mkdir(parents=True, exist_ok=True)
        for cert in certs:
            shutil.copyfile(cert, target / cert.name)
        result = subprocess.run(
            ["chroot", str(rootfs), "/usr/sbin/update-ca-certificates"], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise EngineError(f"update-ca-certificates in the base image failed: {result.stdout}{result.stderr}")
        say(f"  trusted this host's extra CA certificates: {', '.join(c.name for c in certs)}")


def _remove_rootfs(rootfs: Path) -> None:
    """Unmount what debootstrap may have left mounted (an interrupted run), then delete; never through a mount."""
    for _ in range(3):
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(rootfs) + "/")
        ]
        if not mounts:
            break
        for target in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)
    else:
        say(f"warning: {rootfs} still has mounts; left in place")
        return
    shutil.rmtree(rootfs, ignore_errors=True)


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------- the wheelhouse


def runtime_requirements() -> list[str]:
    """pyproject's runtime dependencies and build requirements (what the Dockerfile installs)."""
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return [*data["project"]["dependencies"], *data["build-system"]["requires"]]


def _pip_python() -> str | None:
    for python in (sys.executable, str(REPO_ROOT / ".venv" / "bin" / "python")):
        if (
            python
            and Path(python).exists()
            and subprocess.run(
                [python, "-c", "import sys, pip; sys.exit(sys.version_info[:2] != (3, 11))"], capture_output=True
            ).returncode
            == 0
        ):
            return python
    return None


def ensure_wheelhouse() -> dict:
    """``.wheelhouse/``: every wheel the image installs, for Python 3.11 on this architecture."""
    reqs = runtime_requirements()
    key = hashlib.sha256(("\n".join(reqs) + "\n" + (REPO_ROOT / "requirements.txt").read_text()).encode()).hexdigest()
    stamp = WHEELHOUSE / ".complete"
    if stamp.exists() and stamp.read_text().strip() == key:
        n = len(list(WHEELHOUSE.glob("*.whl")))
        say(f"wheelhouse {WHEELHOUSE} is up to date ({n} wheels): reused")
        return {"built": False, "seconds": 0.0, "wheels": n}
    python = _pip_python()
    if python is None:
        say(
            "warning: no Python 3.11 with pip here (make venv makes one): no wheelhouse, the image build downloads "
            "every wheel from PyPI (torch's CUDA wheels are several GB)"
        )
        return {"built": False, "seconds": 0.0, "wheels": 0}
    if WHEELHOUSE.exists():
        shutil.rmtree(WHEELHOUSE)
    WHEELHOUSE.mkdir(parents=True)
    say(f"filling the wheelhouse {WHEELHOUSE} (pip download: this host's wheel indexes, then PyPI)")
    t0 = time.monotonic()
    cmd = [
        python,
        "-m",
        "pip",
        "download",
        "--dest",
        str(WHEELHOUSE),
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
        "--only-binary",
        ":all:",
        "-c",
        str(REPO_ROOT / "requirements.txt"),
        *reqs,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if line.startswith(("Saved ", "File was already downloaded")):
            say("  " + line.strip().replace(str(WHEELHOUSE) + "/", ""))
    if proc.wait() != 0:
        raise EngineError("pip download failed:\n" + "\n".join(tail))
    stamp.write_text(key + "\n")
    n = len(list(WHEELHOUSE.glob("*.whl")))
    seconds = time.monotonic() - t0
    say(f"wheelhouse: {n} wheels, {_du(WHEELHOUSE) / 1e9:.1f} GB in {seconds:.0f}s")
    return {"built": True, "seconds": seconds, "wheels": n}


# ---------------------------------------------------------------------- the images


def build(
    engine: Engine,
    tag: str,
    dockerfile: Path,
    context: Path,
    args: dict[str, str] | None = None,
    no_cache: bool = False,
    timeout_s: float | None = None,
) -> dict:
    cmd = ["/usr/bin/docker", "build", "--progress=plain", "-f", str(dockerfile), "-t", tag]
    for key, value in (args or {}).items():
        cmd += ["--build-arg", f"{key}={value}"]
    cmd += ["--no-cache"] if no_cache else []
    say(f"building {tag} ({dockerfile.relative_to(REPO_ROOT)}, context {context.relative_to(REPO_ROOT) or '.'})")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*cmd, str(context)], env=engine.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # past the time bound the client is killed, which cancels the build in the daemon
    watchdog = threading.Timer(timeout_s, proc.kill) if timeout_s else None
    if watchdog:
        watchdog.start()
    tail = []
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-60:]
            print(f"  {tag} | {line.rstrip()}", flush=True)
        code = proc.wait()
    finally:
        if watchdog:
            watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        late = f" (killed after {timeout_s:.0f}s)" if timeout_s and time.monotonic() - t0 >= timeout_s else ""
        raise EngineError(f"building {tag} failed (exit {code}){late}; the last lines:\n" + "\n".join(tail[-25:]))
    seconds = time.monotonic() - t0
    size = image_size(engine, tag)
    say(f"{tag}: {size / 1e9:.2f} GB, built in {seconds:.0f}s")
    return {"image": tag, "seconds": seconds, "size": size}


def build_all(
    engine: Engine, no_cache: bool = False, torch_index_url: str = "", timeout_s: float | None = None
) -> dict:
    """Base image, wheelhouse, project image and Prometheus image; what each took (also appended to BUILD_LOG)."""
    t0 = time.monotonic()
    record = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "base": ensure_base(engine),
        "wheelhouse": ensure_wheelhouse() if not torch_index_url else {"built": False, "seconds": 0.0},
    }
    args = {"TORCH_INDEX_URL": torch_index_url} if torch_index_url else {}
    record["project"] = build(engine, IMAGE, REPO_ROOT / "deploy" / "Dockerfile", REPO_ROOT, args, no_cache, timeout_s)
    record["prometheus"] = build(
        engine,
        PROMETHEUS_IMAGE,
        REPO_ROOT / "deploy" / "prometheus" / "Dockerfile",
        REPO_ROOT / "deploy" / "prometheus",
        None,
        no_cache,
        timeout_s,
    )
    engine.docker("image", "prune", "-f", check=False)  # the untagged images earlier builds left
    record["seconds"] = time.monotonic() - t0
    BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with BUILD_LOG.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    say(
        f"images ready in {record['seconds']:.0f}s: {IMAGE} {record['project']['size'] / 1e9:.2f} GB, "
        f"{PROMETHEUS_IMAGE} {record['prometheus']['size'] / 1e6:.0f} MB, base {record['base']['size'] / 1e6:.0f} MB"
    )
    return record
