"""Reference outputs of controlnet_aux 0.0.10's OpenPose body estimator (`open_pose/`) and of the
OpenCV 5 operations it runs (opencv-python-headless).

- Model: controlnet_aux's `bodypose_model` (the real architecture and parameter names, loaded from
  the flat names of `body_pose_model.pth` through its `util.transfer`) with weights that both this
  script and tests/openpose.rs compute from the tensor names (`pose_weight`: a murmur3 hash of the
  name and the element index, scaled as He-uniform); the 209 MB of them are never stored. Stage-6
  PAFs and heat maps on two small inputs.
- Resizes: `cv2.resize` of random 8-bit colour and float32 one-channel images with INTER_AREA,
  INTER_LANCZOS4 and INTER_LINEAR, as controlnet_aux calls them.
- Drawing: `util.draw_bodypose` of random people (missing keypoints, keypoints near and past the
  borders) on canvases of several sizes.
- Pipeline: `OpenposeDetector.__call__` on a photo, with the network replaced by one that records
  its input and returns stage-6 maps synthesised with two people (Gaussian peaks at the keypoints,
  unit vectors along the limbs), so that peak finding, limb scoring and grouping find people.

Writes tests/fixtures/parity/openpose_*.safetensors, tests/fixtures/parity/openpose_*.json and
tests/fixtures/parity/openpose_*.png.
Run from the repository root: tools/reference/.venv/bin/python tools/reference/openpose.py
"""
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

# controlnet_aux is installed without its dependency pins (make_fixtures.sh).
from controlnet_aux.open_pose import Keypoint, OpenposeDetector
from controlnet_aux.open_pose import util as pose_util
from controlnet_aux.open_pose.body import Body
from controlnet_aux.open_pose.model import bodypose_model
from controlnet_aux.util import HWC3, resize_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, PARITY, save_tensors  # noqa: E402

PHOTO = FIXTURES / "photos" / "faces_3_480x320.png"
MODEL_INPUTS = [(48, 40), (24, 64)]
# (detect_resolution, image_resolution)
PIPELINE_CASES = [(512, 512), (256, 256), (512, 384)]

MASK32 = 0xFFFFFFFF


def fnv1a(name: str) -> int:
    h = 0x811C9DC5
    for b in name.encode():
        h = ((h ^ b) * 0x01000193) & MASK32
    return h


def pose_weight(name: str, shape) -> np.ndarray:
    """The test weights: element i of tensor `name` is `(2u - 1) * a` with `u` = murmur3's fmix32
    of `i * 0x9E3779B1 + fnv1a(name)` over 2^32, `a = sqrt(6 / fan_in)` for weights, 0.1 for
    biases (all in f64, then rounded to f32)."""
    n = int(np.prod(shape))
    h = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B1) + np.uint64(fnv1a(name))) & np.uint64(MASK32)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(MASK32)
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(MASK32)
    h ^= h >> np.uint64(16)
    u = h.astype(np.float64) / 4294967296.0
    scale = 0.1 if name.endswith("bias") else np.sqrt(6.0 / int(np.prod(shape[1:])))
    return ((2.0 * u - 1.0) * scale).astype(np.float32).reshape(shape)


def test_model() -> bodypose_model:
    model = bodypose_model().eval()
    # body_pose_model.pth names its tensors without the block prefix (`conv1_1.weight`); this is
    # the file's layout, read through controlnet_aux's own loader.
    flat = {}
    for name, t in model.state_dict().items():
        short = ".".join(name.split(".")[1:])
        flat[short] = torch.from_numpy(pose_weight(short, tuple(t.shape)))
    model.load_state_dict(pose_util.transfer(model, flat))
    return model


def model_parity(model) -> None:
    out = {}
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for i, (h, w) in enumerate(MODEL_INPUTS):
            x = torch.from_numpy(rng.uniform(-0.5, 0.5, (1, 3, h, w)).astype(np.float32))
            paf, heat = model(x)
            out.update({f"input{i}": x, f"paf{i}": paf, f"heat{i}": heat})
            print(f"model {h}x{w}: paf |max| {paf.abs().max():.3f}, heat max {heat.max():.3f}")
    save_tensors(PARITY / "openpose_model.safetensors", out)


def resizes() -> None:
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    colour_even = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    maps = rng.standard_normal((9, 13)).astype(np.float32)
    cases = {
        "area_down": (colour, (29, 20), cv2.INTER_AREA),
        "area_half": (colour_even, (30, 20), cv2.INTER_AREA),
        "area_mixed": (colour, (60, 30), cv2.INTER_AREA),
        "lanczos_up": (colour, (101, 70), cv2.INTER_LANCZOS4),
        "lanczos_down": (colour, (29, 20), cv2.INTER_LANCZOS4),
        "linear_up": (colour, (101, 70), cv2.INTER_LINEAR),
        "linear_down": (colour, (29, 20), cv2.INTER_LINEAR),
        "map_lanczos_x8": (maps, (13 * 8, 9 * 8), cv2.INTER_LANCZOS4),
        "map_lanczos_up": (maps, (31, 22), cv2.INTER_LANCZOS4),
        "map_area_down": (maps, (5, 4), cv2.INTER_AREA),
    }
    out = {}
    for name, (src, size, interpolation) in cases.items():
        out[f"{name}.input"] = torch.from_numpy(src.copy())
        out[f"{name}.output"] = torch.from_numpy(np.ascontiguousarray(cv2.resize(src, size, interpolation=interpolation)))
    path = PARITY / "openpose_resize.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    print(f"wrote {path.name}")


def random_people(rng, count):
    people = []
    for _ in range(count):
        centre = rng.uniform(-0.1, 1.1, 2)
        spread = rng.uniform(0.05, 0.5)
        keypoints = []
        for _ in range(18):
            if rng.uniform() < 0.2:
                keypoints.append(None)
            else:
                x, y = centre + rng.normal(0, spread, 2)
                keypoints.append(Keypoint(x=float(x), y=float(y)))
        people.append(keypoints)
    return people


def drawings() -> None:
    rng = np.random.default_rng(2)
    cases = []
    for i, (w, h, count) in enumerate([(200, 150, 3), (97, 131, 2), (512, 512, 6), (64, 48, 4)]):
        people = random_people(rng, count)
        canvas = np.zeros((h, w, 3), dtype=np.uint8)
        for keypoints in people:
            canvas = pose_util.draw_bodypose(canvas, keypoints)
        name = f"openpose_draw_{i}.png"
        Image.fromarray(canvas).save(PARITY / name)
        cases.append({
            "image": name,
            "people": [[None if k is None else [k.x, k.y] for k in p] for p in people],
        })
    # Limbs of every length and angle around one joint (the ellipse polygons' corner cases).
    people = []
    for angle in range(0, 360, 7):
        for length in [0.0, 0.004, 0.02, 0.05]:
            dx, dy = length * np.cos(np.radians(angle)), length * np.sin(np.radians(angle))
            keypoints = [None] * 18
            keypoints[1] = Keypoint(x=0.5 + dx, y=0.5 + dy)
            keypoints[2] = Keypoint(x=0.5 + 3 * dx + 0.013, y=0.5 + 3 * dy)
            people.append(keypoints)
    canvas = np.zeros((300, 300, 3), dtype=np.uint8)
    for keypoints in people:
        canvas = pose_util.draw_bodypose(canvas, keypoints)
    Image.fromarray(canvas).save(PARITY / "openpose_draw_fan.png")
    cases.append({"image": "openpose_draw_fan.png", "people": [[None if k is None else [k.x, k.y] for k in p] for p in people]})
    (PARITY / "openpose_draw.json").write_text(json.dumps(cases) + "\n")
    print(f"wrote openpose_draw.json and {len(cases)} images")


# Two people in fractions of the model input: (x, y) per keypoint, None where missing.
PEOPLE = [
    [(0.30, 0.15), (0.30, 0.25), (0.24, 0.26), (0.21, 0.40), (0.20, 0.52), (0.36, 0.25), (0.39, 0.40),
     (0.41, 0.53), (0.26, 0.52), (0.26, 0.70), (0.26, 0.88), (0.34, 0.52), (0.34, 0.70), (0.35, 0.88),
     (0.29, 0.13), (0.31, 0.13), (0.27, 0.14), (0.33, 0.14)],
    [(0.72, 0.30), (0.72, 0.38), (0.67, 0.39), (0.64, 0.50), None, (0.77, 0.38), (0.80, 0.49), (0.82, 0.58),
     (0.69, 0.60), (0.68, 0.75), None, (0.75, 0.60), (0.76, 0.75), (0.77, 0.90), (0.71, 0.28), (0.73, 0.28),
     None, (0.75, 0.29)],
]
LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13], [13, 14],
         [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
PAF_CHANNELS = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22], [23, 24], [25, 26],
                [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52], [55, 56], [37, 38], [45, 46]]


def synthetic_maps(h, w):
    """Stage-6 outputs (1, 38, h, w) and (1, 19, h, w) for PEOPLE on an h x w grid, with noise."""
    rng = np.random.default_rng(h * 1000 + w)
    heat = np.zeros((19, h, w), np.float32)
    paf = np.zeros((38, h, w), np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    for person in PEOPLE:
        points = [None if p is None else (p[0] * w, p[1] * h) for p in person]
        for j, p in enumerate(points):
            if p is not None:
                heat[j] = np.maximum(heat[j], np.exp(-((xs - p[0]) ** 2 + (ys - p[1]) ** 2) / (2 * 0.8 ** 2)))
        for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
            pa, pb = points[a - 1], points[b - 1]
            if pa is None or pb is None:
                continue
            v = np.array(pb) - np.array(pa)
            length = np.linalg.norm(v)
            u = v / length
            along = (xs - pa[0]) * u[0] + (ys - pa[1]) * u[1]
            across = np.abs((xs - pa[0]) * u[1] - (ys - pa[1]) * u[0])
            on = (along >= -1) & (along <= length + 1) & (across <= 1.2)
            paf[cx - 19][on] = u[0]
            paf[cy - 19][on] = u[1]
    heat[18] = 1 - heat[:18].max(axis=0)
    heat += rng.normal(0, 0.02, heat.shape).astype(np.float32)
    paf += rng.normal(0, 0.02, paf.shape).astype(np.float32)
    return torch.from_numpy(paf[None]), torch.from_numpy(heat[None])


class SyntheticNet(torch.nn.Module):
    """Stands for `bodypose_model`: records its input and answers synthetic_maps."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x):
        paf, heat = synthetic_maps(x.shape[2] // 8, x.shape[3] // 8)
        self.calls.append((x.clone(), paf, heat))
        return paf, heat


class RecordingBody(Body):
    """controlnet_aux's Body on SyntheticNet, keeping what __call__ returns."""

    def __init__(self):
        self.model = SyntheticNet()
        self.results = []

    def __call__(self, image):
        candidate, subset = super().__call__(image)
        self.results.append((candidate, subset))
        return candidate, subset


def pipeline() -> None:
    photo = np.array(Image.open(PHOTO).convert("RGB"))
    cases, tensors = [], {}
    for i, (detect, image) in enumerate(PIPELINE_CASES):
        body = RecordingBody()
        detector = OpenposeDetector(body)
        pose_map = np.array(detector(photo, detect_resolution=detect, image_resolution=image))
        (x, paf, heat), = body.model.calls
        (candidate, subset), = body.results
        detect_image = resize_image(HWC3(photo), detect)
        poses = detector.detect_poses(detect_image)
        name = f"openpose_pipeline_{i}.png"
        Image.fromarray(pose_map).save(PARITY / name)
        # The network input is 8-bit pixels / 256 - 0.5 (BGR, padded with 128): kept as the bytes.
        tensors[f"case{i}.input_bgr"] = torch.from_numpy(((x[0] + 0.5) * 256).round().to(torch.uint8).numpy())
        tensors[f"case{i}.paf"] = paf[0]
        tensors[f"case{i}.heat"] = heat[0]
        cases.append({
            "detect_resolution": detect,
            "image_resolution": image,
            "detect_size": [detect_image.shape[1], detect_image.shape[0]],
            "pose_map": name,
            "candidate": candidate.tolist(),
            "subset": subset.tolist(),
            "people": [
                {
                    "keypoints": [None if k is None else [k.x, k.y] for k in p.body.keypoints],
                    "total_score": float(p.body.total_score),
                    "total_parts": int(p.body.total_parts),
                }
                for p in poses
            ],
        })
        print(f"pipeline detect {detect} image {image}: {len(candidate)} peaks, {len(subset)} people, input {tuple(x.shape)}")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(PARITY / "openpose_pipeline.safetensors"))
    (PARITY / "openpose_pipeline.json").write_text(json.dumps(cases) + "\n")


def main() -> None:
    model_parity(test_model())
    resizes()
    drawings()
    pipeline()


if __name__ == "__main__":
    main()
