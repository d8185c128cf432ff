"""Compile Gluon configurations ahead of time in child processes (a failed Gluon compile can abort the
process), several children in parallel, and collect each configuration's SASS report.

`module` is a module of fa4.kernels.sm90 that provides compile_config(**kwargs) and sass_report(compiled).
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One child compiles a list of configurations and prints a REPORT line after each.
_CHILD = r"""
import importlib, json, sys, torch
aot = importlib.import_module("fa4.kernels.sm90." + sys.argv[1])
for name, kw in json.loads(sys.argv[2]):
    if "dtype" in kw:
        kw["dtype"] = getattr(torch, kw["dtype"])
    if "window" in kw:
        kw["window"] = tuple(kw["window"])
    rep = aot.sass_report(aot.compile_config(**kw))
    print("REPORT " + json.dumps([name, rep]), flush=True)
"""


def _compile_in_child(module, cases):
    proc = subprocess.run([sys.executable, "-c", _CHILD, module, json.dumps(cases)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="0"))
    reports = dict(json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    log = (proc.stdout + proc.stderr)[-3000:]
    return {name: (reports.get(name), log) for name, _ in cases}


def compile_reports(module, cases):
    """{name: (report or None, the child's log tail)} for cases = [(name, compile_config kwargs), ...]."""
    workers = max(2, min(8, os.cpu_count() or 2))
    chunks = [cases[i::workers] for i in range(workers)]
    out = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(lambda chunk: _compile_in_child(module, chunk), chunks):
            out.update(part)
    return out
