"""What every result file carries (command, config, the code's git commit, library versions,
hardware) and atomic writes, so that an interrupted run never leaves a half-written file."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "brevitas", "concrete-ml", "concrete-python", "numpy", "dask", "distributed"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# The instruction sets that decide the speed of torch's and Concrete's kernels on the machines used
# here: two CPUs both named "AMD EPYC" differed by AVX-512 (bfloat16 training 15 times slower
# without it) and by a fifth in FHE seconds per image.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def hardware(cpuinfo: str = "/proc/cpuinfo") -> dict:
    cpu, family, features = platform.processor() or platform.machine(), None, None
    try:
        first = Path(cpuinfo).read_text().split("\n\n")[0]  # the first processor's block
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
        cpu = info.get("model name", cpu)
        if "cpu family" in info and "model" in info:
            family = f"family {info['cpu family']} model {info['model']}"
        flags = info.get("flags", "").split()
        features = [f for f in CPU_FEATURES if f in flags]
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cpu_model": family, "cpu_features": features, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "platform": platform.platform()}


def describe_cpu(hw: dict) -> str:
    """One line for logs: 'AMD EPYC (family 25 model 1; avx2)'."""
    extra = "; ".join(x for x in (hw.get("cpu_model"), ", ".join(hw.get("cpu_features") or [])) if x)
    return f"{hw['cpu']} ({extra})" if extra else hw["cpu"]


def code_version(root: str | os.PathLike = Path(__file__).parent) -> dict | None:
    """The git commit the code ran from, and whether tracked files differed from it (a result
    of uncommitted code says so); None outside a git checkout or without git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "modified": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return None


# Taken when a script starts, not when it writes: a run outlives commits made meanwhile.
STARTED_FROM = code_version()


def command_line() -> str:
    """This process's command, as typed (the script's file name, then its arguments)."""
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:])


def provenance(config) -> dict:
    """The command, its config (with the effective FHE settings filled in), the code's commit
    when the process started, versions, hardware."""
    return {
        "command": command_line(),
        "config": asdict(config) if dataclasses.is_dataclass(config) else config,
        "code": STARTED_FROM,
        "versions": versions(),
        "hardware": hardware(),
    }


def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask (read at import: reading
    it means setting it, which is not safe once threads run)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write(path: str | os.PathLike, write) -> None:
    """write(tmp_path) then rename, so an interrupted run never leaves a half-written file.
    The file gets open()'s usual mode, not mkstemp's owner-only 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")

    atomic_write(path, w)


def sha256_file(path) -> str:
    """Hex digest of a file's bytes (names the exact checkpoint a result came from)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
