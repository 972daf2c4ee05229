"""The one preprocessing path: uint8 image batch -> normalized model input.

Training, evaluation and serving all call ``Preprocessor``; it works on whole
batches as tensor ops on whatever device the batch lives on, so there is no
per-image PIL work in the training loop or the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


#: PIL's resampling codes (``resample`` in a processor config) that the tensor path has.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_PIL_CODE = {name: code for code, name in _RESAMPLE.items()}


@dataclass(frozen=True)
class Preprocessor:
    """Resize, centre-crop to ``image_size`` and normalize; optional train-time augmentation.

    Two resize rules cover the processors of the image classifiers on the hub:

    * ``shortest_edge=False``: every image is resized to ``resize_side`` x ``resize_side``
      (aspect ratio not kept, as ``ViTImageProcessor`` and ``DeiTImageProcessor`` do);
    * ``shortest_edge=True``: the shorter side is resized to ``resize_side`` and the longer one
      in proportion (``int(resize_side * long / short)``, as transformers rounds it).

    Then, when the result is larger than ``image_size``, the centre ``image_size`` square is
    cropped (top/left offset ``(side - image_size) // 2``).
    """

    image_size: int
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    resize_side: int | None = None
    """Side (or shorter side) of the resize before the centre crop; None = ``image_size``."""
    shortest_edge: bool = False
    resample: Literal["bilinear", "bicubic"] = "bilinear"
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

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(H, W)`` after the resize step (before the crop)."""
        side = self.resize_side or self.image_size
        if not self.shortest_edge:
            return side, side
        short, long = min(height, width), max(height, width)
        other = int(side * long / short)
        return (side, other) if height <= width else (other, side)

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
        target = self.resized_shape(int(x.shape[-2]), int(x.shape[-1]))
        if tuple(x.shape[-2:]) != target:
            x = resize(x, target, self.resample)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        s = self.image_size
        if (h, w) != (s, s) and h >= s and w >= s:
            top, left = (h - s) // 2, (w - s) // 2
            x = x[..., top : top + s, left : left + s]
        scale, shift = self._affine(x.device)
        x = x.float()
        if self.resample == "bicubic" and x.device.type != "cpu":
            x = x.clamp_(0.0, 255.0)  # as the uint8 path (and PIL) clamp the cubic's overshoot
        return x.mul_(scale).add_(shift)

    def processor_config(self) -> dict[str, Any]:
        """Settings of a transformers image processor that does the same, for
        ``preprocessor_config.json`` (so ``AutoImageProcessor`` and ``pipeline()`` load it)."""
        side = self.resize_side or self.image_size
        common = {
            "do_resize": True,
            "resample": _PIL_CODE[self.resample],
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }
        crop = {"do_center_crop": True, "crop_size": {"height": self.image_size, "width": self.image_size}}
        if self.shortest_edge:
            return {
                "image_processor_type": "BitImageProcessor",
                "size": {"shortest_edge": side},
                **crop,
                **common,
            }
        if side != self.image_size:
            return {
                "image_processor_type": "DeiTImageProcessor",
                "size": {"height": side, "width": side},
                **crop,
                **common,
            }
        return {
            "image_processor_type": "ViTImageProcessor",
            "size": {"height": side, "width": side},
            **common,
        }

    @classmethod
    def from_processor_config(cls, cfg: dict[str, Any]) -> Preprocessor:
        """The ``Preprocessor`` of a transformers processor config (``preprocessor_config.json``).

        Read: ``size`` (``height``/``width`` or ``shortest_edge``), ``crop_size`` with
        ``do_center_crop``, ConvNeXt's ``crop_pct`` (below 384 px: shortest edge to
        ``shortest_edge / crop_pct``, then a centre crop of ``shortest_edge``; from 384 px: a
        plain resize to ``shortest_edge``), ``resample`` (bicubic, else bilinear),
        ``image_mean``/``image_std`` (0 and 1 when ``do_normalize`` is false). Pixels are
        always rescaled by 1/255.
        """
        size = cfg.get("size") or {}
        crop = cfg.get("crop_size") or {}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        do_crop = bool(cfg.get("do_center_crop")) and bool(crop)
        resample = _RESAMPLE.get(int(cfg.get("resample") or 2), "bilinear")
        if cfg.get("do_normalize", True):
            mean = tuple(float(v) for v in cfg.get("image_mean") or DEFAULT_MEAN)
            std = tuple(float(v) for v in cfg.get("image_std") or DEFAULT_STD)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if "shortest_edge" in size:
            short = int(size["shortest_edge"])
            pct = cfg.get("crop_pct")
            if pct is not None and "height" not in crop:  # ConvNeXt's rule
                if short < 384:
                    return cls(short, mean, std, int(short / float(pct)), True, resample)  # type: ignore[arg-type]
                return cls(short, mean, std, short, False, resample)  # type: ignore[arg-type]
            out = int(crop.get("height", short)) if do_crop else short
            return cls(out, mean, std, short, do_crop, resample)  # type: ignore[arg-type]
        side = int(size.get("height") or 224)
        out = int(crop.get("height", side)) if do_crop else side
        return cls(out, mean, std, side, False, resample)  # type: ignore[arg-type]


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, 3, *size)`` (a side: a square), antialiased bilinear or bicubic:
    the one resize of training, serving and the data pipeline's decode tasks (uint8 in, uint8
    out on the CPU)."""
    hw = (size, size) if isinstance(size, int) else size
    return F.interpolate(x, size=hw, mode=mode, align_corners=False, antialias=True)


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
