"""Throughput of course_lib's models against transformers (and timm, where it imports), with the
same architecture, device, dtype, batch and input, in one run: images/s for inference and for a
training step (forward, backward, AdamW), and the ratio course_lib / reference.

    python benchmarks/throughput.py --size cpu                       # small configs, CPU, fp32
    python benchmarks/throughput.py --size full --device cuda --dtype bf16 --compile --channels-last
    python benchmarks/throughput.py --size cpu --models vit swin --check 0.9   # exit 1 if slower than 0.9x

`--size cpu` uses the course's CPU-sized configs (32x32 images); `--size full` the papers' sizes at
224 px (ViT-Ti/S/B/16, Swin-T, ConvNeXt V2-T, MAE ViT-B with its decoder, CLIP ViT-B/16's image
tower). course_lib and transformers share weights (course_lib loads them with `from_hf`); timm
models have their own random weights (same architecture). The implementations are timed in turn,
repeat after repeat, and the median is kept, so that a busy machine slows all of them alike.
For ViT-B/16 training on a GPU the model FLOP utilisation (MFU) is printed: 3x the forward FLOPs
(counted by torch.utils.flop_counter) x images/s / the device's peak bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

from course_lib import clip, convnext, mae, swin, vit
from course_lib.utils import autocast

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense, no sparsity


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _hf_vit(dim, depth, heads, image, patch, mlp=4):
    return transformers.ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                  intermediate_size=mlp * dim, image_size=image, patch_size=patch,
                                  attn_implementation="sdpa")


def build(family: str, size: str) -> tuple[list[Contender], int, str | None]:
    """The contenders for one model family, the image size, and the timm model name (full size)."""
    cpu = size == "cpu"
    if family in ("vit_tiny", "vit_small", "vit_base", "vit"):
        dims = {"vit": (192, 6, 3), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}
        dim, depth, heads = dims[family]
        image, patch = (32, 4) if cpu else (224, 16)
        ref = transformers.ViTModel(_hf_vit(dim, depth, heads, image, patch), add_pooling_layer=False)
        ours = vit.ViT.from_hf(ref)
        timm_name = None if cpu else f"{family}_patch16_224"
        return [Contender("transformers", ref, lambda m, x: m(pixel_values=x).last_hidden_state),
                Contender("course_lib", ours, lambda m, x: m.forward_features(x))], image, timm_name
    if family == "swin_tiny" or family == "swin":
        if cpu:
            cfg = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=4)
        else:
            cfg = transformers.SwinConfig(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
        ref = transformers.SwinModel(cfg, add_pooling_layer=False)
        ours = swin.Swin.from_hf(ref)
        return [Contender("transformers", ref, lambda m, x: m(pixel_values=x).last_hidden_state),
                Contender("course_lib", ours, lambda m, x: m.forward_features(x))], cfg.image_size, None if cpu else "swin_tiny_patch4_window7_224"
    if family in ("convnextv2_tiny", "convnextv2"):
        depths, dims = ([2, 2, 6, 2], [40, 80, 160, 320]) if cpu else ([3, 3, 9, 3], [96, 192, 384, 768])
        ref = transformers.ConvNextV2Model(transformers.ConvNextV2Config(depths=depths, hidden_sizes=dims))
        ours = convnext.ConvNeXt.from_hf(ref)
        return [Contender("transformers", ref, lambda m, x: m(pixel_values=x).pooler_output),
                Contender("course_lib", ours, lambda m, x: m.forward_features(x))], 64 if cpu else 224, None if cpu else "convnextv2_tiny"
    if family in ("mae_base", "mae"):
        if cpu:
            cfg = transformers.ViTMAEConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                                            decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                                            decoder_intermediate_size=512, image_size=32, patch_size=4, attn_implementation="sdpa")
        else:
            cfg = transformers.ViTMAEConfig(attn_implementation="sdpa")  # ViT-B/16 encoder, 8-block 512-wide decoder
        ref = transformers.ViTMAEForPreTraining(cfg)
        ours = mae.MAE.from_hf(ref)
        n = (cfg.image_size // cfg.patch_size) ** 2
        noise = {}

        def same_noise(x):  # both models hide the same 75% of the patches
            if x.shape[0] not in noise:
                noise[x.shape[0]] = torch.rand(x.shape[0], n, generator=torch.Generator().manual_seed(0)).to(x.device)
            return noise[x.shape[0]]

        return [Contender("transformers", ref, lambda m, x: m(pixel_values=x, noise=same_noise(x)).logits),
                Contender("course_lib", ours, lambda m, x: m(x, noise=same_noise(x))[1])], cfg.image_size, None
    if family in ("clip_b16", "clip"):
        vis = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, image_size=32, patch_size=4) if cpu \
            else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16)
        vis["projection_dim"] = vis["hidden_size"] // 2
        text = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vocab_size=100,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
        ref = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vis, text_config=text, projection_dim=vis["hidden_size"] // 2,
                                                             attn_implementation="sdpa"))
        ours = clip.CLIP.from_hf(ref)
        ref_vision = transformers.CLIPVisionModelWithProjection(ref.config.vision_config)
        ref_vision.vision_model.load_state_dict(ref.vision_model.state_dict())
        ref_vision.visual_projection.load_state_dict(ref.visual_projection.state_dict())
        return [Contender("transformers", ref_vision, lambda m, x: m(pixel_values=x).image_embeds),
                Contender("course_lib", _ImageTower(ours), lambda m, x: m(x))], vis["image_size"], None if cpu else "vit_base_patch16_clip_224"
    raise ValueError(f"unknown model family {family!r}")


class _ImageTower(torch.nn.Module):
    """CLIP's image side alone: the vision tower and its projection (what is timed)."""

    def __init__(self, model: clip.CLIP):
        super().__init__()
        self.visual, self.image_proj = model.visual, model.image_proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.visual(images))


def add_timm(contenders: list[Contender], timm_name: str | None) -> None:
    if timm_name is None:
        return
    try:
        import timm
    except Exception:  # timm needs torchvision, which is not always installable beside torch
        return
    model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    contenders.insert(1, Contender("timm", model, lambda m, x: m.forward_features(x)))


def time_contenders(contenders, batch, image, device, dtype, compile_, channels_last, repeats, iters):
    """{name: (inference images/s per round, training images/s per round)}. In each
    round every contender runs `iters` steps in turn (the order rotates from round to round), so
    that a machine busy with something else slows all of them alike."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, image, image, device=device).contiguous(memory_format=fmt)
    use_bf16 = dtype == "bf16"
    jobs = []
    for c in contenders:
        model = c.model.to(device, memory_format=fmt)
        fwd = torch.compile(c.forward) if compile_ else c.forward
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

        def infer(model=model, fwd=fwd):
            model.eval()
            with torch.no_grad(), autocast(device, enabled=use_bf16):
                fwd(model, x)

        def train(model=model, fwd=fwd, opt=opt):
            model.train()
            with autocast(device, enabled=use_bf16):
                loss = fwd(model, x).float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for fn in (infer, train):  # warm up (and compile)
            for _ in range(2):
                fn()
        jobs.append((c.name, (infer, train)))
    samples = {name: ([], []) for name, _ in jobs}
    for r in range(repeats):
        for k in range(2):  # inference, then training
            for j in range(len(jobs)):
                name, fns = jobs[(j + r) % len(jobs)]
                _sync(device)
                start = time.perf_counter()
                for _ in range(iters):
                    fns[k]()
                _sync(device)
                samples[name][k].append(batch * iters / (time.perf_counter() - start))
    return samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_flops(model: torch.nn.Module, forward, image: int, device) -> float:
    """FLOPs of one image's forward pass (a multiply-add counts 2), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, image, image, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(model, x)
    return float(counter.get_total_flops())


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["cpu", "full"], default="cpu")
    p.add_argument("--models", nargs="+", default=None, help="default: vit swin convnextv2 mae clip (cpu) or "
                   "vit_tiny vit_small vit_base swin_tiny convnextv2_tiny mae_base clip_b16 (full)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (CUDA)")
    p.add_argument("--batch", type=int, default=None, help="default: 64 (cpu), 128 (full)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd course_lib and timm")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--check", type=float, default=None, help="exit 1 if course_lib / transformers is below this")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    families = args.models or (["vit", "swin", "convnextv2", "mae", "clip"] if args.size == "cpu" else
                               ["vit_tiny", "vit_small", "vit_base", "swin_tiny", "convnextv2_tiny", "mae_base", "clip_b16"])
    batch = args.batch or (64 if args.size == "cpu" else 128)
    torch.manual_seed(0)
    env = dict(torch=torch.__version__, transformers=transformers.__version__, device=str(device), dtype=args.dtype,
               batch=batch, compile=args.compile, channels_last=args.channels_last, threads=torch.get_num_threads(),
               machine=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
               date=time.strftime("%Y-%m-%d"))
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'model':16s} {'implementation':22s} {'infer img/s':>12s} {'train img/s':>12s} {'infer ratio':>12s} {'train ratio':>12s}")
    results, failures = [], []
    for family in families:
        contenders, image, timm_name = build(family, args.size)
        add_timm(contenders, timm_name)
        if args.compile:
            contenders += [Contender(f"{c.name} compiled", c.model, c.forward) for c in contenders if c.name in ("course_lib", "timm")]
        samples = _time_all(contenders, batch, image, device, args)
        timings = {name: (statistics.median(inf), statistics.median(tr)) for name, (inf, tr) in samples.items()}

        def ratio(name: str, ref: str, k: int) -> float:
            """Median over rounds of the per-round ratio: rounds slowed by other work cancel out."""
            return round(statistics.median(a / b for a, b in zip(samples[name][k], samples[ref][k])), 3)

        for name, (inf, tr) in timings.items():
            row = dict(model=family, implementation=name, infer=round(inf, 1), train=round(tr, 1),
                       infer_vs_transformers=ratio(name, "transformers", 0), train_vs_transformers=ratio(name, "transformers", 1))
            for ref in ("timm", "timm compiled"):
                if name.startswith("course_lib") and ref in timings and (name.endswith("compiled") == ref.endswith("compiled")):
                    row["infer_vs_timm"], row["train_vs_timm"] = ratio(name, ref, 0), ratio(name, ref, 1)
            results.append(row)
            print(f"{family:16s} {name:22s} {inf:12.1f} {tr:12.1f} {row['infer_vs_transformers']:11.2f}x {row['train_vs_transformers']:11.2f}x"
                  + (f"   vs timm: {row['infer_vs_timm']:.2f}x / {row['train_vs_timm']:.2f}x" if "infer_vs_timm" in row else ""))
            if args.check and name == "course_lib" and min(row["infer_vs_transformers"], row["train_vs_transformers"]) < args.check:
                failures.append(f"{family}: course_lib / transformers = {row['infer_vs_transformers']:.2f}x inference, "
                                f"{row['train_vs_transformers']:.2f}x training (< {args.check})")
        if family == "vit_base" and peak_flops(device):
            ours = next(c for c in contenders if c.name == "course_lib")
            flops = forward_flops(ours.model, ours.forward, image, device)
            for row in results:
                if row["model"] == family:
                    row["train_mfu"] = round(3 * flops * row["train"] / peak_flops(device), 4)
                    print(f"  MFU {row['implementation']}: {100 * row['train_mfu']:.1f}% (forward {flops / 1e9:.1f} GFLOPs/image)")
        for c in contenders:
            c.model.to("cpu")
    out = dict(env=env, results=results, failures=failures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if failures:
        print("slower than the reference:\n  " + "\n  ".join(failures))
        raise SystemExit(1)
    return out


def _time_all(contenders, batch, image, device, args):
    """Eager contenders together (interleaved), then compiled ones together; compiled ones are
    compared with each other (the ratio of two compiled rounds), eager ones with eager ones."""
    eager = [c for c in contenders if not c.name.endswith("compiled")]
    compiled = [c for c in contenders if c.name.endswith("compiled")]
    samples = time_contenders(eager, batch, image, device, args.dtype, False, args.channels_last, args.repeats, args.iters)
    if compiled:
        samples.update(time_contenders(compiled, batch, image, device, args.dtype, True, args.channels_last, args.repeats, args.iters))
    return samples


if __name__ == "__main__":
    main()
