"""Reference data for photo loading and the face-recognition ViT feature.

Writes
- tests/fixtures/photos/: small real photos (scikit-image's public-domain samples: the NASA
  astronaut portrait, the cat "chelsea", "coffee") in the formats users give: JPEG of several
  sizes, a JPEG whose EXIF orientation says "rotate", 8-bit RGB / grayscale / RGBA PNG and a
  16-bit RGB PNG.
- tests/fixtures/tiny-vit/: a tiny random transformers `ViTModel` (config.json, model.safetensors,
  preprocessor_config.json as google/vit-base-patch16-224-in21k ships it), and in hub-classifier/
  the same weights as a `ViTForImageClassification` PyTorch checkpoint (pytorch_model.bin, names
  prefixed `vit.`, a classifier head), the layout of jayanta/vit-base-patch16-224-in21k-face-recognition.
- tests/fixtures/parity/face_feature.json: for every photo, SHA-256 digests of the file, of PIL's
  512x512 image (`Image.open(...).convert("RGB").resize((512, 512))`, after EXIF transposition)
  and of the 224x224 ViT input levels of both transformers image-processor backends.
- tests/fixtures/parity/face_feature.safetensors: for every photo a strided grid of PIL's 512
  image (to measure a mismatch); for one photo the default processor's full output (as exact uint8
  levels) and the tiny ViT's last_hidden_state on it, plain and horizontally flipped.

Run from the repository root: /work/venv/bin/python tools/reference/face_feature.py
"""
import hashlib
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image, ImageFilter, ImageOps
from safetensors.torch import load_file
from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, PARITY, save_tensors, seed  # noqa: E402

PHOTOS = FIXTURES / "photos"
TINY_VIT = FIXTURES / "tiny-vit"
HUB_CLASSIFIER = TINY_VIT / "hub-classifier"
# The face region StableIdentity crops from the 512 image before the ViT processor.
CROP_BOX = (64, 70, 440, 446)
GRID_STRIDE = 8
# The photo whose full processor output and ViT activations are stored.
PARITY_PHOTO = "chelsea_300x256.png"
# What google/vit-base-patch16-224-in21k (and the face-recognition fine-tune) ship.
PREPROCESSOR_CONFIG = {
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": 224,
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_png16(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL cannot write one), rows filtered with 'Up' to keep it small."""
    h, w, _ = rgb16.shape
    rows = rgb16.astype(">u2").reshape(h, -1).view(np.uint8)
    up = np.vstack([rows[:1], (rows[1:].astype(np.int16) - rows[:-1]) % 256]).astype(np.uint8)
    raw = b"".join(b"\x02" + r.tobytes() for r in up)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    )


def write_photos() -> list[str]:
    if PHOTOS.exists():
        shutil.rmtree(PHOTOS)
    PHOTOS.mkdir(parents=True)
    astronaut = Image.fromarray(skimage.data.astronaut())
    chelsea = Image.fromarray(skimage.data.chelsea())
    coffee = Image.fromarray(skimage.data.coffee())

    portrait = astronaut.resize((300, 400))
    portrait.save(PHOTOS / "astronaut_300x400.jpg", quality=90)
    astronaut.resize((1024, 768)).save(PHOTOS / "astronaut_1024x768.jpg", quality=75)
    astronaut.save(PHOTOS / "astronaut_512.jpg", quality=85)
    # Stored lying on its side with EXIF orientation 6 ("rotate 90 degrees clockwise to view"),
    # as phone cameras write portraits.
    exif = Image.Exif()
    exif[0x0112] = 6
    portrait.transpose(Image.Transpose.ROTATE_90).save(PHOTOS / "astronaut_exif_rotated.jpg", quality=90, exif=exif)
    # The same portrait as a print workflow's CMYK JPEG and as a palette (8-bit indexed) PNG.
    portrait.convert("CMYK").save(PHOTOS / "astronaut_cmyk_300x400.jpg", quality=90)
    portrait.convert("P", palette=Image.Palette.ADAPTIVE).save(PHOTOS / "astronaut_palette_300x400.png", optimize=True)

    # Lossless ones slightly softened (as a camera's downscale would) to keep the files small.
    soften = ImageFilter.GaussianBlur(1.0)
    chelsea.resize((300, 256)).filter(soften).save(PHOTOS / "chelsea_300x256.png", optimize=True)
    coffee.convert("L").resize((384, 256)).save(PHOTOS / "coffee_gray_384x256.png", optimize=True)
    rgba = chelsea.resize((256, 256)).filter(soften).convert("RGBA")
    alpha = np.tile(np.linspace(40, 255, 256, dtype=np.uint8), (256, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(PHOTOS / "chelsea_rgba_256.png", optimize=True)
    # 16-bit: the low byte (255 - high) makes "take the high byte" and "round v / 257" differ.
    high = np.asarray(coffee.resize((256, 256)).filter(soften)).astype(np.uint16)
    write_png16(PHOTOS / "coffee_rgb16_256.png", high * 256 + (255 - high))
    names = sorted(p.name for p in PHOTOS.iterdir())
    total = sum((PHOTOS / n).stat().st_size for n in names)
    print(f"wrote {len(names)} photos in tests/fixtures/photos ({total // 1024} KiB)")
    return names


def pil_512(path: Path) -> Image.Image:
    """The photo as PIL gives it to StableIdentity, upright, resized with `Image.resize`'s default
    filter (bicubic for RGB)."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    resized = image.resize((512, 512))
    assert np.array_equal(np.asarray(resized), np.asarray(image.resize((512, 512), Image.Resampling.BICUBIC)))
    return resized


def tiny_vit() -> ViTModel:
    """A tiny random ViT; every norm and bias randomised so a swapped or forgotten one shows."""
    seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=224,
        patch_size=16,
        initializer_range=0.2,
    )
    model = ViTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
    if TINY_VIT.exists():
        shutil.rmtree(TINY_VIT)
    model.save_pretrained(TINY_VIT)
    (TINY_VIT / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")

    # The hub face-recognition layout: ViTForImageClassification, `vit.` prefix, no pooler,
    # a classifier head, weights only as a (zip-format) PyTorch pickle.
    HUB_CLASSIFIER.mkdir()
    labels = ["alice", "bob", "carol"]
    classifier_config = ViTConfig(
        **{k: v for k, v in config.to_dict().items() if k not in ("architectures", "id2label", "label2id")},
        architectures=["ViTForImageClassification"],
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    classifier_config.save_pretrained(HUB_CLASSIFIER)
    # Names as saved (transformers 5 renames modules internally and maps back on save).
    saved = load_file(TINY_VIT / "model.safetensors")
    state = {f"vit.{k}": v for k, v in saved.items() if not k.startswith("pooler.")}
    assert "vit.encoder.layer.0.attention.attention.query.weight" in state
    state["classifier.weight"] = 0.2 * torch.randn(len(labels), config.hidden_size)
    state["classifier.bias"] = torch.zeros(len(labels))
    torch.save(state, HUB_CLASSIFIER / "pytorch_model.bin")
    (HUB_CLASSIFIER / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")

    # transformers itself must read the copy as the same encoder.
    probe = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(pixel_values=probe).last_hidden_state
        for cls in (ViTModel, ViTForImageClassification):
            loaded = cls.from_pretrained(HUB_CLASSIFIER).eval()
            encoder = loaded if cls is ViTModel else loaded.vit
            assert torch.equal(encoder(pixel_values=probe).last_hidden_state, expected), cls
    for path in [TINY_VIT / "model.safetensors", HUB_CLASSIFIER / "pytorch_model.bin"]:
        print(f"wrote {path.relative_to(FIXTURES.parent.parent)} ({path.stat().st_size // 1024} KiB)")
    return model


def levels(pixel_values: torch.Tensor) -> torch.Tensor:
    """The uint8 levels x of a processor output (x - 127.5) / 127.5, checked to be exact."""
    x = torch.round(pixel_values * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal((x.float() - 127.5) / 127.5, pixel_values)
    return x


def main() -> None:
    names = write_photos()
    model = tiny_vit()
    default = AutoImageProcessor.from_pretrained(TINY_VIT)
    explicit = ViTImageProcessor.from_pretrained(TINY_VIT)
    assert type(default) is type(explicit) is ViTImageProcessor, type(default)
    pil_backend = ViTImageProcessorPil.from_pretrained(TINY_VIT)

    tensors, metadata = {}, {"processor": f"{type(default).__module__}.{type(default).__name__}"}
    for name in names:
        path = PHOTOS / name
        image = pil_512(path)
        crop = image.crop(CROP_BOX)
        default_out = default(images=crop, return_tensors="pt")["pixel_values"][0]
        default_levels = levels(default_out).permute(1, 2, 0).contiguous().numpy()
        # The PIL backend (transformers 4's ViTImageProcessor, the published implementation's)
        # resizes the crop with PIL's bilinear filter, then rescales and normalises in float.
        pil_levels = np.asarray(crop.resize((224, 224), Image.Resampling.BILINEAR))
        pil_out = pil_backend(images=crop, return_tensors="pt")["pixel_values"][0]
        recon = (torch.from_numpy(pil_levels.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        assert (recon - pil_out).abs().max() < 1e-6
        original = Image.open(path)
        metadata[f"{name}.mode"] = original.mode
        metadata[f"{name}.size"] = f"{original.width}x{original.height}"
        metadata[f"{name}.file_sha256"] = sha256(path.read_bytes())
        metadata[f"{name}.pil512_sha256"] = sha256(np.asarray(image).tobytes())
        metadata[f"{name}.vit_torchvision_sha256"] = sha256(default_levels.tobytes())
        metadata[f"{name}.vit_pil_sha256"] = sha256(pil_levels.tobytes())
        off = GRID_STRIDE // 2
        tensors[f"{name}.pil512_grid"] = torch.from_numpy(
            np.ascontiguousarray(np.asarray(image)[off::GRID_STRIDE, off::GRID_STRIDE])
        )
        if name == PARITY_PHOTO:
            pixel_values = default_out[None]
            flipped = torch.flip(pixel_values, dims=[-1])
            with torch.no_grad():
                hidden = model(pixel_values=pixel_values).last_hidden_state
                hidden_flipped = model(pixel_values=flipped).last_hidden_state
            tensors["vit_input_levels"] = levels(default_out)
            tensors["last_hidden_state"] = hidden
            tensors["last_hidden_state_flipped"] = hidden_flipped
    metadata["parity_photo"] = PARITY_PHOTO
    metadata["grid_stride"] = str(GRID_STRIDE)
    save_tensors(PARITY / "face_feature.safetensors", tensors)
    (PARITY / "face_feature.json").write_text(json.dumps(metadata, indent=1, sort_keys=True) + "\n")
    print("wrote tests/fixtures/parity/face_feature.json")


if __name__ == "__main__":
    main()
