"""CI: a regular (non-editable) install must carry every module of the product.

The README installs editable, which resolves modules from the checkout, so a package missing
from the build configuration would only show in a wheel or a container image. Builds the wheel
(no dependencies; pip fetches the build tools, as for any install) from a copy of the files git
knows, since a `build/` directory left by an earlier build would supply what the configuration
leaves out, and compares it with the checkout.

    .venv/bin/python .ci/check_wheel.py
"""
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "_fastpath")

with tempfile.TemporaryDirectory() as work:
    source, out = pathlib.Path(work, "source"), pathlib.Path(work, "wheel")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a file deleted but not yet committed is listed too
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "-q", "-w", str(out)], check=True)
    (wheel,) = out.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())

wanted = {path.relative_to(ROOT).as_posix() for package in PACKAGES for path in (ROOT / package).rglob("*.py")
          if "__pycache__" not in path.parts}
missing = sorted(wanted - shipped)
compiled = [name for name in shipped if name.startswith("_fastpath/_compiled.") and name.endswith(".so")]
# and nothing else: the modules, the compiled fast path, its sources and stubs (and the marker
# that has type checkers read them), the metadata
extra = sorted(name for name in shipped - wanted
               if not name.startswith("realtime_gateway-") and name not in compiled
               and not name.endswith((".pyx", ".pxd", ".pyi", ".h", "/py.typed")))
faults = ([f"lacks {missing}"] if missing else []) + ([] if compiled else ["lacks the compiled _fastpath"]) \
    + ([f"should not carry {extra}"] if extra else [])
if faults:
    print(f"{wheel.name}: {'; '.join(faults)}", file=sys.stderr)
    sys.exit(1)
print(f"{wheel.name}: all {len(wanted)} modules and the compiled fast path are in it")
