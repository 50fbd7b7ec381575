"""Reference outputs of facenet-pytorch's MTCNN (`facenet_pytorch/models/mtcnn.py`) with its real
weights (the ones assets/mtcnn.safetensors holds).

- Nets: P-Net, R-Net and O-Net on random inputs of a few sizes (odd sizes exercise the ceil-mode
  max pools).
- Detection: `MTCNN().detect(photo, landmarks=True)` (facenet-pytorch's defaults) on the test
  photos, as PIL decodes them: the astronaut (scikit-image, public domain) at several sizes, a
  photo with three faces made here from the astronaut and the coffee cup (scikit-image, CC0), and
  two photos without a face (the cat "chelsea", the coffee cup).

Writes tests/fixtures/parity/mtcnn.safetensors, tests/fixtures/parity/mtcnn_detect.json and
tests/fixtures/photos/faces_3_480x320.png.
Run from the repository root: tools/reference/.venv/bin/python tools/reference/mtcnn.py
"""
import json
import sys
from pathlib import Path

import skimage.data
import torch
from PIL import Image

# facenet-pytorch is installed without its dependency pins (make_fixtures.sh): check it runs here.
from facenet_pytorch.models.mtcnn import MTCNN, ONet, PNet, RNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, PARITY, save_tensors, seed  # noqa: E402

PNET_SIZES = [(1, 12, 12), (2, 31, 45), (1, 57, 40)]
RNET_BATCH = 5
ONET_BATCH = 3

PHOTOS = FIXTURES / "photos"
GROUP = "faces_3_480x320.png"
DETECT_PHOTOS = [
    "astronaut_512.jpg",
    "astronaut_1024x768.jpg",
    "astronaut_300x400.jpg",
    GROUP,
    "chelsea_300x256.png",
    "coffee_gray_384x256.png",
]


def uniform(*shape):
    """Inputs in the range of normalised pixels, (x - 127.5) / 128."""
    return torch.rand(*shape) * 2 - 1


def nets(out: dict) -> None:
    pnet, rnet, onet = PNet().eval(), RNet().eval(), ONet().eval()
    with torch.no_grad():
        for i, (n, h, w) in enumerate(PNET_SIZES):
            x = uniform(n, 3, h, w)
            reg, prob = pnet(x)
            out.update({f"pnet{i}.input": x, f"pnet{i}.reg": reg, f"pnet{i}.prob": prob})
        x = uniform(RNET_BATCH, 3, 24, 24)
        reg, prob = rnet(x)
        out.update({"rnet.input": x, "rnet.reg": reg, "rnet.prob": prob})
        x = uniform(ONET_BATCH, 3, 48, 48)
        reg, landmarks, prob = onet(x)
        out.update({"onet.input": x, "onet.reg": reg, "onet.landmarks": landmarks, "onet.prob": prob})


def group_photo() -> None:
    """Three astronaut heads (one mirrored) of 200, 120 and 70 px on the coffee photo."""
    head = Image.fromarray(skimage.data.astronaut()).crop((140, 20, 310, 220))
    canvas = Image.fromarray(skimage.data.coffee()).resize((480, 320), Image.BICUBIC)
    canvas.paste(head, (20, 60))
    canvas.paste(head.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((102, 120), Image.BICUBIC), (230, 30))
    canvas.paste(head.resize((60, 70), Image.BICUBIC), (380, 200))
    canvas.save(PHOTOS / GROUP, optimize=True)


def detections() -> dict:
    mtcnn = MTCNN()
    out = {}
    for name in DETECT_PHOTOS:
        boxes, probs, points = mtcnn.detect(Image.open(PHOTOS / name).convert("RGB"), landmarks=True)
        faces = []
        if boxes is not None:
            for box, prob, point in zip(boxes, probs, points):
                faces.append({"box": box.tolist(), "score": float(prob), "landmarks": point.tolist()})
        out[name] = faces
        print(f"{name}: {len(faces)} faces")
    return out


def main() -> None:
    seed(0)
    out = {}
    nets(out)
    save_tensors(PARITY / "mtcnn.safetensors", out)
    group_photo()
    path = PARITY / "mtcnn_detect.json"
    path.write_text(json.dumps(detections(), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
