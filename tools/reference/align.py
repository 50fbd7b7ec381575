"""Reference FFHQ alignment: the crop of NVlabs/ffhq-dataset `download_ffhq.py`,
`recreate_aligned_images()` (rotate_level=True, random_shift=0, enable_padding=True), written out
here with numpy, scipy and PIL, fed the 5 MTCNN landmarks instead of dlib's 68 (the image-left eye,
the image-right eye, the nose, the two mouth corners; the eye points stand for the means of dlib's
eye points, the mouth corners for points 48 and 54; the nose is unused, as in the recipe).

The output size is a parameter (the recipe's `output_size`, which also sets the shrink factor);
the quad is warped to the recipe's `transform_size` of 4096 and resized down with Lanczos (PIL's
ANTIALIAS).

Cases (given landmarks, so each branch of the recipe runs on purpose):
- group_face0_512: the largest face of faces_3_480x320.png, facenet-pytorch's landmarks, at 512;
- group_rotated_256: the second face's landmarks turned 30 degrees about their eye centre;
- group_border_256: the largest face's landmarks moved 70 px left, so the quad leaves the photo
  and the reflect padding with its blurred border runs;
- astronaut_large_128: astronaut_1024x768.jpg's landmarks scaled 2x about the nose, at 128, so
  the photo is first shrunk by 2 (and padded). This photo is a JPEG: the Rust side decodes it
  with another decoder, which the test allows for.

Writes tests/fixtures/parity/align.json and tests/fixtures/parity/align_<case>.png.
Run from the repository root: tools/reference/.venv/bin/python tools/reference/align.py
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, PARITY  # noqa: E402

PHOTOS = FIXTURES / "photos"
TRANSFORM_SIZE = 4096


def ffhq_align(img: Image.Image, lm: np.ndarray, output_size: int) -> tuple[Image.Image, np.ndarray]:
    """The recipe on 5 points; returns the crop and the quad in the photo's coordinates."""
    eye_left, eye_right = lm[0], lm[1]
    mouth_avg = (lm[3] + lm[4]) * 0.5
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = np.hypot(*x) * 2
    photo_quad = quad.copy()

    # Shrink.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(img.size[0]) / shrink)), int(np.rint(float(img.size[1]) / shrink)))
        img = img.resize(rsize, Image.LANCZOS)
        quad /= shrink
        qsize /= shrink

    # Crop.
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
            int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0),
            min(crop[2] + border, img.size[0]), min(crop[3] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]

    # Pad.
    pad = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
           int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0),
           max(pad[2] - img.size[0] + border, 0), max(pad[3] - img.size[1] + border, 0))
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        img = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = img.shape
        y, x, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(1.0 - np.minimum(np.float32(x) / pad[0], np.float32(w - 1 - x) / pad[2]),
                          1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3]))
        blur = qsize * 0.02
        img += (scipy.ndimage.gaussian_filter(img, [blur, blur, 0]) - img) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        img += (np.median(img, axis=(0, 1)) - img) * np.clip(mask, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(img), 0, 255)), "RGB")
        quad += pad[:2]

    # Transform, then resize.
    img = img.transform((TRANSFORM_SIZE, TRANSFORM_SIZE), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR)
    if output_size < TRANSFORM_SIZE:
        img = img.resize((output_size, output_size), Image.LANCZOS)
    return img, photo_quad


def rotated(lm: np.ndarray, degrees: float) -> np.ndarray:
    centre = (lm[0] + lm[1]) * 0.5
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (lm - centre) @ rot.T + centre


def main() -> None:
    detected = json.loads((PARITY / "mtcnn_detect.json").read_text())
    group = np.array([f["landmarks"] for f in detected["faces_3_480x320.png"]], dtype=np.float64)
    astronaut = np.array(detected["astronaut_1024x768.jpg"][0]["landmarks"], dtype=np.float64)
    cases = {
        "group_face0_512": ("faces_3_480x320.png", group[0], 512),
        "group_rotated_256": ("faces_3_480x320.png", rotated(group[1], 30.0), 256),
        "group_border_256": ("faces_3_480x320.png", group[0] - [70.0, 0.0], 256),
        "astronaut_large_128": ("astronaut_1024x768.jpg", (astronaut - astronaut[2]) * 2.0 + astronaut[2], 128),
    }
    out = {}
    for name, (photo, lm, size) in cases.items():
        img = Image.open(PHOTOS / photo).convert("RGB")
        crop, quad = ffhq_align(img, lm.copy(), size)
        file = f"align_{name}.png"
        crop.save(PARITY / file, optimize=True)
        out[name] = {"photo": photo, "landmarks": lm.tolist(), "size": size, "quad": quad.tolist(), "file": file}
        print(f"{name}: wrote {file} ({(PARITY / file).stat().st_size // 1024} KiB)")
    path = PARITY / "align.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
