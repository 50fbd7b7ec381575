"""Reference data for the evaluation models: CLIP, FaceNet (InceptionResnetV1) with its face crops,
LPIPS, FID's Inception-v3 and the Frechet distance.

Writes
- tests/fixtures/tiny-clip/: a tiny random transformers `CLIPModel` (config.json, model.safetensors)
  with the tiny Stable Diffusion's tokenizer files, so that it loads as a CLIP model folder;
- tests/fixtures/parity/eval_models.safetensors: CLIP's preprocessing of a real photo (openai/CLIP's
  `_transform`: PIL bicubic resize of the short side to 224, centre crop, CLIP mean/std) and the tiny
  model's image and text embeddings; FaceNet's embedding of a real 160x160 face crop; the FaceNet
  input crops facenet-pytorch's `MTCNN(image_size=160, margin=0)` makes of real photos; LPIPS-Alex
  distances between real image crops; pytorch-fid's `InceptionV3` features of real photos of two
  sizes; `calculate_frechet_distance` of fixed features (more samples than dimensions, and fewer);
- assets/lpips_alex.safetensors: the lpips package's v0.1 AlexNet linear heads (BSD-2-Clause,
  assets/LPIPS-LICENSE.txt), the real weights its wheel ships.

FaceNet's, AlexNet's and Inception-v3's layer sizes are fixed by their code, so their weights (23 M,
2.5 M and 24 M values) are not stored: both sides compute them from each tensor's name with
`formula_weights` below, which tests/common/formula_weights.rs reproduces bit for bit.

Run from the repository root: tools/reference/.venv/bin/python tools/reference/eval_models.py
"""
import json
import shutil
import sys
from pathlib import Path

import lpips
import numpy as np
import pytorch_fid.inception as fid_inception
import torch
from facenet_pytorch import MTCNN, InceptionResnetV1
from facenet_pytorch.models.mtcnn import fixed_image_standardization
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance
from safetensors.torch import save_file
from torchvision import transforms
from torchvision.transforms import functional as TF
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, PARITY, REPO, TINY_SD, save_tensors, seed  # noqa: E402

TINY_CLIP = FIXTURES / "tiny-clip"
PHOTOS = FIXTURES / "photos"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MASK64 = (1 << 64) - 1


def name_hash(name: str) -> int:
    """FNV-1a (64 bit) of the UTF-8 name."""
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


def uniform(name: str, n: int) -> np.ndarray:
    """n numbers in [0, 1): splitmix64 of (name hash + index), top 53 bits."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(name_hash(name))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def formula_tensor(name: str, shape) -> torch.Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    u = uniform(name, n)
    if name.endswith("running_var"):
        v = 0.5 + u
    elif name.endswith("running_mean") or name.endswith("bias"):
        v = 0.2 * (u - 0.5)
    elif len(shape) == 1:
        v = 0.75 + 0.5 * u
    else:
        fan_in = int(np.prod(shape[1:]))
        v = (u - 0.5) * np.sqrt(24.0 / fan_in)  # He: standard deviation sqrt(2 / fan_in)
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def formula_weights(model: torch.nn.Module, rename=lambda name: name) -> None:
    """Every float tensor whose `rename` is not None takes the formula's values for that name."""
    state = model.state_dict()
    for name, t in state.items():
        if t.is_floating_point() and rename(name) is not None:
            state[name] = formula_tensor(rename(name), tuple(t.shape))
    model.load_state_dict(state)


def clip_fixture(out: dict) -> None:
    seed(0)
    config = CLIPConfig(
        # The tiny Stable Diffusion's tokenizer (914 tokens, <|startoftext|> 912, <|endoftext|> 913,
        # prompts padded to 77): a CLIP folder needs one for CLIP-T.
        text_config=dict(vocab_size=914, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=913,
                         bos_token_id=912, pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    if TINY_CLIP.exists():
        shutil.rmtree(TINY_CLIP)
    model.save_pretrained(TINY_CLIP, safe_serialization=True)
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(TINY_SD / "tokenizer" / name, TINY_CLIP / name)

    # openai/CLIP's `_transform` on a PIL image, its 8-bit levels stored before the normalisation.
    crop = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.PILToTensor(),
    ])
    photos = ["astronaut_palette_300x400.png", "chelsea_300x256.png"]  # lossless: JPEG decoders differ
    levels = torch.stack([crop(Image.open(PHOTOS / p).convert("RGB")) for p in photos])
    pixels = transforms.Normalize(CLIP_MEAN, CLIP_STD)(levels.float() / 255.0)
    ids = torch.tensor([[912, 5, 17, 300, 913, 0, 0, 0],
                        [912, 42, 913, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixels)
        text_embeds = model.get_text_features(input_ids=ids)
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    out.update(clip_levels=levels, clip_image_embeds=image_embeds, clip_input_ids=ids.to(torch.int64),
               clip_text_embeds=text_embeds)
    return photos


def facenet_fixture(out: dict) -> None:
    model = InceptionResnetV1(pretrained=None).eval()
    formula_weights(model)
    crop = Image.open(PHOTOS / "astronaut_512.jpg").convert("RGB").crop((170, 40, 370, 240)).resize((160, 160))
    levels = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        embedding = model(fixed_image_standardization(levels.float()))
    out.update(facenet_levels=levels.to(torch.uint8), facenet_embedding=embedding)


def lpips_fixture(out: dict) -> None:
    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    # lpips keeps torchvision's `features.N` modules as `net.sliceK.N`.
    formula_weights(model, lambda name: "features." + name.split(".", 2)[2] if name.startswith("net.slice") else None)
    heads = {k: v for k, v in model.state_dict().items() if k.startswith("lin") and not k.startswith("lins")}
    assets = REPO / "assets"
    save_file({k: v.contiguous() for k, v in heads.items()}, str(assets / "lpips_alex.safetensors"))
    licence = Path(lpips.__file__).resolve().parent.parent / "lpips-0.1.4.dist-info" / "LICENSE"
    (assets / "LPIPS-LICENSE.txt").write_text(
        "assets/lpips_alex.safetensors holds the v0.1 AlexNet linear heads of the lpips package 0.1.4\n"
        "(https://github.com/richzhang/PerceptualSimilarity, weights/v0.1/alex.pth), converted to\n"
        "safetensors without change. Their licence:\n\n" + licence.read_text())
    photo = torch.from_numpy(np.asarray(Image.open(PHOTOS / "astronaut_512.jpg").convert("RGB")).copy())
    photo = photo.permute(2, 0, 1).float() / 127.5 - 1.0
    a = torch.stack([photo[:, 100:164, 180:244], photo[:, 300:364, 40:104]])
    b = torch.stack([photo[:, 104:168, 184:248], photo[:, 20:84, 400:464]])
    with torch.no_grad():
        distance = model(a, b).flatten()
    out.update(lpips_a=a, lpips_b=b, lpips_distance=distance)


FACE_CROP_PHOTOS = ["faces_3_480x320.png", "astronaut_palette_300x400.png"]  # lossless


def face_crop_fixture(out: dict) -> list:
    """What facenet-pytorch's `MTCNN(image_size=160, margin=0)` gives FaceNet: the largest face's box
    cut from the photo (`extract_face`: truncated to whole pixels, PIL bilinear resize to 160), then
    `fixed_image_standardization`."""
    mtcnn = MTCNN(image_size=160, margin=0)
    crops, boxes = [], []
    for name in FACE_CROP_PHOTOS:
        photo = Image.open(PHOTOS / name).convert("RGB")
        crops.append(mtcnn(photo))
        box, _ = mtcnn.detect(photo)
        boxes.append(torch.from_numpy(box[0].astype(np.float32)))
    # The crops are 8-bit levels standardised, (x - 127.5) / 128: stored as the levels.
    levels = (torch.stack(crops) * 128 + 127.5).round().to(torch.uint8)
    assert torch.equal(fixed_image_standardization(levels.float()), torch.stack(crops))
    out.update(face_crop_levels=levels, face_crop_boxes=torch.stack(boxes))
    return FACE_CROP_PHOTOS


FID_PHOTOS = ["astronaut_palette_300x400.png", "chelsea_300x256.png"]  # two sizes, lossless


def fid_inception_formula():
    """pytorch-fid's `fid_inception_v3` (the torchvision network with the FID patches) on formula
    weights instead of the downloaded checkpoint."""
    inception = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inception.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
    inception.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
    formula_weights(inception)
    return inception


def fid_model():
    """pytorch-fid's `InceptionV3()` (2048-d pool features, its resize and normalisation) on formula weights."""
    fid_inception.fid_inception_v3 = fid_inception_formula
    return fid_inception.InceptionV3().eval()


def fid_fixture(out: dict) -> dict:
    model = fid_model()
    features = []
    for name in FID_PHOTOS:
        # pytorch-fid's `ImagePathDataset`: PIL RGB, `ToTensor` (levels / 255).
        image = TF.to_tensor(Image.open(PHOTOS / name).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            features.append(model(image)[0].flatten(1))
    out.update(fid_features=torch.cat(features))

    # The Frechet distance of fixed correlated features, computed in float64 from the float32 values
    # stored: more samples than dimensions (full-rank covariances), and fewer (singular ones, as an
    # evaluation of 160 images against 2048 dimensions has).
    # The distances go to the JSON file, in full float64 precision.
    rng = np.random.default_rng(7)
    distances = {}
    for tag, (n1, n2, dims) in {"full": (50, 40, 12), "singular": (20, 30, 96)}.items():
        mix = rng.normal(size=(dims, dims)) / np.sqrt(dims)
        a = (rng.normal(size=(n1, dims)) @ mix + 0.5).astype(np.float32)
        b = (rng.gamma(2.0, size=(n2, dims)) @ mix * 0.7).astype(np.float32)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        distance = calculate_frechet_distance(a64.mean(0), np.cov(a64, rowvar=False),
                                              b64.mean(0), np.cov(b64, rowvar=False))
        out[f"frechet_{tag}_a"] = torch.from_numpy(a)
        out[f"frechet_{tag}_b"] = torch.from_numpy(b)
        distances[tag] = float(distance)
    return {"fid_photos": FID_PHOTOS, "frechet_distances": distances}


def main() -> None:
    out = {}
    photos = clip_fixture(out)
    facenet_fixture(out)
    lpips_fixture(out)
    crop_photos = face_crop_fixture(out)
    fid_meta = fid_fixture(out)
    save_tensors(PARITY / "eval_models.safetensors", out)
    meta = {"clip_photos": photos, "face_crop_photos": crop_photos, **fid_meta}
    (PARITY / "eval_models.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
