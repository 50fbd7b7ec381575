"""Reference values of the evaluation metrics (docs/eval.md) on a fixed set of images, computed with
the reference packages: facenet-pytorch's `MTCNN(image_size=160, margin=0)` and `InceptionResnetV1`
(Face Sim), transformers' `CLIPModel` with openai/CLIP's preprocessing (CLIP-I, CLIP-T), lpips'
LPIPS-Alex (Face Div, Trusted Div) and pytorch-fid (FID), the networks on the weights of
eval_models.py (the tiny CLIP, formula weights for the others).

Writes tests/fixtures/eval/:
- images/*.png: "generated" images of two prompts (the prompt in each PNG's `prompt` text chunk, as
  `stableid generate` and `stableid eval` write it), cut from the scikit-image photos: faces of
  several sizes, several faces in one image, and an image without a face;
- reference/*.png: a FID reference folder of three images;
- expected.json: every image's CLIP-I, CLIP-T and Face Sim, every pair's Face Div and Trusted Div,
  each prompt's row and the mean row, and the FID of the images against the reference.

The input photo is tests/fixtures/photos/astronaut_palette_300x400.png.
Run from the repository root: tools/reference/.venv/bin/python tools/reference/eval_metrics.py
"""
import json
import shutil
import sys
from pathlib import Path

import lpips
import numpy as np
import torch
from facenet_pytorch import MTCNN, InceptionResnetV1
from PIL import Image, PngImagePlugin
from pytorch_fid.fid_score import calculate_frechet_distance
from torchvision import transforms
from torchvision.transforms import functional as TF
from transformers import CLIPModel, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES  # noqa: E402
from eval_models import CLIP_MEAN, CLIP_STD, TINY_CLIP, fid_model, formula_weights  # noqa: E402

PHOTOS = FIXTURES / "photos"
OUT = FIXTURES / "eval"
PHOTO = "astronaut_palette_300x400.png"
PROMPTS = [
    "a photo of v1* v2*, facing to camera, best quality, ultra high res",
    "v1* v2* wearing a spacesuit, facing to camera, best quality, ultra high res",
]


def rgb(name: str) -> Image.Image:
    return Image.open(PHOTOS / name).convert("RGB")


def make_images() -> tuple[list, list]:
    """The generated images (file, prompt index) and the reference images, written as PNGs."""
    astronaut = rgb("astronaut_512.jpg")
    images = {
        "00-0.png": (0, astronaut.resize((200, 200), Image.LANCZOS)),
        "00-1.png": (0, rgb("faces_3_480x320.png").resize((240, 160), Image.LANCZOS)),
        "00-2.png": (0, astronaut.rotate(12, Image.BILINEAR).crop((60, 20, 420, 420)).resize((180, 200), Image.LANCZOS)),
        "01-0.png": (1, astronaut.transpose(Image.FLIP_LEFT_RIGHT).crop((100, 0, 412, 312)).resize((176, 176), Image.LANCZOS)),
        "01-1.png": (1, rgb("chelsea_300x256.png").resize((150, 128), Image.LANCZOS)),
    }
    references = {
        "coffee.png": rgb("coffee_rgb16_256.png").resize((160, 160), Image.LANCZOS),
        "chelsea.png": rgb("chelsea_rgba_256.png").crop((40, 40, 216, 216)),
        "astronaut_grey.png": astronaut.convert("L").convert("RGB").resize((144, 144), Image.LANCZOS),
    }
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "images").mkdir(parents=True)
    (OUT / "reference").mkdir()
    for name, (prompt, image) in images.items():
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", PROMPTS[prompt])
        image.save(OUT / "images" / name, pnginfo=info, optimize=True)
    for name, image in references.items():
        image.save(OUT / "reference" / name, optimize=True)
    return [(name, prompt) for name, (prompt, _) in images.items()], sorted(references)


def cos100(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(100 * torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def mean(values: list):
    return float(np.mean(values)) if values else None


def main() -> None:
    images, references = make_images()
    mtcnn = MTCNN(image_size=160, margin=0)
    facenet = InceptionResnetV1(pretrained=None).eval()
    formula_weights(facenet)
    alex = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    formula_weights(alex, lambda name: "features." + name.split(".", 2)[2] if name.startswith("net.slice") else None)
    clip = CLIPModel.from_pretrained(TINY_CLIP).eval()
    tokenizer = CLIPTokenizer.from_pretrained(TINY_CLIP)
    inception = fid_model()
    clip_transform = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])

    def clip_image(image):
        with torch.no_grad():
            out = clip.get_image_features(pixel_values=clip_transform(image).unsqueeze(0))
        return getattr(out, "pooler_output", out)

    def clip_text(prompt):
        ids = tokenizer(prompt.replace("v1* v2*", "a person"), padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = clip.get_text_features(input_ids=ids)
        return getattr(out, "pooler_output", out)

    def face(image):
        """The standardised 160x160 crop of the largest face, or None."""
        return mtcnn(image)

    def embed(crop):
        with torch.no_grad():
            return facenet(crop.unsqueeze(0))

    def inception_features(image):
        with torch.no_grad():
            return inception(TF.to_tensor(image).unsqueeze(0))[0].flatten(1)

    photo = rgb(PHOTO)
    photo_clip, photo_face = clip_image(photo), embed(face(photo))
    texts = [clip_text(p) for p in PROMPTS]
    scores, crops, gen_features = [], [], []
    for name, prompt in images:
        image = Image.open(OUT / "images" / name).convert("RGB")
        crop = face(image)
        features = clip_image(image)
        scores.append({
            "file": name,
            "prompt": prompt,
            "clip_i": cos100(features, photo_clip),
            "clip_t": cos100(features, texts[prompt]),
            "face_sim": None if crop is None else cos100(embed(crop), photo_face),
        })
        # LPIPS takes the crop's 8-bit levels in [-1, 1].
        crops.append(None if crop is None else ((crop * 128 + 127.5).round() / 127.5 - 1).unsqueeze(0))
        gen_features.append(inception_features(image))

    pairs = []
    for a in range(len(images)):
        for b in range(a + 1, len(images)):
            if scores[a]["prompt"] != scores[b]["prompt"] or crops[a] is None or crops[b] is None:
                continue
            with torch.no_grad():
                face_div = 100 * float(alex(crops[a], crops[b]))
            kept = (max(scores[a]["face_sim"], 0) + max(scores[b]["face_sim"], 0)) / 200
            pairs.append({"prompt": scores[a]["prompt"], "a": a, "b": b, "face_div": face_div,
                          "trusted_div": face_div * kept})

    def row(prompt=None):
        mine = [s for s in scores if prompt is None or s["prompt"] == prompt]
        my_pairs = [p for p in pairs if prompt is None or p["prompt"] == prompt]
        return {
            "images": len(mine),
            "faces": sum(s["face_sim"] is not None for s in mine),
            "clip_i": mean([s["clip_i"] for s in mine]),
            "clip_t": mean([s["clip_t"] for s in mine]),
            "face_sim": mean([s["face_sim"] for s in mine if s["face_sim"] is not None]),
            "face_div": mean([p["face_div"] for p in my_pairs]),
            "trusted_div": mean([p["trusted_div"] for p in my_pairs]),
        }

    # pytorch-fid: np.mean and np.cov of float64 activations, then calculate_frechet_distance.
    ref_features = [inception_features(Image.open(OUT / "reference" / n).convert("RGB")) for n in references]
    gen = torch.cat(gen_features).double().numpy()
    ref = torch.cat(ref_features).double().numpy()
    fid = calculate_frechet_distance(gen.mean(0), np.cov(gen, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))

    expected = {
        "photo": PHOTO,
        "prompts": PROMPTS,
        "images": scores,
        "pairs": pairs,
        "prompt_rows": [row(p) for p in range(len(PROMPTS))],
        "mean": row(),
        "fid": float(fid),
        "references": references,
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(json.dumps(expected["mean"]), "FID", fid)


if __name__ == "__main__":
    main()
