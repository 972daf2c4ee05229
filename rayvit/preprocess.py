"""The one preprocessing path: uint8 image batch -> normalized model input.

Training, evaluation and serving all call ``Preprocessor``; it works on whole
batches as tensor ops on whatever device the batch lives on, so there is no
per-image PIL work in the training loop or the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocessor:
    """Resize to ``image_size`` and normalize; optional train-time augmentation."""

    image_size: int
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    _cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # x_norm = (x/255 - mean)/std = x * scale + shift, one fused multiply-add.
        if device not in self._cache:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._cache[device] = (1.0 / (255.0 * std), -mean / std)
        return self._cache[device]

    def __call__(
        self,
        images: torch.Tensor,
        train: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 -> ``(N, 3, S, S)`` float32, normalized."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected a (N, H, W, 3) uint8 batch, got {tuple(images.shape)} {images.dtype}")
        if train:
            images = random_crop_flip(images, generator)
        # NCHW view of the NHWC batch, i.e. channels-last memory: on the CPU torch
        # resizes uint8 channels-last images with a fast vectorised kernel.
        x = images.permute(0, 3, 1, 2)
        if x.device.type != "cpu":
            x = x.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = resize(x, self.image_size)
        scale, shift = self._affine(x.device)
        x = x.float()
        return x.mul_(scale).add_(shift)

    def processor_config(self) -> dict[str, Any]:
        """The equivalent ``ViTImageProcessor`` settings, for ``preprocessor_config.json``."""
        return {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": 2,  # PIL.Image.BILINEAR, as the tensor path uses
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }

    @classmethod
    def from_processor_config(cls, cfg: dict[str, Any]) -> Preprocessor:
        size = cfg.get("size", {})
        side = int(size.get("height") or size.get("shortest_edge") or 224)
        mean = tuple(float(v) for v in cfg.get("image_mean", DEFAULT_MEAN))
        std = tuple(float(v) for v in cfg.get("image_std", DEFAULT_STD))
        return cls(side, mean, std)  # type: ignore[arg-type]


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, 3, side, side)``, antialiased bilinear: the one resize of
    training, serving and the data pipeline's decode tasks (uint8 in, uint8 out on the CPU)."""
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def resize_uint8(image: np.ndarray, side: int) -> np.ndarray:
    """One ``(H, W, 3)`` uint8 image -> ``(side, side, 3)`` uint8, as ``Preprocessor`` resizes."""
    if image.shape[:2] == (side, side):
        return image
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image)  # torch takes only writable arrays
    x = torch.from_numpy(image)[None].permute(0, 3, 1, 2)
    return resize(x, side)[0].permute(1, 2, 0).contiguous().numpy()


def random_crop_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched random crop (zero padding of 1/8 of the side) and horizontal flip.

    The draws are made on the batch's device (``generator``, if given, must live there too), so
    the host never waits for the device nor copies to it."""
    n, h, w, _ = images.shape
    pad = max(1, h // 8)
    dev = images.device
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]
    cols = ox[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    batch = torch.arange(n, device=dev)[:, None, None]
    return padded[batch, rows, cols]


def to_uint8_array(image: Image.Image) -> np.ndarray:
    """Any PIL image (any mode, EXIF-rotated, animated) -> ``(H, W, 3)`` uint8.

    Serving and offline evaluation both go through here before ``Preprocessor``.
    """
    image.seek(0) if getattr(image, "is_animated", False) else None
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(arr.max()) if arr.size else 0.0
        # 16-bit and 32-bit integers span 0..65535; float images usually 0..1
        top = 65535.0 if peak > 255 else 1.0 if image.mode == "F" and peak <= 1.0 else 255.0
        image = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def preprocess_arrays(
    pre: Preprocessor, arrays: list[np.ndarray], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Preprocess images of possibly different sizes into one model batch.

    Same-size images go through as one batch; others one by one (each is
    resized to ``image_size`` on the device), so results never depend on what
    an image was batched with.
    """
    if not arrays:
        raise ValueError("no images")
    if len({a.shape for a in arrays}) == 1:
        return pre(torch.from_numpy(np.stack(arrays)).to(device))
    return torch.cat([pre(torch.from_numpy(a[None]).to(device)) for a in arrays])
