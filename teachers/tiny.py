"""Tiny random teacher checkpoints written locally, for CPU tests and the demo (nothing is downloaded).

- `write_tiny_vggt`: VGGT with the tiny-a sizes of `shared/reference/vggt/tiny-a` (written here, not
  read from there: users may not have it), random but for two output rows. Field of view: a random
  camera head can output a zero field of view through VGGT's ReLU (an infinite focal length, which
  the store refuses), so the field-of-view rows of the pose branch's last layer are shrunk and their
  bias set so that the fields of view stay near `TINY_FOV` radians while still varying with the
  image. Depth: a random DPT head outputs an almost constant depth (log-depth varies by 0.3% over an
  image, nothing for a student to learn or for a constant predictor to lose to), so its log-depth
  row is scaled by `DEPTH_GAIN` (as a trained model's, depth then varies by tens of percent over an
  image) and its bias set so that a grey probe image has mean depth 1 (VGGT's normalised scene scale).
- `write_tiny_da3_metric`: DA3-Metric (GeoVR's scale teacher) treated alike, calibrated on the frames
  it is given (rendered rooms in the demo): its depth varies over an image, its mean is a room's size
  in metres at the tiny teacher's focal length, and about a tenth of the pixels are sky, so that every
  clip gets a valid scale (about 2.5 metres per VGGT unit) from GeoVR's chain.
- `write_tiny_depth_anything`: Depth Anything V2 Metric through transformers (the named option).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from geovr.teacher_cache.config import to_dict
from geovr.teachers.da3_metric import (
    CHECKPOINT_PREFIX,
    SKY_THRESHOLD,
    DA3MetricConfig,
    DepthAnything3Metric,
    exact_quantile,
)
from geovr.teachers.vggt import VGGT, VGGTConfig

TINY_FOV = 1.2  # radians, the tiny teacher's fields of view (about 69 degrees)
DEPTH_GAIN = 100.0  # the tiny teacher's log-depth row: a per-image std of about 0.35 (random init: 0.003)


def write_tiny_vggt(out: str | Path, seed: int = 0, fov: float = TINY_FOV) -> Path:
    """A random VGGT with the tiny-a sizes (camera and depth heads) as a checkpoint directory.

    config.json + model.safetensors, loadable with `VGGT.from_pretrained(out)`; the same seed
    writes the same weights. Two output rows are rescaled (module docstring): the fields of view
    stay near `fov` radians, and the depth varies over the image around a mean of about 1.
    """
    cfg = VGGTConfig.tiny()
    torch.manual_seed(seed)
    model = VGGT(cfg, heads=cfg.heads).eval()
    with torch.no_grad():
        # pose_enc = [translation (3), quaternion (4), fields of view (2)]: rows 7 and 8. The head
        # adds the branch's output once per refinement iteration, so a bias of fov / iterations sums to fov.
        pose_out = model.camera_head.pose_branch.fc2
        pose_out.weight[7:9] *= 0.1
        pose_out.bias[7:9] = fov / model.camera_head.num_iterations
        # Output channel 0 of the DPT head is log-depth; channel 1 the confidence.
        depth_out = model.depth_head.scratch.output_conv2[-1]
        depth_out.weight[0] *= DEPTH_GAIN
        depth_out.bias[0] = 0.0
        probe = torch.full((1, 2, 3, 4 * cfg.patch_size, 4 * cfg.patch_size), 0.5)
        depth_out.bias[0] = -model(probe)["depth"].log().mean()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    return out


def write_tiny_da3_metric(
    out: str | Path,
    probe: np.ndarray,
    seed: int = 0,
    depth_mean: float = 12.0,
    depth_gain: float = 20.0,
    sky_fraction: float = 0.1,
) -> Path:
    """Write a tiny random DA3-Metric checkpoint directory (the reference's tiny sizes) in the Hub layout.

    PyTorch's default initialisation (seeded; the global random state is left as it was), a random
    position embedding, and the last convolution of each branch set so that the outputs vary over an
    image as a trained model's do rather than being nearly constant: the depth branch's weights are
    multiplied by `depth_gain` and its bias set so that the probe has mean canonical depth
    `depth_mean` (at a focal length of 80 pixels, 12 is 3.2 m: a room); the sky branch's bias is set
    so that `sky_fraction` of the probe's pixels are sky. `probe`: (B, S, H, W, 3) uint8 RGB frames
    of what the model will see (a random network responds to textured rooms quite differently from
    noise), H and W multiples of 14: the demo's and the tests' are rendered synthetic rooms
    (`geovr.corpus.synth.render_probe`). The same `seed` and probe write the same files.

    Returns `out`, which `DepthAnything3Metric.from_pretrained` loads.
    """
    cfg = DA3MetricConfig(
        embed_dim=64,
        depth=4,
        num_heads=4,
        out_layers=(0, 1, 2, 3),
        dpt_features=32,
        dpt_out_channels=(16, 32, 64, 64),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnything3Metric(cfg)
        encoder = model.backbone["pretrained"]
        nn.init.trunc_normal_(encoder.pos_embed, std=0.02)
        nn.init.normal_(encoder.cls_token, std=1e-6)
    probe = torch.from_numpy(np.ascontiguousarray(probe)).permute(0, 1, 4, 2, 3).float() / 255.0
    depth_out = model.head.scratch.output_conv2[-1]
    sky_out = model.head.scratch.sky_output_conv2[-1]
    with torch.no_grad():
        depth_out.weight.mul_(depth_gain)
        depth_out.bias.zero_()
        sky_out.bias.fill_(1e3)  # the ReLU passes every logit: the quantile below sees them all
        depth, sky_logit = model.predict(probe)
        depth_out.bias.fill_(math.log(depth_mean) - float(depth.log().mean()))
        sky_out.bias.fill_(1e3 + SKY_THRESHOLD - float(exact_quantile(sky_logit, 1.0 - sky_fraction)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {CHECKPOINT_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n")
    return out


def write_tiny_depth_anything(
    out: str | Path, seed: int = 0, image_size: int = 56, max_depth: int = 20
) -> Path:
    """Write a tiny random Depth Anything V2 Metric model directory for tests (CPU, ~0.2M parameters).

    Same structure as the real checkpoints (DINOv2 backbone, DPT neck, metric head with
    `sigmoid * max_depth`), with small widths and a processor that resizes to `image_size`
    (multiple of 14) instead of 518. Loads with `MetricDepthModel(out)`.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = DepthAnythingConfig(
        backbone_config={
            "model_type": "dinov2",
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "image_size": 518,
            "patch_size": 14,
            "out_indices": [1, 2, 3, 4],
            "reshape_hidden_states": False,
        },
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="metric",
        max_depth=max_depth,
    )
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(config)
    # Random init leaves the last conv near zero (a constant sigmoid(0) * max_depth map); larger
    # head weights give a prediction that varies over the image, as a trained model's does.
    with torch.no_grad():
        for conv in (model.head.conv2, model.head.conv3):
            conv.weight.normal_(0.0, 0.5)
    model.save_pretrained(out)
    processor = DPTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        do_pad=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(out)
    return out
