"""What the eoq fuzz harnesses share: their command line, the findings recorder, the
summary printed when libFuzzer stops, a memory cap, and a coverage feedback channel.

Each harness is run as ``python tests/fuzz/fuzz_X.py [harness options] [libFuzzer options]
[corpus dirs | reproducer files]``. Harness options (everything else goes to libFuzzer):

  --keep-going          record every finding and keep fuzzing (default: stop at the first,
                        with exit status 1, as CI wants)
  --findings=DIR        where reproducers and their descriptions go (default: fuzz-findings)
  --mem-mb=N            address-space cap for the process after its imports (default 4096;
                        0: none; ignored under AddressSanitizer, which needs the address space:
                        pass libFuzzer's -rss_limit_mb / -malloc_limit_mb there instead)
  --slow=S              an execution longer than S seconds is a finding (default 20)
  --quiet               no per-finding lines, the summary only

A finding is recorded once per key (exception type and where it was raised, or the kind of
silent wrong output): a reproducer file with the fuzzer input (``python fuzz_X.py FILE``
runs it again), a ``.json`` with the mutation, the call, the exception and its traceback, and
whatever else the harness saves (fuzz_folder.py: the mutated folder itself). The summary
(executions, wall time, exec/s, outcomes, findings by kind) is printed when libFuzzer exits,
after ``-runs`` executions, ``-max_total_time`` or a stop at the first finding.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import os
import pathlib
import re
import sys
import time
import traceback

STOP_EXIT = 1  # the exit status of a stop at the first finding


class Options:
    def __init__(self, argv: list[str]):
        self.keep_going = False
        self.findings = pathlib.Path("fuzz-findings")
        self.mem_mb = 4096
        self.slow = 20.0
        self.quiet = False
        self.runs = None
        self.libfuzzer: list[str] = [argv[0]]
        for a in argv[1:]:
            if a == "--keep-going":
                self.keep_going = True
            elif a.startswith("--findings="):
                self.findings = pathlib.Path(a.split("=", 1)[1])
            elif a.startswith("--mem-mb="):
                self.mem_mb = int(a.split("=", 1)[1])
            elif a.startswith("--slow="):
                self.slow = float(a.split("=", 1)[1])
            elif a == "--quiet":
                self.quiet = True
            elif a.startswith("--"):
                raise SystemExit(f"unknown harness option {a} (libFuzzer options take one dash)")
            else:
                if a.startswith("-runs="):
                    self.runs = int(a.split("=", 1)[1])
                self.libfuzzer.append(a)


def under_asan() -> bool:
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def cap_memory(mb: int) -> str:
    """Caps the address space at what the process maps now plus mb MiB (torch and the
    interpreter already map a few GiB of address space they do not use). A larger
    allocation then fails (MemoryError / RuntimeError) and is recorded as a finding."""
    if mb <= 0:
        return "none"
    if under_asan():
        return "none (AddressSanitizer: use -rss_limit_mb / -malloc_limit_mb)"
    import resource

    vm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                vm = int(line.split()[1]) * 1024
    limit = vm + (mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return f"RLIMIT_AS {limit >> 20} MiB ({mb} MiB above the {vm >> 20} MiB mapped after imports)"


# ---- coverage feedback --------------------------------------------------------------------

_TEMPLATE_SUBS = [
    (re.compile(r"'[^']*'|\"[^\"]*\""), "'*'"),   # quoted names and values
    (re.compile(r"(?<![\w\]])(/[\w.+-]+)+"), "/PATH"),  # file paths
    (re.compile(r"0x[0-9a-fA-F]+|crc32:[0-9a-f]+"), "#"),
    (re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?"), "#"),
    (re.compile(r"\[[#, ]*\]"), "[#]"),
]


def template(message: str) -> str:
    """A message with its numbers, names and paths blanked: one value per kind of outcome."""
    t = message.splitlines()[0] if message else ""
    for pat, rep in _TEMPLATE_SUBS:
        t = pat.sub(rep, t)
    return t[:160]


class Feedback:
    """Turns outcome kinds (exception templates, decode results) into Python branch coverage
    that libFuzzer sees: the native decoder is built by gcc, whose coverage libFuzzer cannot
    read, so an input that reaches a new rejection path (a new message template) would
    otherwise look like nothing new. Each new kind gets its own branch of an instrumented
    if-chain, so libFuzzer keeps the input that first reached it."""

    N = 512

    def __init__(self, atheris_module):
        src = ["def hit(i):"]
        for k in range(self.N):
            src.append(f"    {'if' if k == 0 else 'elif'} i == {k}:\n        return {k}")
        src.append("    return -1")
        ns: dict = {}
        exec(compile("\n".join(src), "<feedback>", "exec"), ns)
        self._hit = atheris_module.instrument_func(ns["hit"])
        self.ids: dict[str, int] = {}

    def __call__(self, kind: str) -> None:
        i = self.ids.get(kind)
        if i is None:
            i = self.ids[kind] = len(self.ids) if len(self.ids) < self.N else self.N
        self._hit(i)


# ---- findings -----------------------------------------------------------------------------


class Finding(Exception):
    """Raised out of the fuzz target to stop libFuzzer at the first finding."""


def where(exc: BaseException, package: str = "eoq") -> str:
    """file:line (function) of the innermost frame of the traceback in the package, else the
    innermost frame: the place that raised, or that called the builtin that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if f"/{package}/" in f.filename.replace(os.sep, "/")]
    f = (mine or frames or [None])[-1]
    if f is None:
        return "?"
    path = f.filename.replace(os.sep, "/")
    short = path.split(f"/{package}/", 1)[1] if f"/{package}/" in path else os.path.basename(path)
    return f"{package + '/' if mine else ''}{short}:{f.lineno} ({f.name})"


class Recorder:
    def __init__(self, harness: str, opts: Options):
        self.harness = harness
        self.opts = opts
        self.start = time.time()
        self.execs = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.by_key: dict[str, dict] = {}
        self.counts: collections.Counter = collections.Counter()
        self.slow: list[tuple[float, str]] = []
        self.notes: list[str] = []
        self._summary_printed = False
        self.at_exit: list = []  # called after the summary (clean-ups)
        # libFuzzer ends the process with exit(), which runs C atexit handlers but not
        # Python's: register the summary as a C one.
        self._cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: self.summary(exiting=True))
        try:
            getattr(ctypes.CDLL(None), "__cxa_atexit")(self._cb, None, None)  # (getattr: no name mangling)
        except (AttributeError, OSError):
            import atexit
            atexit.register(self.summary)

    def begin(self) -> None:
        """Called at the first execution: the rate excludes the set-up."""
        if self.execs == 0:
            self.start = time.time()

    def outcome(self, kind: str) -> None:
        self.outcomes[kind] += 1

    def finding(self, kind: str, key: str, data: bytes, info: dict, save=None) -> None:
        """Record one finding (kind: e.g. "exception", "silent wrong output"; key: what
        deduplicates it). The first of each key writes a reproducer; every one counts. In
        the default mode this stops the run (raises Finding out of the fuzz target)."""
        full = f"{kind}: {key}"
        self.counts[full] += 1
        if full not in self.by_key:
            digest = hashlib.sha1(data).hexdigest()[:12]
            stem = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.harness}-{kind}-{key}")[:90].strip("-") + f"-{digest}"
            rec = {"harness": self.harness, "kind": kind, "key": key, "input": f"{stem}.bin",
                   "first_at_exec": self.execs, **info}
            try:
                self.opts.findings.mkdir(parents=True, exist_ok=True)
                (self.opts.findings / f"{stem}.bin").write_bytes(data)
                if save is not None:
                    rec["saved"] = save(self.opts.findings / stem)
                (self.opts.findings / f"{stem}.json").write_text(json.dumps(rec, indent=1, default=repr))
            except OSError as e:
                rec["write_error"] = str(e)
            self.by_key[full] = rec
            if not self.opts.quiet:
                print(f"\n== FINDING [{self.harness}] {full}\n   {info.get('message', '')[:300]}\n"
                      f"   mutation: {info.get('mutation', '')}\n   reproducer: {self.opts.findings / stem}.bin",
                      file=sys.stderr, flush=True)
        if not self.opts.keep_going:
            self.summary()
            raise Finding(f"{full}: {info.get('message', '')[:500]}")

    def exception(self, exc: BaseException, data: bytes, info: dict, kind: str = "exception", save=None) -> None:
        key = f"{type(exc).__name__} at {where(exc)}"
        info = {"exception": type(exc).__name__, "message": str(exc)[:2000], "where": where(exc),
                "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__)[-12:], **info}
        self.finding(kind, key, data, info, save)

    def timed(self, seconds: float, what: str, data: bytes, info: dict) -> None:
        if seconds > self.opts.slow:
            self.finding("slow", what, data, {"seconds": seconds, "message": f"{seconds:.1f} s", **info})
        elif seconds > 1.0:
            self.slow.append((seconds, what))

    def summary(self, exiting: bool = False) -> None:
        """Print the summary (once). At exit (`exiting`) with findings, end the process with
        status 1: libFuzzer itself would exit 0 after -runs in --keep-going mode."""
        if self._summary_printed:
            if exiting and self.by_key:
                os._exit(STOP_EXIT)
            return
        self._summary_printed = True
        t = time.time() - self.start
        lines = [f"==== {self.harness} summary: {self.execs} executions in {t:.1f} s "
                 f"({self.execs / max(t, 1e-9):.0f} exec/s){' under AddressSanitizer' if under_asan() else ''}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  outcomes:")
        for k, v in self.outcomes.most_common(25):
            lines.append(f"    {v:>10}  {k}")
        if len(self.outcomes) > 25:
            lines.append(f"    ... and {len(self.outcomes) - 25} more kinds")
        if self.slow:
            lines.append(f"  executions over 1 s: {len(self.slow)} (longest {max(self.slow)[0]:.1f} s)")
        kinds = collections.Counter()
        for full, n in self.counts.items():
            kinds[full.split(":", 1)[0]] += 1
        lines.append(f"  findings: {len(self.by_key)} distinct, {sum(self.counts.values())} in all"
                     + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(kinds.items()))})" if kinds else ""))
        for full, rec in self.by_key.items():
            lines.append(f"    [{self.counts[full]}x] {full}")
            lines.append(f"        mutation: {str(rec.get('mutation', ''))[:300]}")
            lines.append(f"        message:  {str(rec.get('message', ''))[:300]}")
            lines.append(f"        reproducer: {self.opts.findings / rec['input']}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        try:  # machine-readable copy for tests and make
            out = self.opts.findings / f"{self.harness}-summary.json"
            self.opts.findings.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({
                "harness": self.harness, "executions": self.execs, "seconds": round(t, 3),
                "asan": under_asan(), "outcomes": dict(self.outcomes), "findings": {
                    k: {"count": self.counts[k], **{f: v for f, v in r.items() if f != "traceback"}}
                    for k, r in self.by_key.items()}}, indent=1, default=repr))
        except OSError:
            pass
        for fn in self.at_exit:
            try:
                fn()
            except Exception:  # noqa: BLE001
                pass
        if exiting and self.by_key:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(STOP_EXIT)


def total(findings: str, since: float) -> int:
    """`make fuzz`'s last line: the runs' summaries (written since `since`) added up."""
    runs = []
    for p in sorted(pathlib.Path(findings).glob("*-summary.json")):
        if p.stat().st_mtime >= since:
            runs.append(json.loads(p.read_text()))
    execs = sum(r["executions"] for r in runs)
    found = {k: v for r in runs for k, v in r["findings"].items()}
    wall = time.time() - since
    print(f"==== fuzz total: {execs} executions in {wall:.0f} s wall ({len(runs)} runs: "
          + ", ".join(f"{r['harness']} {r['executions']}" for r in runs) + f"); findings: {len(found)}")
    for k, v in found.items():
        print(f"    {k}: {v.get('mutation')}: {str(v.get('message'))[:200]}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(total(sys.argv[1], float(sys.argv[2])))
