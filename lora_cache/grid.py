"""One picture of an IMAGE batch with each image's label written under it."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import LoraCacheError

PAD = 4


def split_labels(text: str) -> list[str]:
    """The labels one a line (the sweep node's labels output)."""
    return text.split("\n") if text else []


def columns_for(n: int, columns: int) -> int:
    # One row reads best for a short sweep; a longer one goes square-ish.
    if columns > 0:
        return min(columns, n)
    return n if n <= 8 else math.ceil(math.sqrt(n))


def labelled_grid(images: torch.Tensor, labels: list[str], columns: int = 0) -> torch.Tensor:
    """images [B, H, W, C] in 0..1 -> [1, H', W', C]: the images in rows of `columns` (0: auto),
    each with its label on a strip under it."""
    if images.ndim != 4:
        raise LoraCacheError(f"LoRA Cache Grid: expected an IMAGE batch [B, H, W, C], got shape {tuple(images.shape)}")
    n, h, w, c = images.shape
    if len(labels) != n:
        raise LoraCacheError(f"LoRA Cache Grid: {n} images but {len(labels)} labels ({labels}); connect the "
                             f"sweep's labels and the images it sampled")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = math.ceil(max((probe.textbbox((0, 0), lab or " ", font=font)[3] for lab in labels), default=0))
    strip = text_h + 2 * PAD
    cols = columns_for(n, columns)
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    pixels = (images.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        img = pixels[i]
        if c == 1:
            img = np.repeat(img, 3, axis=2)
        sheet.paste(Image.fromarray(img[..., :3]), (col * w, r * (h + strip)))
        text = labels[i]
        tw = draw.textlength(text, font=font)
        draw.text((col * w + max(0.0, (w - tw) / 2), r * (h + strip) + h + PAD), text, fill="black", font=font)
    out = torch.from_numpy(np.asarray(sheet).astype(np.float32) / 255.0)
    return out.unsqueeze(0)
