"""The GPU check: build, the `cuda` tests, the GPU suites, in priority order under one deadline.

    python3 benchmarks/gpu_check.py --out DIR [--deadline 540]      (or: make gpu-check OUT=DIR)

Made for a short lease on a bare GPU machine with its own python3, torch and triton and no network; wheels it needs
travel in .whl/ (CUTLASS's headers for the Hopper GEMMs, stk for a column of gpu-linear). Steps, in
order, each given what is left of the deadline (minus a reserve for the summary):

1. build: `pip install --no-build-isolation --no-deps -e .` for the GPU's own architecture, with all cores;
2. tests: `pytest -m cuda` under pytest-xdist (-n 8: a crash takes down one worker, not the run), with a
   per-test timeout when pytest-timeout is installed, results in junit XML; the tests of the Hopper GEMMs on CuTe
   (tests/test_cuda_sm90.py, never run on a GPU before: a hung kernel would hold a worker) wait for step 4;
3. the GPU suites at the README's sizes (gpu-linear, gpu-conv, gpu-e2e, gpu-optim), CSVs only;
4. the kernels not yet run on a GPU, each in a process of its own: the Hopper GEMMs' tests (sm90-tests, under a short
   limit), then the Triton TMA kernels (SPARSEKERN_TRITON_TMA) beside the pointer kernels in gpu-linear and
   gpu-conv, and the cuda backend's Hopper kernels (SPARSEKERN_CUDA_SM90) beside its mma.sync ones in both (tables in
   the log);
5. benchmarks/profile_layer.py: SparseLinear and SparseConv2d called eagerly beside the dense layers, with a
   torch.profiler table (profile_layer_cuda.txt);
6. compute-sanitizer memcheck over a small subset of the CUDA kernel tests, when time is left.

DIR receives at most 8 files: `<gpu>_gpu_check.txt` (the summary: each step's status and time, every failing
or crashed test with a one-line reason, ending with `N passed, N failed, N crashed`), `gpu_check.log` (every
step's output), `junit.xml`, the suites' CSVs and `profile_layer_cuda.txt`. The summary is rewritten after every
step, so a run killed from outside still leaves one. Exit status 0 only when every step passed.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_RESERVE_S = 15  # kept back from every step so the summary is always written inside the deadline
# Each step's own limit (s); a step gets the smaller of this and what is left of the deadline.
STEP_LIMITS = {"build": 300, "tests": 240, "gpu-linear": 150, "gpu-conv": 150, "gpu-e2e": 150, "gpu-optim": 60,
               "sm90-tests": 90, "tma-linear": 120, "tma-conv": 150, "layers": 60, "memcheck": 90}
# The suites at the README's sizes, trimmed to the cases the issues' goals name so that all fit one lease.
SUITE_ARGS = {
    "gpu-linear": ["--sparsities", "0.9", "--blocks", "32,64,128", "--reps", "10"],
    "gpu-conv": ["--models", "resnet50", "--sparsities", "0.9", "--blocks", "32", "--reps", "5"],
    "gpu-e2e": ["--sparsities", "0.9", "--reps", "3"],
    "gpu-optim": ["--reps", "10"],
}
# The tests of the Hopper GEMMs, in a step of their own after the suites (see step 4).
SM90_TESTS = "tests/test_cuda_sm90.py"
# The kernels never run on a GPU before (bench.common.VARIANTS), each beside the kernel it would replace, in processes
# of their own: a kernel fault is sticky and would fail every later row of its process. Their CSVs stay out of DIR
# (8 files at most); their tables and goal lines are in gpu_check.log.
VARIANT_PAIRS = (("triton", "triton-tma"), ("cuda", "cuda-sm90"))
TMA_SUITE_ARGS = {
    "tma-linear": ["--suite", "gpu-linear", "--backends", "triton,triton-tma,cuda,cuda-sm90",
                   *SUITE_ARGS["gpu-linear"]],
    "tma-conv": ["--suite", "gpu-conv", "--backends", "triton,triton-tma,cuda,cuda-sm90", *SUITE_ARGS["gpu-conv"]],
}
MEMCHECK_TESTS = "tests/test_cuda_kernels.py"
MEMCHECK_FILTER = "errors_name_the_tensor or (bsr_linear and 37) or (sddmm and 37)"


class Check:
    def __init__(self, out: str, deadline_s: float):
        self.out = out
        self.end = time.monotonic() + deadline_s
        self.steps = []  # (name, status, seconds, note)
        self.tests = {"passed": 0, "failed": [], "crashed": [], "skipped": 0}
        self.gpu = "unknown-gpu"
        self.variant_dir = None  # where the TMA steps write their CSVs, outside DIR
        self.log = open(os.path.join(out, "gpu_check.log"), "w")

    def left(self) -> float:
        return self.end - time.monotonic() - SUMMARY_RESERVE_S

    def say(self, text: str) -> None:
        line = f"== {time.strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, name: str, command, env=None) -> int:
        """Run one step under min(its limit, what is left); its output goes to the console and the log."""
        limit = min(STEP_LIMITS.get(name, 120), self.left())
        if limit < 10:
            self.steps.append((name, "skipped", 0.0, "no time left before the deadline"))
            self.say(f"{name}: skipped (no time left)")
            return -1
        self.say(f"{name} (limit {limit:.0f}s): {' '.join(command)}")
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)
        # A thread copies the output so that a silent, hung step is still killed at its limit.
        copier = threading.Thread(target=self._copy_output, args=(process.stdout,), daemon=True)
        copier.start()
        try:
            status = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the whole session: pytest-xdist workers, the compilers
            process.wait()
            status = 124
        copier.join(timeout=5)
        seconds = time.monotonic() - start
        verdict = "ok" if status == 0 else ("out of time" if status == 124 else f"failed (exit {status})")
        self.steps.append((name, verdict, seconds, ""))
        self.say(f"{name}: {verdict} after {seconds:.0f}s")
        self.write_summary()
        return status

    def _copy_output(self, stream) -> None:
        for line in stream:
            print(line, end="", flush=True)
            self.log.write(line)

    def read_junit(self, path: str) -> None:
        """Count passed/skipped and list each failing or crashed test with a one-line reason."""
        if not os.path.exists(path):
            return
        for case in ET.parse(path).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                text = (problem.get("message") or problem.text or "").strip()
                reason = _one_line(text)
                crashed = "crashed while running" in text or "node down" in text
                self.tests["crashed" if crashed else "failed"].append((name, reason))
            elif case.find("skipped") is not None:
                self.tests["skipped"] += 1
            else:
                self.tests["passed"] += 1

    def diagnose_crashes(self, python: str, env, limit: int = 4) -> None:
        """Rerun up to ``limit`` crashed tests alone under faulthandler: the Python frame the process died in
        becomes the crash's reason (xdist only says that the worker went down)."""
        for i, (name, reason) in enumerate(self.tests["crashed"][:limit]):
            if self.left() < 40:
                return
            node = _node_id(name)
            try:
                result = subprocess.run([python, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                         "-p", "no:xdist", node], cwd=ROOT, env=env, capture_output=True, text=True,
                                        errors="replace", timeout=min(60, self.left() - 20))
                output = result.stdout + result.stderr
            except subprocess.TimeoutExpired:
                output = "rerun alone: timed out"
            self.log.write(f"== rerun of crashed {node}\n{output}\n")
            frame = _crash_frame(output)
            self.tests["crashed"][i] = (name, f"{reason}; alone: {frame}" if frame else reason)

    def first_calls(self) -> list:
        """Per suite CSV, op and implementation: the slowest and the fastest first call of a case (compile,
        autotune and auto's measuring included), from the suites' first_call_s column. A suite's cases share their
        rows bucket, so the slowest is a new bucket's first call and the fastest one of a seen bucket."""
        seen = {}
        for path in sorted(glob.glob(os.path.join(self.out, "*.csv"))):
            with open(path) as f:
                for row in csv.DictReader(f):
                    if row.get("first_call_s"):
                        what = (os.path.basename(path), row.get("op") or row.get("pass"), row["impl"])
                        seen.setdefault(what, []).append(float(row["first_call_s"]))
        return [f"  {suite} {op} [{impl}]: slowest {max(t):.2f} s, fastest {min(t):.2f} s"
                for (suite, op, impl), t in sorted(seen.items())]

    def write_summary(self) -> str:
        path = os.path.join(self.out, f"{self.gpu}_gpu_check.txt")
        t = self.tests
        lines = [f"# GPU check on {self.gpu}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
        lines += [f"step {name}: {status}, {seconds:.0f}s{' (' + note + ')' if note else ''}"
                  for name, status, seconds, note in self.steps]
        lines.append("")
        for kind in ("crashed", "failed"):
            if t[kind]:
                lines.append(f"{kind} tests:")
                lines += [f"  {name}: {reason}" for name, reason in t[kind]]
        variant_csvs = sorted(glob.glob(os.path.join(self.variant_dir, "*.csv"))) if self.variant_dir else []
        variants = [line for path in variant_csvs for line in variant_comparison(path)]
        if variants:
            lines.append("the kernels not yet run on a GPU beside the ones they would replace (speedup over dense; "
                         "gpu-conv: model totals):")
            lines += variants
        first = self.first_calls()
        if first:
            lines.append("first calls of a case (goals: < 5 s for a new rows bucket, < 1 s for a seen one):")
            lines += first
        lines.append(f"{t['skipped']} skipped")
        lines.append(f"{t['passed']} passed, {len(t['failed'])} failed, {len(t['crashed'])} crashed")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path


def variant_comparison(path: str) -> list:
    """From a suite CSV run with variants (VARIANT_PAIRS): per op (gpu-linear) or per pass and model total
    (gpu-conv), sparsity and block, each variant's speedup over dense (or status) beside its kernel's."""
    names = [name for pair in VARIANT_PAIRS for name in pair]
    cases = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["impl"] not in names or row.get("layer", "total") != "total":
                continue
            what = " ".join(v for v in (row.get("op") or row.get("pass"), row.get("model")) if v)
            cases.setdefault((what, row["sparsity"], row["block"]), {})[row["impl"]] = row

    def cell(row) -> str:
        return f"{float(row['speedup']):.2f}x" if row["speedup"] else row["status"]

    lines = []
    for (what, sparsity, block), rows in cases.items():
        pairs = [f"{base} {cell(rows[base]) if base in rows else '-'}, {variant} {cell(rows[variant])}"
                 for base, variant in VARIANT_PAIRS if variant in rows]
        if pairs:
            lines.append(f"  {what}, sparsity {sparsity or '-'}, block {block}: " + "; ".join(pairs))
    return lines


def _node_id(junit_name: str) -> str:
    """tests.test_x.TestY::test_z[p] (junit's classname::name) -> tests/test_x.py::TestY::test_z[p]."""
    classname, _, test = junit_name.partition("::")
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = os.path.join(*parts[:cut]) + ".py"
        if os.path.exists(os.path.join(ROOT, path)):
            return "::".join([path, *parts[cut:], test])
    return junit_name


def _crash_frame(output: str) -> str:
    """The fatal signal and the innermost Python frame of faulthandler's dump, e.g. 'Segmentation fault at
    tests/test_x.py:12 in test_y'."""
    fatal = re.search(r"Fatal Python error: (\w[^\n]*)", output)
    if not fatal:
        return ""
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\w+)', output[fatal.end():])
    # innermost first: the test's own line says which call crashed, the innermost frame where it went
    ours = [f for f in frames if os.path.abspath(f[0]).startswith(os.path.join(ROOT, "tests"))]
    where = [f"{os.path.relpath(path, ROOT)}:{line} in {func}" for path, line, func in (frames[:1] + ours[:1])]
    return fatal.group(1).strip() + (" at " + " <- ".join(dict.fromkeys(where)) if where else "")


def _one_line(text: str, width: int = 240) -> str:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if len(first) <= width else first[: width - 3] + "..."


def _gpu_facts(python: str):
    """(file-name form of the GPU's name, 'major.minor' arch for the build, e.g. '9.0a'), from torch."""
    code = ("import re, torch; p = torch.cuda.get_device_properties(0); "
            "print(re.sub(r'[^A-Za-z0-9]+', '-', p.name).strip('-').lower(), f'{p.major}.{p.minor}')")
    try:
        name, arch = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                                    timeout=120).stdout.split()
    except (subprocess.SubprocessError, ValueError):
        return "unknown-gpu", "9.0a"
    # wgmma and setmaxnreg need the arch-specific target on Hopper.
    return name, arch + "a" if arch == "9.0" else arch


def _install_wheel(python: str, check: Check, pattern: str, what: str):
    """Installs the newest .whl/<pattern> (the GPU machine has no network: `pip download --no-deps`, and for a
    source-only package `pip wheel --no-deps`, on a machine with one) into a folder of its own, without its
    dependencies. Returns the folder, or None (then says why)."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", pattern)))
    if not wheels:
        check.say(f"{what}: no .whl/{pattern}")
        return None
    site = os.path.join(tempfile.gettempdir(), f"gpu-check-{pattern.split('-')[0]}")
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                           wheels[-1]], capture_output=True, text=True)
    outcome = "installed " + wheels[-1] if done.returncode == 0 else "install failed: " + done.stderr[-200:]
    check.say(f"{what}: {outcome}")
    return site if done.returncode == 0 else None


def _has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the at most 8 result files")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the whole check (default 540)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with torch and triton")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out (build, tests, suites, tma: "
                                                   "the kernels not yet run on a GPU, layers, memcheck)")
    parser.add_argument("-k", dest="keyword", default=None, help="only the tests pytest -k selects")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    os.makedirs(args.out, exist_ok=True)
    check = Check(args.out, args.deadline)
    check.gpu, arch = _gpu_facts(args.python)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    check.say(f"GPU {check.gpu}, arch {arch}, python {args.python}")
    # stk (pure Python + Triton) for gpu-linear's stk column; without it the column says why it is empty.
    stk_site = _install_wheel(args.python, check, "stanford_stk-*.whl", "stk (gpu-linear's stk column)")
    if stk_site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (stk_site, env.get("PYTHONPATH")) if p)
    # CUTLASS's headers for the Hopper GEMMs; without them the build leaves those out (python -m sparsekern.info).
    cutlass_site = _install_wheel(args.python, check, "nvidia_cutlass-*.whl", "CUTLASS headers (Hopper GEMMs)")
    if cutlass_site:
        env["CUTLASS_INCLUDE"] = os.path.join(cutlass_site, "cutlass_library", "source", "include")

    if "build" not in skip:
        build_env = dict(env, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(max(1, (os.cpu_count() or 2) - 2)))
        if check.run("build", [args.python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                               "-e", "."], env=build_env) != 0:
            check.say("the build failed: the tests and suites would test a stale or missing extension; stopping")
            check.write_summary()
            return 1

    if "tests" not in skip:
        junit = os.path.join(args.out, "junit.xml")
        command = [args.python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rN",
                   "--tb=line", f"--junitxml={junit}", "tests", f"--ignore={SM90_TESTS}"]
        if _has_module(args.python, "xdist"):
            command += ["-n", "8"]
        if _has_module(args.python, "pytest_timeout"):
            command += ["--timeout", "120"]  # a torch.compile test may compile for a minute
        if args.keyword:
            command += ["-k", args.keyword]
        check.run("tests", command, env=env)
        check.read_junit(junit)
        check.diagnose_crashes(args.python, env)
        check.write_summary()

    if "suites" not in skip:
        for suite, extra in SUITE_ARGS.items():
            check.run(suite, [args.python, "-m", "sparsekern.bench", "--device", "cuda", "--suite", suite,
                              "--no-plots", "--out", args.out, *extra], env=env)

    if "tma" not in skip:
        junit = os.path.join(tempfile.mkdtemp(prefix="gpu_check_sm90_"), "junit.xml")
        command = [args.python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rN", "--tb=line",
                   f"--junitxml={junit}", SM90_TESTS]
        check.run("sm90-tests", command + (["-n", "4"] if _has_module(args.python, "xdist") else []), env=env)
        check.read_junit(junit)
        check.write_summary()
        check.variant_dir = tempfile.mkdtemp(prefix="gpu_check_tma_")
        for step, extra in TMA_SUITE_ARGS.items():
            check.run(step, [args.python, "-m", "sparsekern.bench", "--device", "cuda", "--no-plots", "--out",
                             check.variant_dir, *extra], env=env)

    if "layers" not in skip:  # the public layers eagerly beside nn.Linear / nn.Conv2d, and a profiler table
        check.run("layers", [args.python, os.path.join("benchmarks", "profile_layer.py"), "--device", "cuda",
                             "--out", args.out], env=env)

    if "memcheck" not in skip and shutil.which("compute-sanitizer"):
        check.run("memcheck", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", args.python,
                               "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", MEMCHECK_TESTS,
                               "-k", MEMCHECK_FILTER], env=env)

    path = check.write_summary()
    check.say(f"summary: {path}")
    print(open(path).read(), flush=True)
    bad = [s for s in check.steps if s[1] != "ok"]
    return 1 if bad or check.tests["failed"] or check.tests["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
