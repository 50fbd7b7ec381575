"""Reference outputs for src/identity/augment.rs (tests/augment.rs).

The published StableIdentity dataset (datasets_face/face_id.py) jitters the PIL photo with
torchvision's ColorJitter, converts it to [-1, 1], flips, crops 3/4 of it at random and resizes
back, shrinks and pastes it on black, and reduces the masks to the latent size; every resize is
`F.interpolate(mode="bicubic", align_corners=True)`. This script records, with torch 2.15,
torchvision 0.29 and Pillow 13:
  bicubic.safetensors  F.interpolate bicubic on random images (align_corners True and False),
                       up- and down-sampling, square and not
  jitter.safetensors   torchvision's adjust_brightness / contrast / saturation / hue on a PIL
  jitter.json          image (u8) for given factors; the json names each output and its factor
  chain.safetensors    the published chain written out with fixed draws on a 64x64 photo, and
  chain.json           the unaugmented sample (scaling and mask reduction only)
all under tests/fixtures/augment/.
"""
import json

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from common import FIXTURES, save_tensors, seed

OUT = FIXTURES / "augment"

# (name, channels, input (h, w), output (h, w), align_corners)
BICUBIC_CASES = [
    ("up_ac", 2, (40, 40), (64, 64), True),
    ("up", 2, (40, 40), (64, 64), False),
    ("down_ac", 1, (96, 96), (20, 20), True),
    ("down", 1, (96, 96), (20, 20), False),
    ("odd_ac", 2, (30, 50), (17, 71), True),
    ("odd", 2, (30, 50), (17, 71), False),
]

JITTER_OPS = {
    "brightness": TF.adjust_brightness,
    "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation,
    "hue": TF.adjust_hue,
}
# The training ranges' ends and inner points; large hue shifts exercise the wrap-around.
JITTER_FACTORS = {
    "brightness": [0.8, 0.93, 1.2],
    "contrast": [0.8, 1.07, 1.2],
    "saturation": [0.8, 0.9, 1.2],
    "hue": [-0.01, -0.004, 0.003, 0.01, 0.3, -0.45],
}

# Fixed draws for the chain on a 64x64 photo: crop 48 = 64 - 64 // 4, latent 8x8.
CHAIN = {
    "size": 64,
    "order": ["saturation", "brightness", "hue", "contrast"],
    "brightness": 1.13,
    "contrast": 0.85,
    "saturation": 1.1,
    "hue": -0.007,
    "flip": True,
    "crop_top": 5,
    "crop_left": 11,
    "paste_height": 45,
    "paste_width": 47,
    "paste_top": 7,
    "paste_left": 3,
}


def bicubic(x, size, align_corners):
    return F.interpolate(x.unsqueeze(0), size=size, mode="bicubic", align_corners=align_corners)[0]


def test_photo(size):
    """A smooth colour photo with a grey ramp, pure colours and clipped values mixed in."""
    g = torch.Generator().manual_seed(7)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([0.5 + 0.4 * torch.sin(6 * x + 1), 0.5 + 0.4 * torch.cos(5 * y), 0.3 + 0.6 * x * y])
    img = (base + 0.15 * torch.rand(3, size, size, generator=g)).clamp(0, 1)
    img = (img * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    img[0, :, :] = torch.arange(size, dtype=torch.uint8)[:, None] * (255 // (size - 1))  # greys
    img[1, :8] = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                               [0, 255, 255], [255, 0, 255], [0, 0, 0], [255, 255, 255]], dtype=torch.uint8)
    return img


def masks(size):
    """Face: an ellipse; hair: a band above it."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    c = size / 2
    face = (((x - c) / (0.3 * size)) ** 2 + ((y - 1.1 * c) / (0.38 * size)) ** 2 <= 1).float()
    hair = ((y < 0.4 * size) & (y > 0.1 * size) & (x > 0.2 * size) & (x < 0.85 * size)).float() * (1 - face)
    return face[None], hair[None]


def make_bicubic():
    out = {}
    for name, c, src, dst, ac in BICUBIC_CASES:
        x = torch.rand(c, *src)
        out[f"{name}.input"] = x
        out[f"{name}.output"] = bicubic(x, dst, ac)
    save_tensors(OUT / "bicubic.safetensors", out)


def make_jitter():
    g = torch.Generator().manual_seed(11)
    img = torch.randint(0, 256, (48, 48, 3), generator=g, dtype=torch.uint8)
    img[:12] = test_photo(48)[:12]
    pil = Image.fromarray(img.numpy(), "RGB")
    tensors, cases = {"input": img}, []
    for op, factors in JITTER_FACTORS.items():
        for i, factor in enumerate(factors):
            key = f"{op}_{i}"
            tensors[key] = torch.from_numpy(np.array(JITTER_OPS[op](pil, factor)))
            cases.append({"key": key, "op": op, "factor": factor})
    save_tensors(OUT / "jitter.safetensors", tensors)
    (OUT / "jitter.json").write_text(json.dumps(cases, indent=1) + "\n")


def make_chain():
    p = CHAIN
    size, latent, crop = p["size"], p["size"] // 8, p["size"] - p["size"] // 4
    photo = test_photo(size)
    face, hair = masks(size)

    def reduce(m):
        m = bicubic(m, (latent, latent), True)
        return (m >= 0.5).float()

    def to_unit(pil):
        return TF.normalize(TF.to_tensor(pil), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    pil = Image.fromarray(photo.numpy(), "RGB")
    plain = to_unit(pil)
    for op in p["order"]:
        pil = JITTER_OPS[op](pil, p[op])
    img = to_unit(pil)
    f, h = face, hair
    if p["flip"]:
        img, f, h = TF.hflip(img), TF.hflip(f), TF.hflip(h)
    t, l = p["crop_top"], p["crop_left"]
    img, f, h = (bicubic(z[:, t:t + crop, l:l + crop], (size, size), True) for z in (img, f, h))
    rh, rw, pt, pl = p["paste_height"], p["paste_width"], p["paste_top"], p["paste_left"]
    canvas, fc, hc = -torch.ones_like(img), torch.zeros_like(f), torch.zeros_like(h)
    canvas[:, pt:pt + rh, pl:pl + rw] = bicubic(img, (rh, rw), True)
    fc[:, pt:pt + rh, pl:pl + rw] = bicubic(f, (rh, rw), True)
    hc[:, pt:pt + rh, pl:pl + rw] = bicubic(h, (rh, rw), True)
    save_tensors(OUT / "chain.safetensors", {
        "photo": photo, "face_mask": face[0], "hair_mask": hair[0],
        "image": canvas, "face_mask_full": fc, "hair_mask_full": hc,
        "face_mask_latent": reduce(fc), "hair_mask_latent": reduce(hc),
        "plain.image": plain, "plain.face_mask": reduce(face), "plain.hair_mask": reduce(hair),
    })
    (OUT / "chain.json").write_text(json.dumps(p, indent=1) + "\n")


def main():
    seed(0)
    make_bicubic()
    make_jitter()
    make_chain()


if __name__ == "__main__":
    main()
