"""Converts the MTCNN weights shipped in the facenet-pytorch wheel to one safetensors file.

Reads facenet_pytorch/data/{pnet,rnet,onet}.pt (legacy PyTorch state dicts) and writes
assets/mtcnn.safetensors with the tensors of each net under `pnet.`, `rnet.`, `onet.` (the names of
facenet-pytorch's `PNet`, `RNet`, `ONet` modules), f32, plus assets/MTCNN-LICENSE.txt with the
wheel's licence notice.
Run from the repository root: tools/reference/.venv/bin/python tools/reference/convert_mtcnn.py
"""
import sys
from importlib.metadata import distribution
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402

NETS = ("pnet", "rnet", "onet")
ASSETS = REPO / "assets"

NOTICE = """\
assets/mtcnn.safetensors holds the MTCNN face detector weights (P-Net, R-Net, O-Net) shipped in
the facenet-pytorch {version} wheel on PyPI as facenet_pytorch/data/pnet.pt, rnet.pt and onet.pt,
converted unchanged to safetensors by tools/reference/convert_mtcnn.py.

facenet-pytorch (https://github.com/timesler/facenet-pytorch) is distributed under the MIT licence
below (LICENSE.md of the wheel). What the wheel says of the weights' origin: its README says the
MTCNN models are "also pretrained" and that the repository's weights were ported from David
Sandberg's TensorFlow facenet repository (https://github.com/davidsandberg/facenet); its
models/utils/tensorflow2pytorch.py fills PNet, RNet and ONet from that repository's
`src/align/detect_face.create_mtcnn` (its `pnet/conv1`, `pnet/PReLU1`, ... variables). The README
cites the MTCNN paper: K. Zhang, Z. Zhang, Z. Li and Y. Qiao, "Joint Face Detection and Alignment
Using Multitask Cascaded Convolutional Networks", IEEE Signal Processing Letters, 2016.

----------------------------------------------------------------------------------------------------

{licence}"""


def main() -> None:
    dist = distribution("facenet-pytorch")
    data = Path(dist.locate_file("facenet_pytorch/data"))
    tensors = {}
    for net in NETS:
        state = torch.load(data / f"{net}.pt", map_location="cpu")
        for name, t in state.items():
            tensors[f"{net}.{name}"] = t.detach().to(torch.float32).contiguous()
    out = ASSETS / "mtcnn.safetensors"
    save_file(tensors, str(out), metadata={"source": f"facenet-pytorch {dist.version} facenet_pytorch/data"})
    print(f"wrote {out.relative_to(REPO)} ({out.stat().st_size // 1024} KiB, {len(tensors)} tensors)")
    licence = Path(dist.locate_file(f"facenet_pytorch-{dist.version}.dist-info/LICENSE.md")).read_text()
    (ASSETS / "MTCNN-LICENSE.txt").write_text(NOTICE.format(version=dist.version, licence=licence))
    print("wrote assets/MTCNN-LICENSE.txt")


if __name__ == "__main__":
    main()
