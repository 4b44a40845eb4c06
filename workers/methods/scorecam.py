from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..folding import for_plain_passes
from .base import ForwardPass, Method, MethodOutput, cam_output, compute_dtype

WEIGHT_DEFINITIONS = ("probability", "logit-softmax", "cic-softmax")
# Memory one masked image costs in flight, in bytes per input pixel per byte of the element type:
# its input plus the few largest activations alive at once (measured: resnet50, 224 px, fp32, 64
# masked images per forward, ~27 MB each, i.e. ~130).
_BYTES_PER_PIXEL_BYTE = 128
_MAX_AUTO_BATCH = {"cpu": 256, "cuda": 1024}


class ScoreCAM(Method):
    """Score-CAM (Wang et al. 2020): each channel of the target layer, upsampled and min-max scaled
    to [0, 1], masks the input; the class score of the masked image weights that channel.

    ``scorecam_weights`` picks the published definition of the weight of channel c:
    ``probability`` (the paper's code) softmax probability of the class on the masked image;
    ``logit-softmax`` (pytorch-grad-cam, torchcam) softmax over channels of the class logit;
    ``cic-softmax`` softmax over channels of (masked probability - clean image's probability).
    ``max_channels`` keeps only the N channels of largest spatial variance ("Faster Score-CAM").

    Cost: one forward per (image, non-constant channel), streamed through the model (its copy with
    batch norms folded into the convolutions where that is faster, workers/folding.py) in batches of
    ``masked_batch`` masked images (if None, as many as ``memory_budget_mb`` holds: 62 fp32 or 125
    bf16 at 224 px; on a 2-core CPU larger batches than ~64 gain little and smaller ones lose up to
    20 %; on a GPU as many as a quarter of its free memory holds, up to 1024, where an H200 reaches
    its forward limit); every target class of an image is read off the same passes, so top-3 costs
    what top-1 costs.
    Masks are upsampled with align_corners=False (the paper's code, torchcam; pytorch-grad-cam uses True).
    """

    name = "scorecam"

    def __init__(self, scorecam_weights: str = "probability", max_channels: int | None = None,
                 masked_batch: int | None = None, memory_budget_mb: int = 1536):
        if scorecam_weights not in WEIGHT_DEFINITIONS:
            raise ValueError(f"scorecam_weights must be one of {', '.join(WEIGHT_DEFINITIONS)}, "
                             f"not {scorecam_weights!r}")
        if max_channels is not None and max_channels < 1:
            raise ValueError("max_channels must be at least 1")
        if masked_batch is not None and masked_batch < 1:
            raise ValueError("masked_batch must be at least 1")
        self.weights = scorecam_weights
        self.max_channels = max_channels
        self.masked_batch = masked_batch
        self.memory_budget_mb = memory_budget_mb

    def params(self) -> dict:
        return {"weights": self.weights, "max_channels": self.max_channels}

    def batch_size_for(self, input_size: tuple[int, int], element_bytes: int,
                       device: torch.device = torch.device("cpu")) -> int:
        """Masked images per forward: the fixed ``masked_batch``, or as many as the budget holds. On a
        GPU the budget is at least a quarter of its free memory: a GPU needs far larger batches than a
        CPU to reach its forward limit, and it holds nothing else of ours."""
        if self.masked_batch is not None:
            return self.masked_batch
        budget = self.memory_budget_mb << 20
        if device.type == "cuda":
            # What PyTorch's allocator holds in reserve is free to us too: without it the batch would
            # shrink (and change shape) as the cache grows.
            free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
                - torch.cuda.memory_allocated(device)
            budget = max(budget, free // 4)
        per_image = _BYTES_PER_PIXEL_BYTE * element_bytes * input_size[0] * input_size[1]
        return max(1, min(_MAX_AUTO_BATCH.get(device.type, _MAX_AUTO_BATCH["cpu"]), budget // per_image))

    def explain(self, fp: ForwardPass) -> MethodOutput:
        with torch.inference_mode():
            acts = self._kept_channels(fp.layer_output.detach().float())  # B×C'×h×w
            scores = self._masked_scores(fp, acts)  # B×C'×K
            weights = self._channel_weights(scores)  # B×C'×K
            cam = torch.einsum("bck,bchw->bkhw", weights, acts)
            return cam_output(cam, fp.input_size)

    def _kept_channels(self, acts: Tensor) -> Tensor:
        """B×C×h×w -> B×C'×h×w: all channels, or the ``max_channels`` of largest spatial variance."""
        if self.max_channels is None or self.max_channels >= acts.shape[1]:
            return acts
        variance = acts.flatten(2).var(dim=-1, correction=0)
        keep = variance.topk(self.max_channels, dim=1).indices
        return acts.gather(1, keep[:, :, None, None].expand(-1, -1, *acts.shape[-2:]))

    def _masked_scores(self, fp: ForwardPass, acts: Tensor) -> Tensor:
        """B×C'×K score of each target class on the image masked by each channel (the logit for
        ``logit-softmax``, else the probability). A constant channel's mask is all zeros, so its
        masked image is the zero image whatever the input: it costs no pass of its own."""
        b, c, k = acts.shape[0], acts.shape[1], fp.targets.shape[1]
        size = fp.input_size
        lo, hi = upsampled_range(acts, size)
        flat = acts.flatten(2)
        # Exact test on the small map: resizing a constant map can wobble by a rounding error.
        varies = (flat.amax(-1) > flat.amin(-1)) & (hi > lo)  # B×C'
        # Bilinear weights sum to one, so scaling the small map scales its upsampled version alike.
        unit = torch.where(varies, 1 / (hi - lo), 0.0)[..., None, None] * (acts - lo[..., None, None])
        rows = varies.nonzero()  # R×2 (image, channel); the one host sync per batch
        x = fp.x.detach()
        dtype = compute_dtype(fp.autocast, x)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        batch = self.batch_size_for(size, torch.finfo(dtype).bits // 8, x.device)
        masked = torch.empty((min(batch, max(len(rows), 1)), *x.shape[1:]), dtype=dtype, device=x.device,
                             memory_format=layout)
        row_scores = torch.empty(len(rows), k, device=x.device)
        model = for_plain_passes(fp.model, x.device, dtype)
        for start in range(0, len(rows), batch):
            image, channel = rows[start:start + batch].unbind(1)
            n = len(image)
            masks = F.interpolate(unit[image, channel].unsqueeze(1), size=size, mode="bilinear", align_corners=False)
            torch.mul(x.index_select(0, image), masks, out=masked[:n])
            with fp.autocast():
                logits = model(masked[:n])
            row_scores[start:start + n] = self._class_scores(logits, fp.targets.index_select(0, image))
        scores = torch.empty(b, c, k, device=x.device)
        scores[rows[:, 0], rows[:, 1]] = row_scores
        constant = ~varies
        if constant.any():
            scores[constant] = self._constant_channel_scores(fp, model, acts, constant, masked[:1])[constant]
        return scores

    def _constant_channel_scores(self, fp: ForwardPass, model: torch.nn.Module, acts: Tensor, constant: Tensor,
                                 buffer: Tensor) -> Tensor:
        """B×C'×K scores standing in for the constant channels (the rows ``constant`` marks).

        A constant channel adds (its weight × its value) everywhere. If every constant channel is
        zero that is nothing, and the scores only need to keep those channels out of the weights;
        otherwise they are the zero image's real scores (one extra single-image pass)."""
        b, c = constant.shape
        if not (acts[..., 0, 0][constant] != 0).any():
            fill = 0.0 if self.weights == "probability" else torch.finfo(torch.float32).min
            return torch.full((b, c, fp.targets.shape[1]), fill, device=acts.device)
        buffer.zero_()
        with fp.autocast():
            logits = model(buffer).expand(b, -1)
        return self._class_scores(logits, fp.targets).unsqueeze(1).expand(-1, c, -1)

    def _class_scores(self, logits: Tensor, targets: Tensor) -> Tensor:
        """n×N logits, n×K class ids -> n×K float32 scores."""
        logits = logits.float()
        if self.weights == "logit-softmax":
            return logits.gather(1, targets)
        return logits.softmax(dim=1).gather(1, targets)

    def _channel_weights(self, scores: Tensor) -> Tensor:
        """B×C'×K masked-image scores -> B×C'×K channel weights, as the chosen definition says.

        ``cic-softmax`` subtracts the clean image's probability before the softmax; that shifts every
        channel of an (image, class) by the same amount, which a softmax over channels ignores."""
        if self.weights == "probability":
            return scores
        return scores.softmax(dim=1)


def upsampled_range(maps: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Min and max of each B×C×h×w map bilinearly resized to ``size`` (align_corners=False), without
    resizing it: B×C each.

    Along one axis the resized map is linear between two neighbouring input pixels, so along that
    axis its extremes lie at the first or last output pixel that falls between the same two inputs.
    Sampling only those rows and columns (about 2h × 2w values instead of H × W) finds them."""
    rows, cols = (_interpolation_weights(n, m, maps.device) for n, m in zip(maps.shape[-2:], size))
    rows, cols = rows[_cell_ends(rows)], cols[_cell_ends(cols)]
    sampled = (rows @ maps.float() @ cols.T).flatten(2)
    return sampled.amin(-1), sampled.amax(-1)


def _interpolation_weights(src: int, dst: int, device: torch.device) -> Tensor:
    """dst×src matrix: row i holds the weights F.interpolate's bilinear resize gives output i."""
    eye = torch.eye(src, device=device).view(src, 1, src, 1)
    return F.interpolate(eye, size=(dst, 1), mode="bilinear", align_corners=False).view(src, dst).T


def _cell_ends(weights: Tensor) -> Tensor:
    """Indices of the outputs that start or end a run reading the same pair of inputs."""
    cell = (weights > 0).int().argmax(dim=1)  # the lower input of each output's pair
    change = cell[1:] != cell[:-1]
    edge = torch.ones(1, dtype=torch.bool, device=weights.device)
    return (torch.cat([edge, change]) | torch.cat([change, edge])).nonzero().squeeze(1)
