"""``lowrank bench`` (lowrank/bench.py): the JSON rows of a tiny run, the peers' "n/a" path, and one
ValueError naming the option for each kind of bad input.

The runs use a tiny shape, a tiny budget (every row gets MIN_ROUNDS) and one thread (on a busy
2-core machine a two-thread region waits a scheduler slice for its second thread), and measure no
code paths (LOWRANK_CALIBRATION=off), so the file takes seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest
import torch

from lowrank import bench
from lowrank.ops import _dispatch

TINY = ["--shape", "64,96", "--budget", "0.2", "--threads", "1", "--json"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lowrank bench")
    bench.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(autouse=True)
def no_code_path_measuring(monkeypatch):
    """LOWRANK_CALIBRATION=off, and the default decisions it leaves in the process forgotten afterwards."""
    monkeypatch.setenv("LOWRANK_CALIBRATION", "off")
    monkeypatch.setattr(_dispatch, "_decisions", dict(_dispatch._decisions))


@pytest.fixture
def quiet_run():
    """Runs the bench with ``argv``, returns (exit code, parsed JSON); restores torch's thread count."""
    threads = torch.get_num_threads()

    def call(argv: list[str], capsys) -> tuple[int, dict]:
        try:
            code = bench.run(parse(argv))
        finally:
            torch.set_num_threads(threads)
        return code, json.loads(capsys.readouterr().out)

    return call


def expected_rows() -> set[tuple[str, str, int]]:
    forward = {(case, "forward", m) for case in ("LoRA", "VeRA", "NF4", "QLoRA") for m in (1, 16, 512)}
    return forward | {(case, "forward_backward", 512) for case in ("LoRA", "VeRA", "NF4", "QLoRA")}


def check_rows(report: dict) -> None:
    rows = report["rows"]
    assert {(r["case"], r["mode"], r["M"]) for r in rows} == expected_rows()
    assert len(rows) == len(expected_rows())
    for r in rows:
        for key in ("nn_linear_ms", "lowrank_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["label"], key, r[key])
        assert r["lowrank_over_nn_linear"] == pytest.approx(r["lowrank_ms"] / r["nn_linear_ms"], rel=1e-12)
        if r["peer_ms"] is None:
            assert r["lowrank_over_peer"] is None and r["peer_missing"].startswith("n/a (")
        else:
            assert math.isfinite(r["peer_ms"]) and r["peer_ms"] > 0, r["label"]
            assert r["lowrank_over_peer"] == pytest.approx(r["lowrank_ms"] / r["peer_ms"], rel=1e-12)
            assert r["peer_missing"] is None
        assert r["rounds"] >= bench.MIN_ROUNDS


def test_json_rows(quiet_run, capsys):
    code, report = quiet_run(TINY, capsys)
    assert code == 0
    check_rows(report)
    assert report["machine"]["threads"] == 1 and report["machine"]["dtype"] == "fp32"
    assert report["machine"]["shape"] == [64, 96]
    vera = {r["rank"] for r in report["rows"] if r["case"] == "VeRA"}
    assert vera == {64}  # min(256, IN, OUT), and the notes say so
    assert any("VeRA: r=64" in note for note in report["notes"])
    lora = {r["rank"] for r in report["rows"] if r["case"] in ("LoRA", "QLoRA")}
    assert lora == {16}
    peers = {r["case"]: r["peer_ms"] is not None for r in report["rows"]}
    have = {name: _importable(name) for name in ("peft", "bitsandbytes")}
    assert peers["LoRA"] == peers["VeRA"] == have["peft"]
    if not have["bitsandbytes"]:
        assert not peers["NF4"] and not peers["QLoRA"]


def test_missing_peers_read_na(quiet_run, capsys, monkeypatch):
    """Without PEFT and bitsandbytes every row is still timed against nn.Linear; the peer column says
    what to install."""
    for name in ("peft", "bitsandbytes"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    code, report = quiet_run(TINY + ["--r", "4", "--dtype", "bf16"], capsys)
    assert code == 0
    check_rows(report)
    missing = {r["case"]: r["peer_missing"] for r in report["rows"]}
    assert missing == {
        "LoRA": "n/a (pip install peft)",
        "VeRA": "n/a (pip install peft)",
        "NF4": "n/a (pip install bitsandbytes)",
        "QLoRA": "n/a (pip install peft bitsandbytes)",
    }
    assert {r["rank"] for r in report["rows"] if r["case"] == "LoRA"} == {4}


def test_failing_peer_is_left_out(quiet_run, capsys, monkeypatch):
    """A peer that raises when called (bitsandbytes' packed CPU kernel asserts N % 64 == 0 in eval mode)
    reads n/a with the reason; its row is still timed against nn.Linear."""

    class Raising(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    monkeypatch.setattr(bench, "import_peers", lambda: ({"peft": "pip install peft"}, []))
    monkeypatch.setattr(bench, "bnb_linear4bit", lambda dense32, dtype, device: Raising())
    code, report = quiet_run(TINY, capsys)
    assert code == 0
    check_rows(report)
    nf4 = [r for r in report["rows"] if r["case"] == "NF4"]
    assert all(r["peer_missing"] == "n/a (RuntimeError: boom)" for r in nf4)
    assert "bnb failed (NF4 fwd, NF4 fwd+bwd): RuntimeError: boom" in report["notes"]
    assert {r["peer_missing"] for r in report["rows"] if r["case"] == "QLoRA"} == {"n/a (pip install peft)"}


def test_plain_table(monkeypatch, capsys):
    """Without rich: a plain aligned table, the machine first."""
    for name in ("peft", "bitsandbytes", "rich"):
        monkeypatch.setitem(sys.modules, name, None)
    threads = torch.get_num_threads()
    try:
        assert bench.run(parse([a for a in TINY if a != "--json"])) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert "| 1 thread |" in lines[0] and "| fp32 |" in lines[0] and "| torch " in lines[0]
    assert lines[1].split()[:3] == ["case", "pass", "M"]
    body = lines[3 : 3 + len(expected_rows())]
    assert all(line.startswith(("LoRA", "VeRA", "NF4", "QLoRA")) for line in body)
    assert all(len(line) == len(lines[1]) for line in body)  # aligned
    assert lines[3 + len(expected_rows())].startswith("ms: median")  # then the notes


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--shape", "5x"], "--shape"),
        (["--shape", "64"], "--shape"),
        (["--shape", "64,0"], "--shape"),
        (["--shape", "64,-3"], "--shape"),
        (["--shape", "64,96,8"], "--shape"),
        (["--r", "0"], "--r"),
        (["--r", "-2"], "--r"),
        (["--r", "two"], "--r"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "fp16"], "--dtype"),
        (["--threads", "0"], "--threads"),
        (["--budget", "0"], "--budget"),
        (["--budget", "nan"], "--budget"),
    ],
)
def test_bad_option_names_it(argv, option):
    with pytest.raises(ValueError, match=f"^{option}: expected") as error:
        bench.run(parse(argv))
    assert "\n" not in str(error.value)
    assert repr(argv[1]) in str(error.value)  # says what it got


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu_names_the_option():
    with pytest.raises(ValueError, match="^--device: cuda requested, but"):
        bench.run(parse(["--device", "cuda"]))


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def test_uncached_code_paths_are_measured_first(monkeypatch, tmp_path):
    """With nothing cached on disk the bench measures lowrank's code-path choices before its rows (so
    the table times what lowrank runs in use, not built-in defaults), caches them, and says so; a
    second run finds them cached; LOWRANK_CALIBRATION=off keeps the defaults and says that."""
    monkeypatch.setenv("LOWRANK_CALIBRATION", "disk")
    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_dispatch, "_decisions", {})
    measured = []
    monkeypatch.setitem(_dispatch._PROBES, "cpu_bf16_gemm", lambda: measured.append(1) or ("native", {"probe": 1}))
    monkeypatch.setattr(_dispatch, "DEFAULTS", {"cpu_bf16_gemm": "widen"})
    note, seconds = bench.measure_code_paths(torch.device("cpu"))
    assert measured == [1] and seconds >= 0
    assert "1 of 1 measured now" in note and "cached on disk" in note
    assert _dispatch.decide("cpu_bf16_gemm") == "native"
    assert (tmp_path / "calibration.json").exists()
    monkeypatch.setattr(_dispatch, "_decisions", {})
    note, seconds = bench.measure_code_paths(torch.device("cpu"))
    assert measured == [1] and seconds == 0.0 and "disk cache" in note
    monkeypatch.setenv("LOWRANK_CALIBRATION", "off")
    note, seconds = bench.measure_code_paths(torch.device("cpu"))
    assert measured == [1] and "built-in defaults" in note


