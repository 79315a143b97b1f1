"""Performance promises on the CPU (CI has no GPU):
- course_lib runs about as fast as transformers on the course's small configs, for every family in
  benchmarks/throughput.py, inference and a training step: the ratios are printed, and the test
  fails only on a gross regression (below 0.6x), not on the noise of a shared CPU;
- the speed paths (torch.compile, bf16 autocast, channels-last) give the eager fp32 numbers.

The throughput test runs serially (marker `serial`, after the parallel unit tests), with one
thread, and compares the implementations round by round, so that other load cancels out. A family
below the bar is measured once more, for longer, before the test fails.
"""

import sys
from pathlib import Path

import pytest
import torch

from conftest import report_diff

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402

BAR = 0.6  # a gross regression; ratios between 0.6 and 1 on a busy CPU are machine noise


@pytest.mark.serial
def test_course_lib_is_as_fast_as_transformers_on_cpu(capsys):
    threads = torch.get_num_threads()
    try:
        args = ["--size", "cpu", "--batch", "16", "--threads", "1", "--repeats", "7", "--iters", "1"]
        first = throughput.main(args)
        slow = sorted({r["model"] for r in first["results"] if r["implementation"] == "course_lib"
                       and min(r["infer_vs_transformers"], r["train_vs_transformers"]) < BAR})
        results = [r for r in first["results"] if r["model"] not in slow]
        if slow:
            results += throughput.main([*args[:-4], "--repeats", "15", "--iters", "2", "--models", *slow])["results"]
    finally:
        torch.set_num_threads(threads)
    print(capsys.readouterr().out)  # the table, shown with -s and in the log of a failure
    ours = {r["model"]: r for r in results if r["implementation"] == "course_lib"}
    for model, r in sorted(ours.items()):
        print(f"[throughput] {model}: course_lib / transformers = {r['infer_vs_transformers']:.2f}x inference, "
              f"{r['train_vs_transformers']:.2f}x training (fails below {BAR}x)")
    assert set(ours) == {"vit", "swin", "convnextv2", "mae", "clip"}
    for model, r in ours.items():
        assert r["infer_vs_transformers"] >= BAR and r["train_vs_transformers"] >= BAR, (
            f"{model}: course_lib runs at {r['infer_vs_transformers']:.2f}x (inference) and "
            f"{r['train_vs_transformers']:.2f}x (training) the speed of transformers")


def _tiny_vit():
    from course_lib.vit import ViT, ViTConfig

    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=16, patch_size=4, num_classes=5, dim=32, depth=2, num_heads=2, mlp_ratio=2.0))


def test_bf16_autocast_agrees_with_fp32():
    """bf16 autocast (what the GPU path uses; here on the CPU): logits within bf16's precision."""
    model, x = _tiny_vit().eval(), torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    assert not torch.equal(low, ref), "autocast changed nothing: the bf16 path did not run"
    # bf16 keeps 8 bits of mantissa: ~0.4% relative error per op, a few % through the network
    report_diff("ViT bf16 autocast vs fp32 logits", low, ref, tol=3e-2 * ref.abs().max().item())


def test_channels_last_convnext_agrees_with_contiguous():
    from course_lib.convnext import convnextv2_atto

    torch.manual_seed(0)
    model, x = convnextv2_atto(num_classes=4).eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    report_diff("ConvNeXt V2 channels-last vs contiguous", out, ref, tol=1e-5)


def test_explicit_attention_agrees_with_sdpa():
    from course_lib.layers import use_explicit_attention

    model, x = _tiny_vit().eval(), torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        fused = model(x)
        explicit = use_explicit_attention(model)(x)
    report_diff("ViT explicit softmax attention vs SDPA", explicit, fused, tol=1e-5)


@pytest.mark.slow
def test_compiled_training_step_agrees_with_eager():
    """`fit(compile=True)` trains like eager fp32: same losses and weights after a few steps."""
    from course_lib.train import fit

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 5, (32,), generator=g))
    eager, compiled = _tiny_vit(), _tiny_vit()
    h_eager = fit(eager, data, epochs=1, batch_size=8, progress=False, log_every=1)
    torch._dynamo.reset()
    h_compiled = fit(compiled, data, epochs=1, batch_size=8, progress=False, log_every=1, compile=True)
    report_diff("torch.compile vs eager: training losses", torch.tensor(h_compiled.loss), torch.tensor(h_eager.loss), tol=1e-5)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    report_diff("torch.compile vs eager: weights after 4 steps", flat(compiled), flat(eager), tol=1e-4)


@pytest.mark.slow
def test_fused_adamw_agrees_with_the_loop_implementation():
    """Fused AdamW (one kernel for all parameters; the default on CUDA) trains like the plain one."""
    from course_lib.train import fit

    g = torch.Generator().manual_seed(1)
    data = (torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 5, (32,), generator=g))
    plain, fused = _tiny_vit(), _tiny_vit()
    h_plain = fit(plain, data, epochs=2, batch_size=8, progress=False, log_every=1, fused=False)
    h_fused = fit(fused, data, epochs=2, batch_size=8, progress=False, log_every=1, fused=True)
    report_diff("fused vs for-loop AdamW: training losses", torch.tensor(h_fused.loss), torch.tensor(h_plain.loss), tol=1e-5)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    report_diff("fused vs for-loop AdamW: weights after 8 steps", flat(fused), flat(plain), tol=3e-5)
