"""Explanation-method benchmark: salient side by side with pytorch-grad-cam (grad-cam 1.5.7), CPU, 2 threads.

1. Forward limit: plain inference images/s at the best batch size, fp32 and bf16 (both channels_last, as
   the engine runs them), 224 px.
2. Score-CAM masked passes/s and efficiency = masked passes/s / forward limit (same model, size, precision).
   Target >= 0.95. Score-CAM runs the model's batch-norm-folded copy (workers/folding.py), so it can pass 1.
3. pytorch-grad-cam ScoreCAM (at its best ``cam.batch_size``) and GradCAM on the same inputs, top-1 and
   top-3 (three calls: its top-1 time is their median, its top-3 time their sum); salient's speedup for
   each, fp32 and bf16. pytorch-grad-cam runs in processes of its own, one as shipped (glibc's default
   malloc) and one with salient's malloc fix, called in turn with salient's runs. salient runs Score-CAM's
   ``logit-softmax`` definition here (pytorch-grad-cam's; all three cost the same).
4. Max abs difference of the maps (salient's scaled to [0, 1] as pytorch-grad-cam scales its own; target
   <= 1e-3) and the bf16-vs-fp32 map correlation and top-1 agreement.
5. Peak RSS of a fresh process running resnet50 Score-CAM (fp32, 224 px) at the default masked batch for 1, 4
   and 16 images (--max-channels 64 keeps it short; the batch, not the channel count, sets the memory).
6. --max-channels: correlation with the full map and speedup (EfficientNet-Lite0, trained weights).
7. The malloc fix (workers/runtime.py): a plain fp32 forward loop in fresh processes with and without it.
8. vit_b_16 (random init, its zero head re-initialised, 224 px): forward limit, Score-CAM masked passes/s
   and efficiency against that limit (its 768 channels are the patch grid's 14×14 maps), and Grad-CAM vs
   pytorch-grad-cam with its ViT ``reshape_transform``. pytorch-grad-cam's Score-CAM on a ViT-B/16 (768
   passes of a 17 GFLOP model, one image at a time) is left out: minutes per call on this CPU.

pytorch-grad-cam upsamples Score-CAM's masks with align_corners=True; it is switched to the paper's and
torchcam's align_corners=False (same kernel, same cost) so the maps can be compared. Its own Score-CAM
takes minutes per image on resnet50 at 224 px, so resnet50's Score-CAM comparison runs at 112 px.
Models are random-init except EfficientNet-Lite0 (bundled ImageNet weights); inputs are scikit-image's
sample photos. Timings on a shared machine are noisy: each figure is a median of rounds run side by side.

    .venv/bin/python bench/methods.py                 # ~30 min (the vit_b_16 section adds ~5-8)
    .venv/bin/python bench/methods.py --quick         # smoke run, resnet18 at 64 px (~1 min)
    .venv/bin/python bench/methods.py --vit-only --repeats 1 --vit-channels 256   # reduced ViT part (~5 min)
    python bench/methods.py --device cuda             # on a GPU: all three models at 224 px (~3 min on an H200)

On a GPU the same figures are measured on the device (forward limit at batch 64-1024; pytorch-grad-cam in
its own process on the same GPU); the RSS and malloc probes are CPU matters and are left out.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Score-CAM prints a progress bar per image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

THREADS = 2
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
DEVICE = torch.device("cpu")  # --device


@dataclass(frozen=True)
class Plan:
    """What one model is measured on: the Score-CAM comparison's input size and number of images."""

    model: str
    size: int = 224
    images: int = 1


FULL = (Plan("resnet18", 224, 2), Plan("efficientnet_lite0", 224, 1), Plan("resnet50", 112, 1))
QUICK = (Plan("resnet18", 64, 1),)
# A GPU runs pytorch-grad-cam's resnet50 Score-CAM at 224 px in seconds, and needs many images to fill
# salient's masked batches.
FULL_CUDA = (Plan("resnet18", 224, 16), Plan("efficientnet_lite0", 224, 8), Plan("resnet50", 224, 8))


def sync() -> None:
    """Wait for the GPU's queued work, so that a clock read after it counts that work."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def seconds(fn: Callable[[], object]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def clocked(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result). CPU time is the steadier of the two while
    other processes compete for the cores."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def photos(model, n: int, size: int) -> Tensor:
    """n×3×size×size normalised inputs from scikit-image's sample photos."""
    import skimage.data

    from salient_maps.workers.images import to_input

    return torch.stack([to_input(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])(), size, model.mean, model.std)
                        for i in range(n)])


def bench_model(name: str):
    """``load_model(name)``; a torchvision ViT's zero-initialised head (which makes every gradient zero) is
    re-initialised, normal with std 0.02, seeded, so both processes of a comparison hold the same network."""
    from salient_maps.workers.models import load_model

    loaded = load_model(name)
    heads = getattr(loaded.module, "heads", None)
    if heads is not None and hasattr(heads, "head"):
        torch.manual_seed(1)
        with torch.no_grad():
            heads.head.weight.normal_(0, 0.02)
    return loaded


def autocast(precision: str):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def engine_layout(precision: str) -> torch.memory_format:
    """The memory format salient's engine runs the model in (workers/engine.py)."""
    return torch.channels_last if DEVICE.type == "cpu" or precision != "fp32" else torch.contiguous_format


def forward_limit(module: nn.Module, size: int, precision: str, batch_sizes: tuple[int, ...],
                  repeats: int) -> dict:
    """Plain inference images/s at each batch size (median of ``repeats`` rounds in which the batch sizes
    take turns, so all see the same background load) and the best of them."""
    layout = engine_layout(precision)
    module = module.to(DEVICE, memory_format=layout)
    inputs = {b: torch.randn(b, 3, size, size, device=DEVICE).contiguous(memory_format=layout) for b in batch_sizes}
    runs: dict[int, list[float]] = {b: [] for b in batch_sizes}
    with torch.inference_mode(), autocast(precision):
        for x in inputs.values():
            module(x)
        for _ in range(repeats):
            for b, x in inputs.items():
                runs[b].append(seconds(lambda: module(x)))
    rates = {b: b / statistics.median(r) for b, r in runs.items()}
    best = max(rates, key=rates.get)
    return {"images_per_s": rates[best], "batch": best, "by_batch": rates}


def warm_up(module: nn.Module, batch: int, size: int, precision: str) -> None:
    """One plain forward at this shape (in the module's own memory format)."""
    conv_weight = next(p for p in module.parameters() if p.dim() == 4)
    channels_last = conv_weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.zeros(batch, 3, size, size, device=next(module.parameters()).device)
    with torch.inference_mode(), autocast(precision):
        module(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


def plain_forward_seconds(module: nn.Module, batch: Tensor, precision: str,
                          at_least: float = 1.0) -> tuple[float, float]:
    """(wall, CPU) seconds per image of plain inference on ``batch``, over calls lasting ``at_least`` seconds."""
    wall = cpu = 0.0
    images = 0
    with torch.inference_mode(), autocast(precision):
        while wall < at_least:
            w, c, _ = clocked(lambda: module(batch))
            wall, cpu, images = wall + w, cpu + c, images + len(batch)
    return wall / images, cpu / images


def nonconstant_channels(module: nn.Module, layer: nn.Module, x: Tensor) -> int:
    """Masked passes Score-CAM makes for x: the (image, channel) pairs whose map is not constant."""
    captured = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.inference_mode():
        module(x.to(next(module.parameters()).device))
    handle.remove()
    flat = captured[0].flatten(2)
    return int((flat.amax(-1) > flat.amin(-1)).sum())


def correlation(a: Tensor, b: Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def min_map_correlation(a: Tensor, b: Tensor) -> float:
    """Smallest correlation between corresponding B×K maps (a constant map correlates as 1 with itself)."""
    worst = 1.0
    for u, v in zip(a.flatten(0, 1), b.flatten(0, 1)):
        if u.std() == 0 or v.std() == 0:
            worst = min(worst, 1.0 if torch.equal(u, v) else 0.0)
        else:
            worst = min(worst, correlation(u, v))
    return worst


def align_corners_false_upsampling() -> None:
    """pytorch-grad-cam's Score-CAM builds its masks with UpsamplingBilinear2d (align_corners=True)."""
    torch.nn.UpsamplingBilinear2d = lambda size: nn.Upsample(size=size, mode="bilinear", align_corners=False)


class Competitor:
    """pytorch-grad-cam in a process of its own, as its users run it: the model in its default memory
    format with weights that take gradients, and glibc's default malloc (or, with ``malloc_fix``, ours),
    so that salient's allocator setting is not lent to it."""

    def __init__(self, malloc_fix: bool):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_competitor_loop, args=(child, malloc_fix, str(DEVICE)), daemon=True)
        self.process.start()
        # Its start-up (imports) must not overlap a measurement: it takes a core for seconds.
        self._ask(("ping",))

    def setup(self, model: str, method: str, x: Tensor, batch: int | None) -> None:
        """Load ``model`` and build its ``method`` ("scorecam"/"gradcam") CAM for inputs ``x``."""
        self._ask(("setup", model, method, x, batch))

    def explain(self, classes: Tensor) -> tuple[float, Tensor]:
        """(seconds, B×H×W maps) of one call explaining class ``classes[b]`` of each image b."""
        return self._ask(("explain", classes))

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()

    def _ask(self, message: tuple):
        self.conn.send(message)
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply


def _competitor_loop(conn, malloc_fix: bool, device: str) -> None:
    global DEVICE
    from pytorch_grad_cam import GradCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from salient_maps.workers.models import resolve_layer
    from salient_maps.workers.runtime import keep_freed_memory

    torch.set_num_threads(THREADS)
    DEVICE = torch.device(device)
    if malloc_fix:
        keep_freed_memory()
    align_corners_false_upsampling()
    cam, x = None, None
    while (message := conn.recv()) is not None:
        try:
            if message[0] == "ping":
                conn.send(None)
            elif message[0] == "setup":
                _, model, method, x, batch = message
                loaded = bench_model(model)
                module = loaded.module.requires_grad_(method == "gradcam").to(DEVICE)
                x = x.to(DEVICE)
                layer = resolve_layer(loaded, None)
                layout = loaded.layout(layer)
                cam = (ScoreCAM if method == "scorecam" else GradCAM)(
                    model=module, target_layers=[module.get_submodule(layer)],
                    reshape_transform=None if layout.kind == "nchw" else _reshape_transform(layout))
                if batch:
                    cam.batch_size = batch
                    warm_up(module, batch, x.shape[-1], "fp32")
                conn.send(None)
            else:
                targets = [ClassifierOutputTarget(int(c)) for c in message[1]]
                wall, _, maps = clocked(lambda: cam(input_tensor=x, targets=targets))
                conn.send((wall, torch.from_numpy(maps)))
        except Exception as exc:  # the parent re-raises it
            conn.send(exc)


def _reshape_transform(layout) -> Callable[[Tensor], Tensor]:
    """pytorch-grad-cam's reshape transforms (its ViT and Swin tutorials) for a token or channel-last layer."""
    import math

    def tokens(tensor: Tensor) -> Tensor:
        side = math.isqrt(tensor.shape[1] - layout.prefix_tokens)
        grid = tensor[:, layout.prefix_tokens:, :].reshape(tensor.size(0), side, side, tensor.size(2))
        return grid.transpose(2, 3).transpose(1, 2)

    return tokens if layout.kind == "tokens" else (lambda tensor: tensor.permute(0, 3, 1, 2))


def best_competitor_batch(competitor: Competitor, model: str, size: int, candidates: tuple[int, ...]) -> dict:
    """The ``cam.batch_size`` at which pytorch-grad-cam's Score-CAM explains one photo's top class fastest."""
    loaded = bench_model(model)
    x = photos(loaded, 1, size)
    with torch.inference_mode():
        classes = loaded.module(x).argmax(1)
    timings = {}
    for batch in candidates:
        competitor.setup(model, "scorecam", x, batch)
        timings[batch] = competitor.explain(classes)[0]
    return {"batch": min(timings, key=timings.get), "seconds_by_batch": timings}


def compare(model: str, method: str, size: int, n_images: int, competitors: dict[str, Competitor],
            competitor_batch: int | None, repeats: int, limits: dict | None) -> dict:
    """salient vs pytorch-grad-cam for one method ("scorecam" or "gradcam") on one model, side by side:
    each round runs salient (every precision, top-1 and top-3), the plain forward (for the efficiency) and
    one call of each competitor process (class rank 1, 2, 3 in turn)."""
    from salient_maps.workers.engine import Explainer
    from salient_maps.workers.methods.base import scale_to_unit
    from salient_maps.workers.methods.gradcam import GradCAM
    from salient_maps.workers.methods.scorecam import ScoreCAM
    from salient_maps.workers.models import resolve_layer
    from salient_maps.workers.targets import Targets

    loaded = bench_model(model)
    layer_name = resolve_layer(loaded, None)
    x = photos(loaded, n_images, size)
    precisions = ("fp32", "bf16") if method == "scorecam" else ("fp32",)

    def ours():
        return ScoreCAM("logit-softmax") if method == "scorecam" else GradCAM()

    # A model per precision: the engine may lay out its weights differently for each (CUDA: NCHW in fp32).
    models = {p: copy.deepcopy(loaded) for p in precisions}
    explainers = {(p, k): Explainer(models[p], layer_name, [ours()], Targets(topk=k), device=str(DEVICE), precision=p)
                  for p in precisions for k in (1, 3)}
    if method == "scorecam":  # oneDNN and cuDNN pick their kernels for a shape on first sight: not timed
        for p in precisions:
            batch = ours().batch_size_for((size, size), 2 if p == "bf16" else 4, DEVICE)
            warm_up(models[p].module, batch, size, p)
    for competitor in competitors.values():
        competitor.setup(model, method, x, competitor_batch)
    times: dict[tuple, list[float]] = {key: [] for key in explainers}
    cpu_times: dict[tuple, list[float]] = {key: [] for key in explainers}
    # The forward limit again, in the same rounds: the efficiency compares neighbours in time.
    plain = {p: torch.randn(limits[p]["batch"], 3, size, size, device=DEVICE).contiguous(
        memory_format=engine_layout(p)) for p in precisions} if limits else {}
    plain_times: dict[str, list[tuple[float, float]]] = {p: [] for p in plain}
    their_times: dict[str, list[float]] = {name: [] for name in competitors}
    their_maps: list[Tensor] = []
    results = {}
    for round_ in range(max(repeats, 3)):  # three competitor calls: class ranks 1, 2, 3
        if round_ < repeats:
            for key, explainer in explainers.items():
                wall, cpu, results[key] = clocked(lambda: explainer.explain(x))
                times[key].append(wall)
                cpu_times[key].append(cpu)
            for p, batch in plain.items():
                plain_times[p].append(plain_forward_seconds(models[p].module, batch, p))
        for name, competitor in competitors.items():
            wall, maps = competitor.explain(results[("fp32", 3)].targets[:, round_].cpu())
            their_times[name].append(wall)
            if name == "as_shipped":
                their_maps.append(maps)

    ours_maps = {p: results[(p, 3)].outputs[method].maps.cpu() for p in precisions}
    median = {key: statistics.median(v) for key, v in times.items()}
    theirs = {name: {"top1": statistics.median(t), "top3": sum(t)} for name, t in their_times.items()}
    figures = {
        "input": size, "images": n_images, "competitor_batch": competitor_batch, "pytorch_grad_cam_s": theirs,
        "max_abs_diff_vs_pytorch_grad_cam": max(
            float((scale_to_unit(ours_maps["fp32"][:, k]) - their_maps[k]).abs().max()) for k in range(3)),
    }
    for p in precisions:
        figures[p] = {
            "salient_s": {"top1": median[(p, 1)], "top3": median[(p, 3)]},
            "speedup": {name: {k: t[k] / median[(p, 1 if k == "top1" else 3)] for k in ("top1", "top3")}
                        for name, t in theirs.items()},
        }
    if method == "scorecam":
        passes = nonconstant_channels(loaded.module, loaded.module.get_submodule(layer_name), x)
        figures["masked_passes"] = passes
        for p in precisions:
            figures[p]["masked_passes_per_s"] = passes / median[(p, 1)]
            per_image = statistics.median(w for w, _ in plain_times[p])
            cpu_per_image = statistics.median(c for _, c in plain_times[p])
            figures[p]["forward_limit_in_rounds"] = 1 / per_image
            figures[p]["efficiency"] = per_image * passes / median[(p, 1)]
            figures[p]["cpu_efficiency"] = cpu_per_image * passes / statistics.median(cpu_times[(p, 1)])
        figures["bf16_vs_fp32"] = {
            "min_map_correlation": min_map_correlation(ours_maps["fp32"], ours_maps["bf16"]),
            "same_top1": bool(torch.equal(results[("fp32", 1)].targets, results[("bf16", 1)].targets)),
        }
        figures["_maps_fp32_top1"] = results[("fp32", 1)].outputs[method].maps.cpu()
        figures["_seconds_fp32_top1"] = median[("fp32", 1)]
        figures["_inputs"] = x
    return figures


def vit_figures(repeats: int, channels: int | None, competitors: dict[str, "Competitor"], log) -> dict:
    """vit_b_16 at 224 px: forward limit (fp32, bf16), Score-CAM efficiency against it (top-1, one photo;
    ``channels``: only that many channels of largest variance, i.e. that many masked passes), and Grad-CAM
    against pytorch-grad-cam with its reshape transform (fp32, 8 photos)."""
    from salient_maps.workers.engine import Explainer
    from salient_maps.workers.methods.scorecam import ScoreCAM
    from salient_maps.workers.models import resolve_layer
    from salient_maps.workers.targets import Targets

    name, size = "vit_b_16", 224
    loaded = bench_model(name)
    layer = resolve_layer(loaded, None)
    figures: dict = {"layer": layer, "layout": loaded.layout(layer).params(), "max_channels": channels}
    limits = {p: forward_limit(loaded.module, size, p, (16, 32, 64), repeats) for p in ("fp32", "bf16")}
    figures["forward_limit"] = limits
    for p, f in limits.items():
        log(f"forward limit {name} {size}px {p}: {f['images_per_s']:.1f} img/s at batch {f['batch']}")
    x = photos(loaded, 1, size)
    for p in ("fp32", "bf16"):
        model = copy.deepcopy(loaded)
        method = ScoreCAM("logit-softmax", max_channels=channels)
        explainer = Explainer(model, layer, [method], Targets(topk=1), device=str(DEVICE), precision=p)
        warm_up(model.module, method.batch_size_for((size, size), 2 if p == "bf16" else 4, DEVICE), size, p)
        plain = torch.randn(limits[p]["batch"], 3, size, size, device=DEVICE).contiguous(
            memory_format=engine_layout(p))
        walls, plains = [], []
        for _ in range(repeats):
            walls.append(seconds(lambda: explainer.explain(x)))
            plains.append(plain_forward_seconds(model.module, plain, p)[0])
        acts = explainer._forward(x)[0].activations.detach()  # B×C×h×w, as the methods see it
        flat = acts.flatten(2)
        passes = min(int((flat.amax(-1) > flat.amin(-1)).sum()), channels or acts.shape[1])
        wall, per_image = statistics.median(walls), statistics.median(plains)
        figures[f"scorecam_{p}"] = {"masked_passes": passes, "seconds": wall, "masked_passes_per_s": passes / wall,
                                    "forward_limit_in_rounds": 1 / per_image, "efficiency": per_image * passes / wall}
        f = figures[f"scorecam_{p}"]
        log(f"Score-CAM {name} {size}px {p}: {passes} masked passes in {wall:.1f}s, {f['masked_passes_per_s']:.1f}/s,"
            f" forward limit {f['forward_limit_in_rounds']:.1f}/s, efficiency {f['efficiency']:.3f}")
    gc = compare(name, "gradcam", size, 8, competitors, None, repeats, None)
    figures["gradcam"] = gc
    log(f"Grad-CAM {name} {size}px fp32 (8 images): " + speedups(gc["fp32"])
        + f"; max |ours - theirs| {gc['max_abs_diff_vs_pytorch_grad_cam']:.2e}")
    return figures


def max_channels_fidelity(model: str, full_maps: Tensor, full_seconds: float, x: Tensor,
                          counts: tuple[int, ...], repeats: int) -> dict:
    from salient_maps.workers.engine import Explainer
    from salient_maps.workers.methods.scorecam import ScoreCAM
    from salient_maps.workers.models import load_model, resolve_layer
    from salient_maps.workers.targets import Targets

    loaded = load_model(model)
    layer = resolve_layer(loaded, None)
    out = {}
    for n in counts:
        explainer = Explainer(loaded, layer, [ScoreCAM("logit-softmax", max_channels=n)], Targets(topk=1),
                              device=str(DEVICE))
        result = explainer.explain(x)  # first sight of the last, partial masked batch's shape
        runs = [seconds(lambda: explainer.explain(x)) for _ in range(repeats)]
        out[n] = {"min_map_correlation": min_map_correlation(result.outputs["scorecam"].maps.cpu(), full_maps),
                  "speedup": full_seconds / statistics.median(runs)}
    return out


# ----- probes: fresh processes, so that peak RSS and malloc settings are their own -----

def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (ru_maxrss would also count the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_rss(images: int, max_channels: int) -> dict:
    from salient_maps.workers.engine import Explainer
    from salient_maps.workers.methods.scorecam import ScoreCAM
    from salient_maps.workers.models import load_model, resolve_layer
    from salient_maps.workers.targets import Targets

    loaded = load_model("resnet50")
    method = ScoreCAM(max_channels=max_channels)
    explainer = Explainer(loaded, resolve_layer(loaded, None), [method], Targets(topk=3), device="cpu")
    explainer.explain(torch.randn(images, 3, 224, 224))
    return {"peak_rss_mb": peak_rss_mb(),
            "masked_batch": method.batch_size_for((224, 224), 4), "images": images,
            "masked_passes": images * max_channels}


def probe_malloc(fixed: bool, seconds_: float) -> dict:
    import torchvision

    from salient_maps.workers.runtime import keep_freed_memory

    if fixed:
        keep_freed_memory()
    torch.manual_seed(0)
    module = torchvision.models.resnet18().eval().requires_grad_(False).to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        module(x)
        before, start, n = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
        while time.perf_counter() - start < seconds_:
            module(x)
            n += len(x)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"images_per_s": n / wall, "user_ms_per_image": 1000 * (after.ru_utime - before.ru_utime) / n,
            "sys_ms_per_image": 1000 * (after.ru_stime - before.ru_stime) / n,
            "page_faults_per_image": (after.ru_minflt - before.ru_minflt) / n}


def run_probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def malloc_effect(rounds: int, seconds_: float) -> dict:
    runs = {"off": [], "on": []}
    for _ in range(rounds):  # alternate, so both see the same background load
        for state in runs:
            runs[state].append(run_probe("malloc", state, str(seconds_)))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    return {**med, "speedup": med["on"]["images_per_s"] / med["off"]["images_per_s"],
            "cpu_time_ratio": (med["off"]["user_ms_per_image"] + med["off"]["sys_ms_per_image"])
            / (med["on"]["user_ms_per_image"] + med["on"]["sys_ms_per_image"])}


def speedups(figures: dict) -> str:
    s = figures["speedup"]
    return "speedup vs pytorch-grad-cam " + ", ".join(
        f"{name.replace('_', ' ')}: top-1 {v['top1']:.2f}x top-3 {v['top3']:.2f}x" for name, v in s.items())


def rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {str(k): rounded(v) for k, v in value.items() if not str(k).startswith("_")}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet18 at 64 px, one round, no probes")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per figure (default 3; 1 with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (on a GPU: bf16 and fp32 on the device; "
                        "no RSS or malloc probes)")
    parser.add_argument("--vit-only", action="store_true", help="only the vit_b_16 figures (section 8)")
    parser.add_argument("--vit-channels", type=int, default=None,
                        help="ViT Score-CAM: only this many channels (masked passes; default all 768)")
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    gpu = DEVICE.type == "cuda"
    torch.set_num_threads(THREADS)
    if args.probe:
        kind, *rest = args.probe
        if kind == "rss":
            result = probe_rss(int(rest[0]), int(rest[1]))
        else:
            result = probe_malloc(rest[0] == "on", float(rest[1]))
        print(json.dumps(result))
        return

    from salient_maps.workers.models import load_model
    from salient_maps.workers.runtime import keep_freed_memory

    keep_freed_memory()  # salient's engine does this itself; done here too for the forward-limit loops
    competitors = {"as_shipped": Competitor(malloc_fix=False)}
    if not gpu:  # the allocator setting matters to CPU kernels only
        competitors["with_malloc_fix"] = Competitor(malloc_fix=True)
    repeats = args.repeats or (1 if args.quick else 3)
    plans = QUICK if args.quick else FULL_CUDA if gpu else FULL
    batch_sizes = (64,) if args.quick else (64, 256, 1024) if gpu else (32, 64, 128)
    started = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(DEVICE) if gpu else f"cpu, {THREADS} threads",
                    "threads": THREADS, "repeats": repeats, "torch": torch.__version__}

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {text}", flush=True)

    if args.vit_only:
        report["vit_b_16"] = vit_figures(repeats, args.vit_channels, competitors, log)
        for competitor in competitors.values():
            competitor.close()
        report["seconds"] = time.perf_counter() - started
        print(json.dumps(rounded(report)))
        return

    limits = {}
    for plan in plans:
        module = load_model(plan.model).module
        sizes = sorted({224 if not args.quick else plan.size, plan.size})
        limits[plan.model] = {s: {p: forward_limit(module, s, p, batch_sizes, repeats) for p in ("fp32", "bf16")}
                              for s in sizes}
        for s, by_precision in limits[plan.model].items():
            for p, f in by_precision.items():
                log(f"forward limit {plan.model} {s}px {p}: {f['images_per_s']:.1f} img/s at batch {f['batch']}")
    report["forward_limit"] = limits

    candidates = (64,) if args.quick else (32, 128, 512) if gpu else (16, 64, 128)
    probe = best_competitor_batch(competitors["as_shipped"], plans[0].model, plans[0].size, candidates)
    competitor_batch = probe["batch"]
    report["pytorch_grad_cam_scorecam_batch"] = probe
    log(f"pytorch-grad-cam ScoreCAM best cam.batch_size {competitor_batch} ({probe['seconds_by_batch']})")

    report["scorecam"], report["gradcam"] = {}, {}
    for plan in plans:
        sc = compare(plan.model, "scorecam", plan.size, plan.images, competitors, competitor_batch, repeats,
                     limits[plan.model][plan.size])
        report["scorecam"][plan.model] = sc
        for p in ("fp32", "bf16"):
            f = sc[p]
            log(f"Score-CAM {plan.model} {sc['input']}px {p}: {f['masked_passes_per_s']:.1f} masked passes/s, "
                f"forward limit {f['forward_limit_in_rounds']:.1f}/s "
                f"at batch {limits[plan.model][plan.size][p]['batch']}"
                f", efficiency {f['efficiency']:.3f} (CPU time {f['cpu_efficiency']:.3f}); "
                f"{1000 * f['salient_s']['top1'] / plan.images:.1f} ms per image; " + speedups(f))
        log(f"Score-CAM {plan.model}: max |ours - theirs| {sc['max_abs_diff_vs_pytorch_grad_cam']:.2e}, "
            f"bf16 vs fp32 min corr {sc['bf16_vs_fp32']['min_map_correlation']:.4f}, "
            f"same top-1 {sc['bf16_vs_fp32']['same_top1']}")
        gc = compare(plan.model, "gradcam", plan.size if args.quick else 224,
                     1 if args.quick else 32 if gpu else 8, competitors, None, repeats, None)
        report["gradcam"][plan.model] = gc
        log(f"Grad-CAM {plan.model} {gc['input']}px fp32 ({gc['images']} images): " + speedups(gc["fp32"])
            + f"; max |ours - theirs| {gc['max_abs_diff_vs_pytorch_grad_cam']:.2e}")

    fidelity_plan = next((p for p in plans if p.model == "efficientnet_lite0"), plans[0])
    sc = report["scorecam"][fidelity_plan.model]
    counts = (16,) if args.quick else (64, 256)
    report["max_channels"] = {"model": fidelity_plan.model, **max_channels_fidelity(
        fidelity_plan.model, sc["_maps_fp32_top1"], sc["_seconds_fp32_top1"], sc["_inputs"], counts, repeats)}
    for n in counts:
        f = report["max_channels"][n]
        log(f"--max-channels {n} on {fidelity_plan.model}: min map correlation with full "
            f"{f['min_map_correlation']:.3f}, speedup {f['speedup']:.1f}x")

    if not args.quick:
        report["vit_b_16"] = vit_figures(repeats, args.vit_channels, competitors, log)

    if gpu:
        report["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(DEVICE) / 2**20
        log(f"peak GPU memory (all runs): {report['peak_gpu_memory_mb']:.0f} MB")
    elif not args.quick:
        report["peak_rss_resnet50_scorecam"] = [run_probe("rss", str(n), "64") for n in (1, 4, 16)]
        for r in report["peak_rss_resnet50_scorecam"]:
            log(f"peak RSS resnet50 Score-CAM fp32, {r['images']} image(s), masked batch {r['masked_batch']}, "
                f"{r['masked_passes']} passes: {r['peak_rss_mb']:.0f} MB")
        report["malloc_fix"] = malloc_effect(3, 8.0)
        m = report["malloc_fix"]
        cpu = {s: m[s]["user_ms_per_image"] + m[s]["sys_ms_per_image"] for s in ("off", "on")}
        log(f"malloc fix, resnet18 fp32 forward: {m['off']['images_per_s']:.1f} -> {m['on']['images_per_s']:.1f} "
            f"img/s ({m['speedup']:.2f}x); CPU ms/image {cpu['off']:.1f} -> {cpu['on']:.1f}; page faults/image "
            f"{m['off']['page_faults_per_image']:.0f} -> {m['on']['page_faults_per_image']:.0f}")
    for competitor in competitors.values():
        competitor.close()
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(rounded(report)))


if __name__ == "__main__":
    main()
