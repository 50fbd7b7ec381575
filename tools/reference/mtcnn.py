"""Reference outputs of facenet-pytorch's MTCNN (`facenet_pytorch/models/mtcnn.py`) with its real
weights (the ones assets/mtcnn.safetensors holds).

- Nets: P-Net, R-Net and O-Net on random inputs of a few sizes (odd sizes exercise the ceil-mode
  max pools).

Writes tests/fixtures/parity/mtcnn.safetensors.
Run from the repository root: tools/reference/.venv/bin/python tools/reference/mtcnn.py
"""
import sys
from pathlib import Path

import torch

# facenet-pytorch is installed without its dependency pins (make_fixtures.sh): check it runs here.
from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PARITY, save_tensors, seed  # noqa: E402

PNET_SIZES = [(1, 12, 12), (2, 31, 45), (1, 57, 40)]
RNET_BATCH = 5
ONET_BATCH = 3


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


def main() -> None:
    seed(0)
    out = {}
    nets(out)
    save_tensors(PARITY / "mtcnn.safetensors", out)


if __name__ == "__main__":
    main()
