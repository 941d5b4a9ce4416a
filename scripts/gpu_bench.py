"""GPU timing table for scripts/gpu_check.sh: LoRALinear vs frozen nn.Linear vs PEFT's LoRA layer,
timed with CUDA events, interleaved, medians. Prints one row per (shape, M, dtype, mode)."""

from __future__ import annotations

import statistics

import torch

import lowrank

try:
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
except Exception:  # PEFT missing: compare with nn.Linear only
    PeftLoraLinear = None


def time_ms(fn, reps: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def make_layers(k: int, n: int, dtype: torch.dtype, r: int = 16):
    base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype).requires_grad_(False)
    ours = lowrank.LoRALinear.from_linear(torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype), r=r, alpha=2 * r)
    ours.weight.data.copy_(base.weight)
    torch.nn.init.normal_(ours.lora_B.weight, std=0.01)
    layers = {"nn.Linear": base, "lowrank": ours}
    if PeftLoraLinear is not None:
        inner = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
        inner.weight.data.copy_(base.weight)
        peft = PeftLoraLinear(inner, "default", r=r, lora_alpha=2 * r).to(device="cuda", dtype=dtype)
        layers["peft"] = peft
    return layers


def main() -> None:
    print(lowrank.info())
    rows = []
    for k, n in [(4096, 4096), (4096, 11008)]:
        for dtype in [torch.bfloat16, torch.float16, torch.float32]:
            layers = make_layers(k, n, dtype)
            for m in [1, 16, 512]:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                xg = x.clone().requires_grad_(True)
                for mode in ["fwd", "fwd+bwd"]:
                    fns = {}
                    for name, layer in layers.items():
                        if mode == "fwd":
                            fns[name] = lambda layer=layer: layer(x)
                        else:
                            fns[name] = lambda layer=layer: layer(xg).sum().backward()
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        for fn in fns.values():
                            fn()
                        samples = {name: [] for name in fns}
                        for _ in range(5):  # interleaved rounds
                            for name, fn in fns.items():
                                samples[name].append(time_ms(fn))
                    med = {name: statistics.median(v) for name, v in samples.items()}
                    rows.append((f"{k}x{n}", m, str(dtype).replace("torch.", ""), mode, med))
    nf4_rows = []
    for k, n in [(4096, 4096), (4096, 11008)]:
        for dtype in [torch.bfloat16, torch.float16]:
            dense32 = torch.nn.Linear(k, n, bias=False, device="cuda").requires_grad_(False)
            q = lowrank.NF4Linear.from_linear(dense32, compute_dtype=dtype)
            dense = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype).requires_grad_(False)
            dense.weight.copy_(dense32.weight)
            for m in [1, 16, 512]:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                with torch.no_grad():
                    fns = {"nn.Linear": lambda: dense(x), "NF4Linear": lambda: q(x)}
                    for fn in fns.values():
                        fn()
                    samples = {name: [] for name in fns}
                    for _ in range(5):
                        for name, fn in fns.items():
                            samples[name].append(time_ms(fn))
                med = {name: statistics.median(v) for name, v in samples.items()}
                nf4_rows.append((f"{k}x{n}", m, str(dtype).replace("torch.", ""), med))
    print()
    print(f"{'shape':<11}{'M':>5} {'dtype':<9}{'nn.Linear':>11}{'NF4Linear':>11}{'vs Linear':>11}")
    for shape, m, dt, med in nf4_rows:
        print(f"{shape:<11}{m:>5} {dt:<9}{med['nn.Linear']:>9.3f}ms{med['NF4Linear']:>9.3f}ms"
              f"{med['nn.Linear'] / med['NF4Linear']:>10.2f}x")
    print()
    print(f"{'shape':<11}{'M':>5} {'dtype':<9}{'mode':<8}{'nn.Linear':>11}{'lowrank':>10}{'peft':>10}{'vs Linear':>11}{'vs peft':>9}")
    for shape, m, dt, mode, med in rows:
        base, ours, peft = med["nn.Linear"], med["lowrank"], med.get("peft", float("nan"))
        print(f"{shape:<11}{m:>5} {dt:<9}{mode:<8}{base:>9.3f}ms{ours:>8.3f}ms{peft:>8.3f}ms{base / ours:>10.2f}x{peft / ours:>8.2f}x")


if __name__ == "__main__":
    main()
