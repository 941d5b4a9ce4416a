"""`lowrank finetune` and `lowrank generate` end to end on a tiny Llama built from config (seconds), the
GGUF path through the CLI, bad arguments and files (one line, exit status 2, no traceback), and
`import lowrank` staying light."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank
from lowrank.__main__ import main

needs = [m for m in ("transformers", "tokenizers", "matplotlib", "rich") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(needs), reason=f"lowrank[finetune] not installed: {needs}")

if not needs:
    import finetune_fixtures as F

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "3", "--batch-size", "4", "--quick", "--no-progress", "--seq-len", "40"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return F.make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """One `lowrank finetune` of every method on the tiny model; (out dir, stdout)."""
    out = tmp_path_factory.mktemp("ft") / "out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["finetune", "--model", str(tiny), "--out", str(out), *FAST])
    assert code == 0
    return out, buf.getvalue()


def test_finetune_every_method(run, tiny):
    out, text = run
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["full", "lora", "vera", "qlora"]
    model = F.tiny_llama()[0]
    total = sum(p.numel() for p in model.parameters())
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    expect = {
        "full": sum(m.weight.numel() for m in linears),
        "lora": sum(16 * (m.in_features + m.out_features) for m in linears),
        "vera": sum(256 + m.out_features for m in linears),  # d: [r], b: [out] per layer
    }
    for method, r in results["methods"].items():
        assert r["total"] == total
        assert len(r["losses"]) == 3 and all(math.isfinite(v) and v > 0 for v in r["losses"])
        assert r["peak_bytes"] > 0 and r["seconds_per_step"] > 0 and r["tokens_per_s"] > 0
        assert 0 <= r["em_after"] <= 100
        saved = Path(r["adapter_dir"])
        assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
        assert r["adapter_bytes"] == sum(f.stat().st_size for f in saved.iterdir())
        if method in expect:
            assert r["trainable"] == expect[method], method
    assert results["methods"]["qlora"]["trainable"] == expect["lora"]
    # Between steps full fine-tuning holds the most: its dense delta and its optimizer state, three
    # times the linear weights. (A step's own growth is not compared: at this size VeRA's r=256
    # activations outweigh the tiny layers they adapt, as they do not on SmolLM2.)
    held = {m: r["held_bytes"] for m, r in results["methods"].items()}
    assert held["full"] > 3 * 4 * expect["full"] and held["full"] == max(held.values())
    # A step's growth is read as the rise of the process's resident high-water mark: in a long-lived
    # process (this whole test session) a tiny model's step can be served entirely from memory glibc
    # already holds, so it may read 0 (seen once in CI, after fp32 products moved to oneDNN's GEMM).
    assert all(r["peak_bytes"] >= r["held_bytes"] for r in results["methods"].values())
    assert {t["target"].split()[0] for t in results["targets"]} >= {"lora", "vera", "qlora", "some"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # The table, the targets and the demo were printed.
    for word in ("trainable", "peak memory", "exact match", "held-out questions", "mixed batch", "qlora"):
        assert word in text, word
    demo = results["demo"]
    assert set(demo["answers"]) == {"base", "full", "lora", "vera", "qlora"}
    assert [row["adapter"] for row in demo["mixed_batch"]] == ["__base__", "lora", "vera", "qlora"]


def test_saved_adapters_reload_and_demo_answers_match(run, tiny):
    """The answers the demo printed for an adapter are what that adapter, loaded anew, answers."""
    from lowrank.finetune import model as M
    from lowrank.finetune import train as T

    out, _ = run
    results = json.loads((out / "results.json").read_text())
    base, tok, _ = M.load(str(tiny))
    demo = results["demo"]
    lowrank.load_adapter(base, out / "lora", adapter_name="lora")
    # the demo's own call: the same prompts in one batch, as many new tokens as it allowed
    longest = max(len(tok(" " + e, add_special_tokens=False).input_ids) for e in demo["expected"]) + 2
    assert T.answers(base, tok, demo["questions"], longest, "cpu") == demo["answers"]["lora"]
    with lowrank.disable_adapters(base):
        assert T.answers(base, tok, demo["questions"], longest, "cpu") == demo["answers"]["base"]


def test_generate_mixed_and_single(run, tiny, capsys):
    out, _ = run
    args = ["generate", "--model", str(tiny), "--adapter", f"lora={out / 'lora'}", "--adapter", str(out / "vera"),
            "--max-new-tokens", "4"]  # fmt: skip
    assert main([*args, "--use", "lora,vera,__base__", "Question: a?\\nAnswer:", "b", "c"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines if line.startswith("[")] == ["[lora", "[vera", "[__base__"]
    assert "Question: a?" in lines[0]
    assert main([*args, "one prompt"]) == 0  # one prompt: the first adapter
    assert capsys.readouterr().out.startswith("[lora] one prompt")


def test_gguf_model_through_the_cli(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    gguf = F.write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    code = main(["finetune", "--model", str(gguf), "--method", "lora", "--out", str(out), "--no-demo", *FAST])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "tiny.gguf" and list(results["methods"]) == ["lora"]
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1


def _bad(tmp_path, tiny) -> list[tuple[list[str], str]]:
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    a_file = tmp_path / "file"
    a_file.write_text("x")
    return [
        (["finetune", "--steps", "0"], "--steps"),
        (["finetune", "--steps", "many"], "--steps"),
        (["finetune", "--method", "lora,adam"], "--method"),
        (["finetune", "--lr", "-1"], "--lr"),
        (["finetune", "--alpha", "nan"], "--alpha"),
        (["finetune", "--dtype", "fp8"], "--dtype"),
        (["finetune", "--model", str(tmp_path / "missing")], "--model"),
        (["finetune", "--model", str(a_file)], "--model"),
        (["finetune", "--model", str(tiny), "--data", str(tmp_path / "missing.jsonl")], "--data"),
        (["finetune", "--model", str(tiny), "--data", str(bad_jsonl)], "bad.jsonl:2"),
        (["finetune", "--model", str(tiny), "--out", str(a_file)], "--out"),
        (["generate", "--model", str(tiny), "--adapter", str(tmp_path / "nope"), "p"], "--adapter"),
        (["generate", "--model", str(tiny), "--use", "x", "p"], "--use"),
        (["generate", "--model", str(tiny), "--adapter", f"a={tmp_path}", "p"], "adapter_model.safetensors"),
        (["bench", "--shape", "5x"], "--shape"),
        (["nonsense"], "invalid choice"),
    ] + ([(["finetune", "--device", "cuda"], "--device")] if not torch.cuda.is_available() else [])


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors (through lowrank's one-line parser)
        return e.code


def test_bad_arguments_and_files_are_one_line(tmp_path, tiny, capsys):
    for argv, needle in _bad(tmp_path, tiny):
        code = _exit_code(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lowrank"), (argv, err)
        assert needle in lines[0], (argv, lines[0])
        assert "Traceback" not in err


def test_cli_as_a_process(tmp_path):
    """`python -m lowrank` is the console script's entry too; a bad file is one line on stderr, status 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-m", "lowrank", "finetune", "--data", str(tmp_path / "none.txt"), "--model",
                        str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    help_text = subprocess.run([sys.executable, "-m", "lowrank", "finetune", "--help"], capture_output=True, text=True,
                               env=env, cwd=tmp_path).stdout  # fmt: skip
    for option in ("--model", "--data", "--r", "--alpha", "--steps", "--lr", "--batch-size", "--seq-len", "--seed",
                   "--out", "--device", "--dtype", "--threads", "--quick", "--method"):  # fmt: skip
        assert option in help_text, option


def test_import_lowrank_stays_light():
    code = ("import sys, lowrank, lowrank.finetune; heavy = [m for m in ('transformers', 'gguf', 'matplotlib', 'rich',"
            " 'peft', 'bitsandbytes') if m in sys.modules]; print(heavy); assert not heavy")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO.parent)
    assert p.returncode == 0, p.stdout + p.stderr


def test_own_data_files_and_bf16(tiny, tmp_path):
    """--data as JSONL (exact match scored) and as text (loss only; the demo continues half lines),
    and a bf16 base."""
    rows = [{"prompt": f"Question: What is {a} plus {b}?\nAnswer:", "completion": f" {a + b}"}
            for a in range(3) for b in range(3)]  # fmt: skip
    jsonl = tmp_path / "sums.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = tmp_path / "lines.txt"
    text.write_text("".join(f"line {i} of the text says {i * i}\n" for i in range(8)))
    for data, extra in ((jsonl, ["--dtype", "bf16"]), (text, [])):
        out = tmp_path / data.stem
        argv = ["finetune", "--model", str(tiny), "--data", str(data), "--method", "lora,qlora", "--out", str(out),
                "--steps", "2", "--batch-size", "4", "--no-progress", *extra]  # fmt: skip
        assert main(argv) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["eval_examples"] == max(1, (9 if data == jsonl else 8) // 5)
        scored = data == jsonl
        assert (results["methods"]["lora"]["em_after"] is not None) == scored
        assert (results["base"]["exact_match"] is not None) == scored
        assert results["demo"]["answers"].keys() == {"base", "lora", "qlora"}
        assert all(row["prompt"] for row in results["demo"]["mixed_batch"])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_training_loss_is_the_sdpa_unfused_loss(method, monkeypatch):
    """The training loss runs attention on lowrank's kernel (the right-padded batch's mask as key ranges),
    the RMSNorms on lowrank.rms_norm and the MLPs' SiLU products on lowrank.silu_mul, and fuses the head
    with the loss: it is the loss, and gives the gradients, of the padding-masked decoder under SDPA with
    transformers' norms and MLPs and the head and the loss unfused."""
    import torch.nn.functional as Fn

    from lowrank.finetune import data as D
    from lowrank.finetune import train as T

    base, tok = F.tiny_llama()
    s = T.Settings(r=4)
    enc = T.encode(tok, D.builtin().train[:12], 40)
    ids, attn, target = T.collate(enc, list(range(12)), tok.pad_token_id, "cpu")
    assert (attn == 0).any() and (attn[:, 0] == 1).all()  # padding that a mask would matter for
    torch.manual_seed(3)
    model = T.build(method, base, s).train()
    assert model.config._attn_implementation == "lowrank"
    assert lowrank.norm.fast_norms(model) == 2 * model.config.num_hidden_layers + 1  # every RMSNorm
    assert lowrank.swiglu.fast_swiglus(model) == model.config.num_hidden_layers  # every MLP
    params = [p for _, p in lowrank.adapter_parameters(model, method)]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # B is zero at init: make the adapter matter
    used = []
    original = lowrank.attention.attention_forward
    monkeypatch.setattr(lowrank.attention, "attention_forward", lambda *a: used.append(a[-1]) or original(*a))
    loss = T.completion_loss(model, ids, attn, target)
    ranges = torch.stack([torch.zeros_like(attn[:, 0]), attn.sum(1)], 1)
    assert used and all(torch.equal(r, ranges) for r in used)  # on the kernel, as key ranges
    got = torch.autograd.grad(loss, params)
    lowrank.fast_attention(model, enabled=False)
    lowrank.fast_norm(model, enabled=False)
    lowrank.fast_swiglu(model, enabled=False)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
    sel = target[:, 1:]
    logits = model.get_output_embeddings()(hidden[:, :-1][sel]).float()
    want = Fn.cross_entropy(logits, ids[:, 1:][sel])
    expected = torch.autograd.grad(want, params)
    # fp32 sums in other orders (attention's, the head's): worst seen 1.2e-7 of the loss, 2.3e-6 of a
    # gradient's largest entry
    assert abs(loss.item() - want.item()) <= 2.0**-20 * abs(want.item())
    for g, e in zip(got, expected):
        assert (g - e).abs().max() <= 2.0**-16 * e.abs().max()


def test_amp_trains_each_forward_under_autocast(tiny, tmp_path, monkeypatch):
    """--dtype amp: fp32 weights (the adapters saved in fp32), every training forward under
    torch.autocast(bf16), the held-out loss outside it; each method's loss falls as in fp32."""
    from lowrank.finetune import train as T

    seen = []
    original = T.completion_loss

    def spy(model, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(T, "completion_loss", spy)
    out = tmp_path / "amp"
    argv = ["finetune", "--model", str(tiny), "--method", "full,lora,qlora", "--out", str(out), "--dtype", "amp",
            "--no-demo", *FAST]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert "amp" in results["settings"]
    steps = 3
    assert seen.count(True) == 3 * steps and seen.count(False) > 0  # training forwards; held-out losses
    for method in ("full", "lora", "qlora"):
        r = results["methods"][method]
        assert all(math.isfinite(v) for v in r["losses"]) and r["losses"][-1] < r["losses"][0], (method, r["losses"])
        _, saved = lowrank.read_adapter(out / method)
        assert saved and all(t.dtype == torch.float32 for t in saved.values()), method
