"""Run bitsandbytes' own upstream module tests against torch_compat (or, for comparison, the real bitsandbytes).

torch_compat aims to be a drop-in ``bitsandbytes.nn``; bitsandbytes' own ``tests/test_modules.py``
is an outside check of that. This script runs those tests on CPU in a pytest subprocess, with
``bitsandbytes`` either replaced by torch_compat (``torch_compat.install_as_bitsandbytes(replace=True)``,
made by a small pytest plugin this script writes into a temporary folder and loads with ``-p``
before any test module imports bitsandbytes) or left as the real installed package
(``--reference``). It prints the passed / failed / error / skipped counts of each run, the failing
test ids with the first line of each failure (grouped by that line), and can write a JSON summary.

bitsandbytes' test files are not part of this repository: fetch them yourself (tag 0.49.2 of
bitsandbytes-foundation/bitsandbytes: ``tests/__init__.py``, ``tests/conftest.py``,
``tests/helpers.py``, ``tests/test_modules.py``) into a folder outside the repository, either flat
or as a ``tests/`` subfolder. The files are copied into a temporary ``tests`` package (the test
module imports ``tests.helpers``; running from a scratch root keeps this repository's own ``tests``
package and pyproject out of the way) and run there with the pytest options of bitsandbytes'
pyproject (``-m "not slow and not benchmark and not deprecated"``). GPU-only parametrisations are
left to the tests themselves, as upstream does on a machine without CUDA: ``get_available_devices``
yields only ``cpu``, and the CUDA-only tests skip themselves (``requires_cuda``, ``pytest.skip``).

``helpers.py`` imports ``bitsandbytes.cextension.HIP_ENVIRONMENT`` (``test_linear4bit.py`` and
``test_linear8bitlt.py`` also ``ROCM_WARP_SIZE_64``): flags of bitsandbytes' native-library loader,
which torch_compat's stand-in does not have. Unless ``--no-cextension-shim`` is given, the plugin
then adds a ``bitsandbytes.cextension`` module with both flags False (not ROCm) and says so in
pytest's header.

Usage:
  python benchmarks/run_bnb_module_tests.py --tests-dir /tmp/bnb_tests                 # torch_compat
  python benchmarks/run_bnb_module_tests.py --tests-dir /tmp/bnb_tests --reference     # real bitsandbytes
  python benchmarks/run_bnb_module_tests.py --tests-dir /tmp/bnb_tests --compare -n 2 --out summary.json
  python benchmarks/run_bnb_module_tests.py --tests-dir /tmp/bnb_tests --files test_modules.py test_linear4bit.py
"""

import argparse
import collections
import datetime
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

# Upstream's pyproject ([tool.pytest.ini_options]) at 0.49.2, less -rP / log_cli (output noise).
_PYTEST_INI = """\
[pytest]
addopts = -m "not slow and not benchmark and not deprecated"
markers =
    benchmark: mark test as a benchmark
    deprecated: mark test as covering a deprecated feature
    slow: mark test as slow
"""

_PLUGIN_NAME = "_qflax_bnb_under_test"

# The plugin pytest loads (-p) in the main process and in every pytest-xdist worker, before the
# test package's conftest and test modules are imported. Mode comes from QFLAX_BNB_MODE.
_PLUGIN_SOURCE = '''\
"""Written by benchmarks/run_bnb_module_tests.py: chooses what ``import bitsandbytes`` gives the tests."""

import os
import sys
import types

MODE = os.environ["QFLAX_BNB_MODE"]
SHIM = os.environ.get("QFLAX_BNB_CEXTENSION_SHIM", "1") == "1"
_NOTES = []

if MODE == "torch_compat":
    import torch_compat

    torch_compat.install_as_bitsandbytes(replace=True)
    import bitsandbytes

    if not torch_compat.install.is_installed():
        raise RuntimeError("torch_compat.install_as_bitsandbytes did not take effect")
    try:
        import bitsandbytes.cextension  # noqa: F401
    except ImportError as err:
        if not SHIM:
            _NOTES.append(f"no bitsandbytes.cextension ({err}); shim disabled")
        else:
            shim = types.ModuleType("bitsandbytes.cextension", "test shim: the ROCm flags the test files read")
            shim.HIP_ENVIRONMENT = False
            shim.ROCM_WARP_SIZE_64 = False
            sys.modules["bitsandbytes.cextension"] = shim
            bitsandbytes.cextension = shim
            _NOTES.append("bitsandbytes.cextension shimmed (HIP_ENVIRONMENT=ROCM_WARP_SIZE_64=False): "
                          "torch_compat has none")
elif MODE == "reference":
    import bitsandbytes

    if getattr(bitsandbytes, "torch_compat", None) is not None:
        raise RuntimeError("reference mode, but bitsandbytes is torch_compat's stand-in")
else:
    raise RuntimeError(f"unknown QFLAX_BNB_MODE {MODE!r}")


def pytest_report_header(config):
    nn = sys.modules["bitsandbytes"].nn
    lines = [f"bitsandbytes under test ({MODE}): {sys.modules['bitsandbytes'].__file__}, "
             f"version {sys.modules['bitsandbytes'].__version__}, nn.Linear4bit from {nn.Linear4bit.__module__}"]
    return lines + _NOTES
'''


def find_test_files(tests_dir: pathlib.Path, files: list[str]) -> pathlib.Path:
    """Finds the folder that holds bitsandbytes' test files.

    Args:
      tests_dir: the folder given on the command line; the files lie in it or in its ``tests/``.
      files: test file names that must be there (``helpers.py`` and ``conftest.py`` are needed too).

    Returns:
      The folder holding the files.

    Raises:
      FileNotFoundError: a needed file is in neither place.
    """
    needed = ["conftest.py", "helpers.py", *files]
    for candidate in (tests_dir, tests_dir / "tests"):
        if all((candidate / name).is_file() for name in needed):
            return candidate
    raise FileNotFoundError(f"{tests_dir} (or {tests_dir / 'tests'}) lacks one of {needed}")


def stage(source: pathlib.Path, files: list[str], root: pathlib.Path) -> None:
    """Copies the test files into ``root/tests`` (a package) and writes the pytest ini and the plugin.

    Args:
      source: folder holding bitsandbytes' test files.
      files: the test files to run.
      root: an empty scratch folder: pytest's rootdir, and on the subprocess's PYTHONPATH.
    """
    package = root / "tests"
    package.mkdir()
    for name in ["__init__.py", "conftest.py", "helpers.py", *files]:
        if (source / name).is_file():
            shutil.copyfile(source / name, package / name)
    (package / "__init__.py").touch()
    (root / "pytest.ini").write_text(_PYTEST_INI)
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / f"{_PLUGIN_NAME}.py").write_text(_PLUGIN_SOURCE)


def parse_junit(path: pathlib.Path) -> dict:
    """Reads pytest's JUnit XML report.

    Args:
      path: the ``--junitxml`` file.

    Returns:
      ``{"counts": {...}, "failures": [...], "skips": {reason: count}}``; each failure is a dict with
      ``id`` (pytest node id; a test file's path for a collection error), ``kind`` ("failed" or "error"), ``message`` (first line),
      ``location`` (the last ``file:line`` of the traceback) and ``in_project`` (the deepest
      traceback line inside torch_compat / qflax, if any).
    """
    counts = collections.Counter()
    failures, skips = [], collections.Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        if classname:
            node_id = f"{classname.replace('.', '/')}.py::{name}"
        else:  # a collection error: name is the module's dotted name
            node_id = name.replace(".", "/") + ".py"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                # A teardown error after a failure is the same test; count its worst outcome once.
                outcome = "failed" if child.tag == "failure" else ("failed" if outcome == "failed" else "error")
                text = child.text or ""
                message = child.get("message") or (text.strip().splitlines() or [""])[-1]
                message = message.strip().splitlines()[0] if message.strip() else ""
                locations = re.findall(r"^(\S+\.py):(\d+):", text, re.M)
                project = [f"{f}:{n}" for f, n in locations if re.search(r"(torch_compat|qflax)/", f)]
                failures.append({
                    "id": node_id, "kind": child.tag if child.tag == "error" else "failed",
                    "message": message.strip()[:400],
                    "location": f"{locations[-1][0]}:{locations[-1][1]}" if locations else None,
                    "in_project": project[-1] if project else None,
                })
            elif child.tag == "skipped":
                outcome = "skipped" if child.get("type") != "pytest.xfail" else "xfailed"
                skips[(child.get("message") or "").strip()[:200]] += 1
        counts[outcome] += 1
    counts["total"] = sum(counts.values())
    return {"counts": dict(counts), "failures": failures, "skips": dict(skips)}


def run_mode(mode: str, source: pathlib.Path, args: argparse.Namespace) -> dict:
    """Runs the tests once, in a pytest subprocess, against one bitsandbytes.

    Args:
      mode: "torch_compat" (bitsandbytes replaced by torch_compat) or "reference" (the real one).
      source: folder holding bitsandbytes' test files.
      args: the parsed command line.

    Returns:
      The parsed report (see :func:`parse_junit`) plus ``mode``, ``returncode``, ``seconds``,
      ``command`` and, if the run produced no report, ``output_tail``.
    """
    with tempfile.TemporaryDirectory(prefix=f"bnb_tests_{mode}_") as scratch:
        root = pathlib.Path(scratch)
        stage(source, args.files, root)
        junit = root / "report.xml"
        command = [sys.executable, "-m", "pytest", *[f"tests/{name}" for name in args.files],
                   "-c", str(root / "pytest.ini"), "--rootdir", str(root), "-p", _PLUGIN_NAME,
                   "-p", "no:cacheprovider", f"--junitxml={junit}", "-rN", "--tb=short",
                   "--continue-on-collection-errors"]
        if args.workers:
            command += ["-n", str(args.workers)]
        if args.k:
            command += ["-k", args.k]
        command += args.pytest_args
        env = dict(os.environ)
        env.update({
            "QFLAX_BNB_MODE": mode,
            "QFLAX_BNB_CEXTENSION_SHIM": "0" if args.no_cextension_shim else "1",
            "PYTHONPATH": os.pathsep.join([str(root / "plugins"), str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "CUDA_VISIBLE_DEVICES": "",  # CPU, as on a machine without CUDA
            "JAX_PLATFORMS": "cpu",
        })
        if args.jax_cache:
            env["JAX_COMPILATION_CACHE_DIR"] = str(pathlib.Path(args.jax_cache).resolve())
        print(f"[{mode}] {' '.join(command)}", flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=args.timeout)
            returncode, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            returncode = "timeout"
            output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        seconds = round(time.monotonic() - start, 1)
        if args.verbose:
            print(output)
        result = parse_junit(junit) if junit.is_file() else {"counts": {}, "failures": [], "skips": {},
                                                             "output_tail": output[-4000:]}
        header = [line for line in output.splitlines()
                  if line.startswith(("bitsandbytes under test", "bitsandbytes.", "no bitsandbytes.cextension"))]
        result.update(mode=mode, returncode=returncode, seconds=seconds, command=command[1:], header=header)
        return result


def summarise(result: dict) -> str:
    """Formats one run's result for the terminal.

    Args:
      result: what :func:`run_mode` returned.

    Returns:
      Lines of text: counts, then the failures grouped by their first message line.
    """
    counts = result["counts"]
    order = ("passed", "failed", "error", "skipped", "xfailed", "total")
    lines = [f"== {result['mode']}: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in order)
             + f"  ({result['seconds']} s, pytest exit {result['returncode']})"]
    lines += [f"   {line}" for line in result.get("header", [])]
    if "output_tail" in result:
        lines += ["   no JUnit report; pytest output tail:", result["output_tail"]]
    groups = collections.defaultdict(list)
    for failure in result["failures"]:
        key = re.sub(r"\d+(\.\d+)?", "N", failure["message"])[:160]
        groups[key].append(failure)
    for key, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        first = members[0]
        lines.append(f"  [{len(members)}] {first['message'][:300]}")
        lines.append(f"      at {first['location']}" + (f"; project frame {first['in_project']}" if first["in_project"] else ""))
        lines += [f"      - {m['id']} ({m['kind']})" for m in members]
    for reason, n in sorted(result["skips"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  skipped {n}: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, runs the requested modes, prints and optionally saves the results.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
      0 if every run finished with a report and no failures or errors, else 1.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests-dir", required=True, type=pathlib.Path,
                        help="folder holding bitsandbytes' tests (flat, or in its tests/ subfolder)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--reference", action="store_true", help="run against the real bitsandbytes instead")
    which.add_argument("--compare", action="store_true", help="run against torch_compat, then the real bitsandbytes")
    parser.add_argument("--files", nargs="+", default=["test_modules.py"], help="test files to run (default test_modules.py)")
    has_xdist = importlib.util.find_spec("xdist") is not None
    parser.add_argument("-n", "--workers", type=int, default=2 if has_xdist else 0,
                        help="pytest-xdist workers (default 2 if pytest-xdist is installed; 0: none)")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per run (default 600)")
    parser.add_argument("--jax-cache", default=None, help="JAX persistent compilation cache folder (default: none)")
    parser.add_argument("--no-cextension-shim", action="store_true",
                        help="do not add bitsandbytes.cextension when torch_compat lacks it")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write a JSON summary here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's own output")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.workers and not has_xdist:
        parser.error("-n needs pytest-xdist")

    source = find_test_files(args.tests_dir.resolve(), args.files)
    modes = ["reference"] if args.reference else ["torch_compat", "reference"] if args.compare else ["torch_compat"]
    results = [run_mode(mode, source, args) for mode in modes]
    for result in results:
        print(summarise(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "tests_dir": str(source), "files": args.files, "python": sys.version.split()[0],
            "runs": {r["mode"]: r for r in results},
        }, indent=1))
        print(f"wrote {args.out}")
    ok = all(r["counts"] and not r["counts"].get("failed") and not r["counts"].get("error") for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
