"""`fa4 bench` on the CPU: its help, suites and filters, the JSON schema, ratios and tables on fake rows, the
runner's failure handling, the plot, and the no-GPU mode (with a stand-in fa4, then with the real one)."""
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from fa4.bench import check, cli, cpu, gpu, machine, peers, report, runner, suites
from fa4.bench.timing import Reps
from naive import naive_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(*args, timeout=600, interpret=None):
    """`python -m fa4.bench.cli ARGS` in a fresh process; interpret=False drops TRITON_INTERPRET, as a user's
    shell would not have it (the command must then set it itself)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    if interpret is False:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "fa4.bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


# ---- command line -------------------------------------------------------------------------------------------

def test_help_explains_every_option():
    res = _run_cli("--help")
    assert res.returncode == 0, res.stderr
    for option in ("--suite", "--out", "--json", "--peers", "--dtype", "--rows", "--fwd-only", "--backend",
                   "--quick", "max_memory_allocated", "do_bench", "retain_graph", "TRITON_INTERPRET"):
        assert option in res.stdout, option


@pytest.mark.skipif(shutil.which("fa4") is None, reason="the fa4 console script is not installed (pip install -e .)")
def test_console_script_help():
    res = subprocess.run(["fa4", "bench", "--help"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "--suite" in res.stdout, res.stderr


def test_bench_word_is_accepted(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--suite" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--rows", "D=128,Q=3"], "KEY one of D, S, B, H, causal"),
    (["--suite", "decode", "--rows", "D=128"], "KEY one of B, L, paged"),
    (["--rows", "causal=maybe"], "true/false"),
    (["--peers", "sdpa_flash,fa3"], "unknown peer(s) fa3"),
    (["--suite", "decode", "--fwd-only"], "training and gqa suites only"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_peer_selection():
    assert cli.parse_args([]).peer_names == list(peers.PEER_NAMES)
    assert cli.parse_args(["--suite", "decode"]).peer_names == ["sdpa_flash", "sdpa_cudnn", "flashattn4"]
    assert cli.parse_args(["--peers", "none"]).peer_names == []
    assert cli.parse_args(["--peers", "flex, sdpa_cudnn"]).peer_names == ["flex", "sdpa_cudnn"]


# ---- suites ----------------------------------------------------------------------------------------------------

def test_training_suite_matches_design():
    cases = suites.training_cases()
    assert len(cases) == 14
    for c in cases:
        assert c.B * c.S == 16384 and c.H * c.D == 2048
        assert c.S != 1024 or c.D == 128
    c = suites.TrainingCase(D=128, S=4096, B=4, H=16, causal=False)
    assert c.fwd_flops == 4 * 4 * 16 * 4096 ** 2 * 128
    assert suites.TrainingCase(D=128, S=4096, B=4, H=16, causal=True).fwd_flops * 2 == c.fwd_flops
    assert c.bwd_flops == 2.5 * c.fwd_flops


def test_gqa_suite():
    """fa4's gqa suite: the training suite's D = 128 rows at S = 4096 / 16384 with 16 query heads on 4, 2 or 1 kv
    heads; FLOPs per query head as in training; its rows (and only its) carry Hkv."""
    cases = suites.gqa_cases()
    assert len(cases) == 12 and suites.is_training("gqa") and not suites.is_training("decode")
    assert {c.Hkv for c in cases} == {4, 2, 1} and {(c.D, c.H) for c in cases} == {(128, 16)}
    for c in cases:
        assert c.B * c.S == 16384 and c.kv_heads == c.Hkv and "Hkv" in c.key() and f"Hkv={c.Hkv}" in c.label()
        same = suites.TrainingCase(D=c.D, S=c.S, B=c.B, H=c.H, causal=c.causal)
        assert c.fwd_flops == same.fwd_flops and "Hkv" not in same.key() and same.kv_heads == same.H
    picked = suites.select(cases, [suites.parse_row_filter("Hkv=1,causal=1", "gqa")])
    assert [(c.S, c.Hkv, c.causal) for c in picked] == [(4096, 1, True), (16384, 1, True)]
    with pytest.raises(ValueError, match="Hkv"):
        suites.parse_row_filter("Hkv=1", "training")


def test_gqa_peers_pass_enable_gqa_only_for_gqa_shapes():
    q, k = torch.empty(1, 8, 16, 4), torch.empty(1, 8, 2, 4)
    assert peers._gqa_kwargs(q, k) == {"enable_gqa": True} and peers._gqa_kwargs(q, q) == {}


def test_gqa_table_has_the_kv_heads_column():
    rows = [dict(backend=b, D=128, S=4096, B=4, H=16, Hkv=h, causal=True, fwd_tflops=f, bwd_tflops=f / 2,
                 fwd_extra_mib=1.0, bwd_extra_mib=2.0) for b, f in (("fa4", 600.0), ("sdpa_cudnn", 500.0))
            for h in (4, 1)]
    text = report.table("gqa", rows, ["fa4", "sdpa_cudnn"])
    header = text.splitlines()[1]
    assert "| Hkv |" in header.replace("  ", " ") or " Hkv " in header
    assert text.count("1.20 (sdpa_cudnn)") == 4   # fwd and bwd ratio, two rows
    doc = report.document(INFO, "gqa", 790.0, 3000.0, rows)
    assert list(doc["rows"][0]) == ["backend", "D", "S", "B", "H", "Hkv", "causal", "fwd_tflops", "bwd_tflops",
                                    "fwd_extra_mib", "bwd_extra_mib"]


def test_decode_suite_matches_design():
    cases = suites.decode_cases()
    assert len(cases) == 12 and {c.paged for c in cases} == {False, True}
    c = suites.DecodeCase(B=1, L=8192, paged=False)
    assert c.kv_bytes == 2 * 8192 * 8 * 128 * 2 == 32 << 20
    assert runner.rotation_count(c) == 3                      # 32 MiB: rotate to pass 100 MB
    assert runner.rotation_count(suites.DecodeCase(B=64, L=8192, paged=True)) == 1


def test_row_filters():
    cases = suites.training_cases()
    picked = suites.select(cases, [suites.parse_row_filter("D=128,S=16384", "training")])
    assert [(c.D, c.S, c.causal) for c in picked] == [(128, 16384, False), (128, 16384, True)]
    union = suites.select(cases, [suites.parse_row_filter("D=128,S=16384", "training"),
                                  suites.parse_row_filter("D=64, causal=yes", "training")])
    assert len(union) == 4
    decode = suites.select(suites.decode_cases(), [suites.parse_row_filter("B=1,paged=0", "decode")])
    assert [(c.B, c.L, c.paged) for c in decode] == [(1, 8192, False), (1, 65536, False)]
    assert suites.select(cases, []) == cases


# ---- fake rows: JSON, ratios, tables, plot -------------------------------------------------------------------

def _training_rows():
    def row(backend, causal, fwd, bwd, fmem=1.0, bmem=2.0):
        return {"backend": backend, "D": 128, "S": 4096, "B": 4, "H": 16, "causal": causal, "fwd_tflops": fwd,
                "bwd_tflops": bwd, "fwd_extra_mib": fmem, "bwd_extra_mib": bmem}
    return [row("fa4", False, 600.0, 500.0), row("sdpa_cudnn", False, 604.0, 511.0),
            row("flex", False, 458.0, 393.0), row("flashattn4", False, 661.0, None, 4.0, None),
            row("fa4", True, 560.0, None, 1.0, None), row("sdpa_cudnn", True, 532.0, 433.0),
            row("flex", True, None, None, None, None)]


def _decode_rows():
    def row(backend, b, paged, gbps):
        return {"backend": backend, "B": b, "L": 8192, "paged": paged, "gbps": gbps}
    return [row("fa4", 1, False, 1500.0), row("sdpa_flash", 1, False, 979.0), row("sdpa_cudnn", 1, False, 671.0),
            row("flashattn4", 1, False, 217.0), row("fa4", 1, True, 1400.0), row("flashattn4", 1, True, 179.0),
            row("fa4", 8, False, None), row("sdpa_cudnn", 8, False, 2506.0)]


INFO = {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "date": "2026-11-25T17:50:00Z"}


@pytest.mark.parametrize("suite, rows, fields", [
    ("training", _training_rows(), ["backend", "D", "S", "B", "H", "causal", "fwd_tflops", "bwd_tflops",
                                    "fwd_extra_mib", "bwd_extra_mib"]),
    ("decode", _decode_rows(), ["backend", "B", "L", "paged", "gbps"]),
])
def test_json_document_schema(tmp_path, suite, rows, fields):
    noisy = [{**r, "fwd_ms": 1.0} for r in rows]  # anything outside the schema must not leak into the file
    doc = report.document(INFO, suite, 791.234, 2999.9, noisy)
    path = tmp_path / "sub" / "r.json"
    report.write_json(str(path), doc)
    back = json.loads(path.read_text())
    assert list(back) == ["card", "torch", "triton", "date", "suite", "matmul_tflops", "copy_gbps", "rows"]
    assert back["suite"] == suite and back["matmul_tflops"] == 791.2 and back["card"] == INFO["card"]
    assert len(back["rows"]) == len(rows)
    for row in back["rows"]:
        assert sorted(row) == sorted(fields)
    assert None in [v for r in back["rows"] for v in r.values()]  # a failed figure is a JSON null


def test_training_ratios_and_table():
    rows = _training_rows()
    ratios = report.training_ratios(rows)
    full, causal = (128, 4096, 4, 16, False), (128, 4096, 4, 16, True)
    assert ratios[full]["fwd"] == (pytest.approx(600 / 661), "flashattn4")
    assert ratios[full]["bwd"] == (pytest.approx(500 / 511), "sdpa_cudnn")   # flashattn4's bwd failed
    assert ratios[causal]["fwd"] == (pytest.approx(560 / 532), "sdpa_cudnn")  # flex failed: not a candidate
    assert ratios[causal]["bwd"] == (None, "sdpa_cudnn")                      # fa4 has no figure
    text = report.training_table(rows)
    header = text.splitlines()[1]
    assert header.index("fa4") < header.index("sdpa_cudnn") < header.index("fa4/best fwd")
    assert "0.91 (flashattn4)" in text and "1.05 (sdpa_cudnn)" in text
    assert "661 / --" in text and "-- / --" in text
    assert "Extra memory" in text and "4.0 / --" in text


def test_decode_ratios_compare_any_layout():
    rows = _decode_rows()
    ratios = report.decode_ratios(rows)
    assert ratios[(1, 8192, False)] == (pytest.approx(1500 / 979), "sdpa_flash")
    # paged fa4 is held to the best peer at (B, L) whatever its layout, not only to the paged peer
    assert ratios[(1, 8192, True)] == (pytest.approx(1400 / 979), "sdpa_flash")
    assert ratios[(8, 8192, False)] == (None, "sdpa_cudnn")
    text = report.decode_table(rows)
    line = next(l for l in text.splitlines() if "paged" in l and l.startswith("| 1 |"))
    assert "n/a" in line  # SDPA has no paged row
    assert "1.43 (sdpa_flash)" in text


def test_plot_written_or_skipped_with_reason(tmp_path, monkeypatch):
    path = tmp_path / "plot.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in report.plot(str(path), "training", _training_rows(), "t")
    else:
        assert report.plot(str(path), "training", _training_rows(), "t") is None
        assert path.read_bytes()[:4] == b"\x89PNG"
        assert report.plot(str(tmp_path / "d.png"), "decode", _decode_rows(), "t") is None
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as when it is not installed
    assert "matplotlib is not importable" in report.plot(str(tmp_path / "x.png"), "decode", _decode_rows(), "t")


# ---- runner on the CPU, with the CUDA timing stubbed -------------------------------------------------------

class _FakeBackend:
    def __init__(self, name, fail_bwd=False, fail=False):
        self.name, self.fail_bwd, self.fail = name, fail_bwd, fail

    def training(self, causal):
        def f(q, k, v):
            if self.fail:
                raise RuntimeError("no kernel for this shape")
            k, v = (t.repeat_interleave(q.shape[2] // t.shape[2], 2) for t in (k, v))  # GQA rows
            out = (q * k).sum(-1, keepdim=True) * v
            if self.fail_bwd:
                out = out.detach().requires_grad_()  # a graph that does not reach q, k, v
            return out
        return f

    def decode(self, case):
        if self.name == "broken":
            raise RuntimeError("fa4.flash_attn_with_kvcache is not available")
        if case.paged and self.name == "sdpa_flash":
            raise peers.NotApplicable("SDPA has no paged KV cache")
        if self.fail:
            return lambda x: 1 / 0
        return lambda x: x.q * 1


@pytest.fixture
def no_cuda_timing(monkeypatch):
    monkeypatch.setattr(runner, "bench_ms", lambda fn, reps: (fn(), 2.0)[1])
    monkeypatch.setattr(runner, "call_with_extra_memory", lambda fn: (fn(), 3.0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)


def test_runner_records_failures_and_keeps_going(no_cuda_timing):
    case = suites.TrainingCase(D=8, S=16, B=1, H=2, causal=True)
    lines = []
    backends = [_FakeBackend("fa4"), _FakeBackend("flex", fail=True), _FakeBackend("sdpa_flash", fail_bwd=True)]
    res = runner.run_training([case], backends, dtype=torch.float32, reps=Reps(1, 1), log=lines.append,
                              device="cpu")
    by = {r["backend"]: r for r in res.rows}
    assert by["fa4"]["fwd_tflops"] == pytest.approx(case.fwd_flops / 2.0 / 1e9)
    assert by["fa4"]["bwd_tflops"] == pytest.approx(case.bwd_flops / 2.0 / 1e9)
    assert by["fa4"]["fwd_extra_mib"] == 3.0 and by["fa4"]["bwd_extra_mib"] == 3.0
    assert by["flex"]["fwd_tflops"] is None and by["flex"]["bwd_tflops"] is None
    assert by["sdpa_flash"]["fwd_tflops"] is not None and by["sdpa_flash"]["bwd_tflops"] is None
    assert len(lines) == 3 and "FAILED forward: RuntimeError: no kernel" in lines[1]
    assert any("flex" in f and "no kernel" in f for f in res.failures)
    assert any(f.startswith("sdpa_flash") and "backward" in f for f in res.failures)
    fwd_only = runner.run_training([case], backends[:1], dtype=torch.float32, reps=Reps(1, 1),
                                   fwd_only=True, log=lines.append, device="cpu")
    assert fwd_only.rows[0]["bwd_tflops"] is None and fwd_only.rows[0]["fwd_tflops"] is not None


def test_decode_runner_not_applicable_and_failures(no_cuda_timing):
    cases = [suites.DecodeCase(B=2, L=256, paged=p, Hq=4, Hkv=2, D=16, page_size=64) for p in (False, True)]
    res = runner.run_decode(cases, [_FakeBackend("fa4"), _FakeBackend("sdpa_flash"),
                                    _FakeBackend("flashattn4", fail=True), _FakeBackend("broken")],
                            dtype=torch.float32, reps=Reps(1, 1), log=lambda m: None, device="cpu")
    assert [(r["backend"], r["paged"]) for r in res.rows] == [
        ("fa4", False), ("sdpa_flash", False), ("flashattn4", False), ("broken", False),
        ("fa4", True), ("flashattn4", True), ("broken", True)]
    assert "setup: RuntimeError: fa4.flash_attn_with_kvcache is not available" in res.failures[1]
    assert res.rows[0]["gbps"] == pytest.approx(cases[0].kv_bytes / 2.0 / 1e6)
    assert res.rows[2]["gbps"] is None and "ZeroDivisionError" in res.failures[0]
    assert res.not_applicable == ["sdpa_flash B=2 L=256 paged: SDPA has no paged KV cache"]


def test_decode_runner_rotates_page_tables(no_cuda_timing, monkeypatch):
    """--page-tables N: each paged row rotates over at least N caches, each with its own page table; contiguous
    rows keep the byte-based rotation."""
    seen = []
    monkeypatch.setattr(runner, "bench_ms", lambda fn, reps, *flush: ([fn() for _ in range(12)], 2.0)[1])

    class Recorder(_FakeBackend):
        def decode(self, case):
            return lambda x: seen.append((case.paged, x.page_table.flatten().tolist())) or x.q * 1

    cases = [suites.DecodeCase(B=2, L=256, paged=p, Hq=4, Hkv=2, D=16, page_size=64) for p in (False, True)]
    res = runner.run_decode(cases, [Recorder("fa4")], dtype=torch.float32, reps=Reps(1, 1), log=lambda m: None,
                            device="cpu", page_tables=runner.MAX_ROTATION + 3)
    rotated = {d["paged"]: d["rotated_caches"] for d in res.details}
    assert rotated == {False: runner.rotation_count(cases[0]), True: runner.MAX_ROTATION + 3}
    assert len({tuple(t) for paged, t in seen if paged}) == runner.MAX_ROTATION + 3  # a table per cache
    with pytest.raises(SystemExit):
        cli.parse_args(["--suite", "training", "--page-tables", "2"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--suite", "decode", "--page-tables", "0"])
    assert cli.parse_args(["--suite", "decode", "--page-tables", "4"]).page_tables == 4


def test_decode_inputs_page_table_is_a_permutation():
    case = suites.DecodeCase(B=2, L=256, paged=True, Hq=4, Hkv=2, D=16, page_size=64)
    x = peers.make_decode_inputs(case, torch.float32, device="cpu", generator=torch.Generator().manual_seed(1))
    assert x.page_table.dtype == torch.int32 and x.page_table.shape == (2, 4)
    assert sorted(x.page_table.flatten().tolist()) == list(range(8))
    assert x.k_pages.data_ptr() == x.k.data_ptr() and x.k_pages.shape == (8, 64, 2, 16)


# ---- the no-GPU mode ---------------------------------------------------------------------------------------

def _stand_in_fa4(error=1.0):
    """fa4's two entry points computed by the naive oracle in fp32 (then scaled by `error`)."""
    def flash_attn_func(q, k, v, causal=False, backend=None, **kw):
        return naive_attention(q.float(), k.float(), v.float(), causal=causal)[0].to(q.dtype) * error

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, page_table=None, **kw):
        outs = []
        for b, n in enumerate(cache_seqlens.tolist()):
            if page_table is None:
                k, v = k_cache[b:b + 1, :n], v_cache[b:b + 1, :n]
            else:  # the sequence's pages, in page-table order, as one (1, pages·page_size, Hkv, D) run
                k, v = (c[page_table[b].long()].flatten(0, 1)[None, :n] for c in (k_cache, v_cache))
            outs.append(naive_attention(q[b:b + 1].float(), k.float(), v.float())[0])
        return torch.cat(outs).to(q.dtype) * error
    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_with_kvcache=flash_attn_with_kvcache)


@pytest.mark.parametrize("suite", ["training", "gqa", "decode"])
def test_cpu_mode_with_a_stand_in_fa4(monkeypatch, suite):
    monkeypatch.setattr(peers, "load_fa4", lambda: _stand_in_fa4())
    lines = []
    assert cpu.run_cpu(cli.parse_args(["--suite", suite]), out=lines.append) == 0
    assert any(l.startswith("PASS") for l in lines) and "Timing needs a CUDA GPU" in lines[-1]
    monkeypatch.setattr(peers, "load_fa4", lambda: _stand_in_fa4(error=1.05))
    lines = []
    assert cpu.run_cpu(cli.parse_args(["--suite", suite]), out=lines.append) == 1
    assert any("FAIL" in l for l in lines)


@pytest.mark.parametrize("suite", ["training", "decode"])
def test_cpu_mode_writes_the_json_document(monkeypatch, tmp_path, suite):
    """--json / --out without a GPU: DESIGN.md's document, every selected row for fa4 with null figures (nothing
    is timed), and the CPU named as the card; nothing silently dropped."""
    monkeypatch.setattr(peers, "load_fa4", lambda: _stand_in_fa4())
    path, out_dir = tmp_path / "doc.json", tmp_path / "out"
    lines = []
    args = cli.parse_args(["--suite", suite, "--json", str(path), "--out", str(out_dir)])
    assert cpu.run_cpu(args, out=lines.append) == 0
    doc = json.loads(path.read_text())
    assert tuple(doc) == report.DOCUMENT_FIELDS and doc["suite"] == suite
    assert doc["matmul_tflops"] is None and doc["copy_gbps"] is None and "no CUDA device" in doc["card"]
    fields = report.TRAINING_FIELDS if suite == "training" else report.DECODE_FIELDS
    assert len(doc["rows"]) == (14 if suite == "training" else 12)
    for row in doc["rows"]:
        assert tuple(row) == fields and row["backend"] == "fa4"
        assert all(row[f] is None for f in fields if f.endswith(("tflops", "mib", "gbps")))
    written = sorted(os.listdir(out_dir))
    assert len(written) == 2 and written[0].endswith(".json") and written[1].endswith(".md")
    assert json.loads((out_dir / written[0]).read_text())["details"]["passed"] is True
    lines = []
    assert cpu.run_cpu(cli.parse_args(["--suite", suite, "--rows", "B=3"]), out=lines.append) == 1
    assert lines[-1].startswith(f"no row of the {suite} suite matches")


def test_output_paths_are_checked_before_the_run(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("")
    for argv, message in ((["--out", str(a_file)], "exists and is not a directory"),
                          (["--json", str(tmp_path)], "is a directory"),
                          (["--out", str(a_file / "sub")], "is not a directory"),
                          (["--json", str(a_file / "x.json")], "is not a directory")):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_repeated_peers_run_once_and_a_peer_without_rows_keeps_its_column():
    assert cli.parse_args(["--peers", "sdpa_cudnn,flex,sdpa_cudnn"]).peer_names == ["sdpa_cudnn", "flex"]
    rows = [dict(backend="fa4", B=1, L=8192, paged=False, gbps=1500.0)]
    text = report.table("decode", rows, ["fa4", "flex"])
    header, _, line = text.splitlines()[1:4]
    assert "flex" in header and line.rstrip(" |").split("|")[-2].strip() == "n/a"


SMALL_SUITES = {
    "training": lambda: [suites.TrainingCase(D=d, S=64, B=2, H=2, causal=c) for d in (32, 64) for c in (0, 1)],
    "gqa": lambda: [suites.TrainingCase(D=64, S=64, B=2, H=4, causal=c, Hkv=h) for h in (2, 1) for c in (0, 1)],
    "decode": lambda: [suites.DecodeCase(B=b, L=128, paged=p, Hq=4, Hkv=2, D=32, page_size=32)
                       for b in (1, 2) for p in (False, True)],
}


@pytest.mark.parametrize("suite, argv", [
    ("training", ["--rows", "D=64", "--peers", "flex,flashattn4"]),
    ("gqa", ["--rows", "Hkv=1", "--peers", "flex,flashattn4"]),
    ("decode", ["--rows", "B=1", "--peers", "sdpa_flash,flashattn4"]),
])
def test_gpu_flow_end_to_end_on_the_cpu(monkeypatch, no_cuda_timing, tmp_path, suite, argv):
    """The GPU command's whole flow (check, ceilings, peers, runner, table, --json, --out) with CUDA stubbed:
    CPU tensors, small rows, a stand-in fa4, fake peers (one missing), constant timings."""
    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    monkeypatch.setitem(suites.SUITES, suite, SMALL_SUITES[suite])
    monkeypatch.setattr(peers, "load_fa4", lambda: _stand_in_fa4())
    monkeypatch.setattr(machine, "describe", lambda: {**INFO, "driver": "580", "cuda": "13.0", "cudnn": 91900,
                                                      "capability": "9.0", "sms": 132, "fa4": "0.1.0"})
    monkeypatch.setattr(machine, "matmul_tflops", lambda: 790.0)
    monkeypatch.setattr(machine, "copy_gbps", lambda: 3000.0)
    first, second = argv[-1].split(",")
    monkeypatch.setattr(gpu, "resolve", lambda names: ([_FakeBackend(first)], {second: "ImportError: no cute"}))
    json_path = tmp_path / "r.json"
    args = cli.parse_args(["--suite", suite, "--json", str(json_path), "--out", str(tmp_path / "out"), *argv])
    lines, progress = [], []
    assert gpu.run_gpu(args, out=lines.append, log=progress.append) == 0
    text = "\n".join(lines)
    assert "PASS" in text and "FAIL" not in text and "not available: " + second in text
    assert "fa4/best" in text and len(progress) >= 2
    doc = json.loads(json_path.read_text())
    assert doc["suite"] == suite and doc["matmul_tflops"] == 790.0
    assert {r["backend"] for r in doc["rows"]} == {"fa4", first}
    # training: 4 rows of D = 64 (2 backends × 2); gqa: Hkv = 1 (2 × 2); decode: SDPA has no paged row (n/a).
    assert len(doc["rows"]) == (3 if suite == "decode" else 4)
    if suite == "gqa":
        assert all(r["Hkv"] == 1 for r in doc["rows"])
    written = sorted(os.listdir(tmp_path / "out"))
    stem = "nvidia-h100-80gb-hbm3-" + suite + "-2026-11-25-1750"
    assert [w for w in written if not w.endswith(".png")] == [stem + ".json", stem + ".md"]
    full = json.loads((tmp_path / "out" / (stem + ".json")).read_text())
    assert full["rows"] == doc["rows"] and full["details"]["missing_peers"] == {second: "ImportError: no cute"}


def test_gpu_flow_stops_when_fa4_is_wrong(monkeypatch, no_cuda_timing):
    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    monkeypatch.setattr(peers, "load_fa4", lambda: _stand_in_fa4(error=1.1))
    monkeypatch.setitem(suites.SUITES, "training", SMALL_SUITES["training"])
    monkeypatch.setattr(machine, "describe", lambda: {**INFO, "driver": None, "cuda": None, "cudnn": None,
                                                      "capability": None, "sms": None, "fa4": None})
    timed = []
    monkeypatch.setattr(machine, "matmul_tflops", lambda: timed.append(1))
    lines = []
    args = cli.parse_args(["--rows", "D=64,causal=0", "--fwd-only"])
    assert gpu.run_gpu(args, out=lines.append, log=lambda m: None) == 2
    assert "WRONG" in lines[-1] and not timed


def test_rule_rejects_nan_and_shape():
    ref = torch.zeros(4)
    assert not check.rule("x", torch.full((4,), float("nan")), ref, ref).ok
    assert not check.rule("x", torch.zeros(5), ref, ref).ok
    assert check.rule("x", ref, ref, ref).ok


def _real_fa4_missing(entry):
    try:
        import fa4
        getattr(fa4, entry)
    except Exception as exc:
        return f"fa4.{entry} does not import yet ({type(exc).__name__}: {exc})"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("suite, entry", [("training", "flash_attn_func"), ("decode", "flash_attn_with_kvcache")])
def test_cpu_mode_runs_the_real_kernels(suite, entry):
    """The command a user types without a GPU: fa4's Triton kernels under the interpreter, PASS, exit 0."""
    if torch.cuda.is_available():
        pytest.skip("the no-GPU mode needs a machine without CUDA")
    reason = _real_fa4_missing(entry)
    if reason:
        pytest.skip(reason)
    res = _run_cli("--suite", suite, interpret=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS" in res.stdout and "Timing needs a CUDA GPU" in res.stdout


# ---- timing hygiene -------------------------------------------------------------------------------------------

def test_bench_ms_pauses_the_garbage_collector(monkeypatch):
    """bench_ms times with the cyclic collector paused and restores its state afterwards, also when the timed
    call raises (do_bench is replaced by a stand-in that records what the timed call saw)."""
    import gc

    import triton.testing

    from fa4.bench import timing
    seen = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        fn()
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert gc.isenabled()
    assert timing.bench_ms(lambda: seen.append(gc.isenabled()), Reps(1, 1)) == 1.5
    assert seen == [False] and gc.isenabled()

    def boom():
        raise RuntimeError("timed call failed")
    with pytest.raises(RuntimeError):
        timing.bench_ms(boom, Reps(1, 1))
    assert gc.isenabled()

    gc.disable()  # a caller that had it off keeps it off
    try:
        timing.bench_ms(lambda: None, Reps(1, 1))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_read_flush_is_passed_to_every_timed_call(monkeypatch):
    """--l2-flush read reaches bench_ms for every backend and row; the default memset call keeps bench_ms's
    two-argument form (do_bench's own flush)."""
    calls = []

    def fake_bench_ms(fn, reps, *flush):
        fn()
        calls.append(flush)
        return 2.0
    monkeypatch.setattr(runner, "bench_ms", fake_bench_ms)
    monkeypatch.setattr(runner, "call_with_extra_memory", lambda fn: (fn(), 3.0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)
    cases = [suites.DecodeCase(B=2, L=256, paged=p, Hq=4, Hkv=2, D=16, page_size=64) for p in (False, True)]
    runner.run_decode(cases, [_FakeBackend("fa4")], dtype=torch.float32, reps=Reps(1, 1), log=lambda m: None,
                      device="cpu", l2_flush="read")
    assert calls == [("read",), ("read",)]
    calls.clear()
    train = suites.TrainingCase(D=8, S=16, B=1, H=2, causal=False)
    runner.run_training([train], [_FakeBackend("fa4")], dtype=torch.float32, reps=Reps(1, 1), log=lambda m: None,
                        device="cpu")
    assert calls == [(), ()]


def test_unknown_l2_flush_is_named():
    from fa4.bench import timing
    with pytest.raises(ValueError, match="l2_flush"):
        timing.bench_ms(lambda: None, Reps(1, 1), "nothing")
    assert cli.parse_args(["--suite", "decode", "--l2-flush", "memset"]).l2_flush == "memset"
    assert cli.parse_args(["--l2-flush", "read"]).l2_flush == "read"
    # Defaults: the anchors' memset for training, the clean read flush for decode (cli.DEFAULT_L2_FLUSH).
    assert cli.parse_args([]).l2_flush == "memset"
    assert cli.parse_args(["--suite", "decode"]).l2_flush == "read"


def test_gpu_checks_cover_the_timed_routes(monkeypatch):
    """The correctness checks before timing reach the kernel routes the timed rows take: a long shape (S = 4096)
    besides the short one for every head dim and mask with a row that long, GQA checks with the row's own group,
    and decode steps with the timed rows' split shapes (one sequence of 16,384 keys; a batch of 8)."""
    calls = []
    monkeypatch.setattr(gpu, "check_training", lambda api, **kw: calls.append(("training", kw)) or [])
    monkeypatch.setattr(gpu, "check_decode", lambda api, **kw: calls.append(("decode", kw)) or [])
    args = cli.parse_args(["--suite", "training"])
    gpu.correctness_checks(args, None, suites.select(suites.SUITES["training"](), args.filters), torch.bfloat16)
    shapes = {(kw["D"], kw["causal"], kw["S"], kw["H"], kw["Hkv"]) for _, kw in calls}
    for d in (64, 128, 256):
        for causal in (False, True):
            assert {(d, causal, 512, 4, None), (d, causal, 4096, 4, None)} <= shapes
    calls.clear()
    args = cli.parse_args(["--suite", "gqa"])
    gpu.correctness_checks(args, None, suites.select(suites.SUITES["gqa"](), args.filters), torch.bfloat16)
    groups = {(kw["S"], kw["H"] // kw["Hkv"]) for _, kw in calls}
    assert groups == {(s, g) for s in (512, 4096) for g in (4, 8, 16)}
    calls.clear()
    args = cli.parse_args(["--suite", "decode"])
    gpu.correctness_checks(args, None, suites.select(suites.SUITES["decode"](), args.filters), torch.bfloat16)
    assert {(kw["B"], kw["L"], kw["paged"]) for _, kw in calls} == {
        (b, length, paged) for b, length in ((4, 1024), (1, 16384), (8, 4096)) for paged in (False, True)}
    calls.clear()
    args = cli.parse_args(["--suite", "training", "--rows", "S=1024"])
    gpu.correctness_checks(args, None, suites.select(suites.SUITES["training"](), args.filters), torch.bfloat16)
    assert {kw["S"] for _, kw in calls} == {512}  # no selected row reaches the long shape


def test_module_entry_point_and_backend_choices():
    """`python -m fa4.bench` is the same command as `fa4 bench`; an unknown --backend is an argument error (2)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-m", "fa4.bench", "--help"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 0 and "--suite" in res.stdout, res.stderr
    res = _run_cli("--backend", "foo")
    assert res.returncode == 2 and "--backend" in res.stderr
