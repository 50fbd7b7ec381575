"""PyTorch checkpoint files in both of torch.save's formats, for the checkpoint reader's tests.

One state dict, saved as a zip-format file (PyTorch >= 1.6) and as a legacy-format file (what
PyTorch < 1.6 wrote, e.g. face-parsing.PyTorch's 79999_iter.pth), with the tensors that reading
either must give. It holds what state dicts hold beyond plain f32 weights: an int64 scalar
(BatchNorm's num_batches_tracked), f16 and f64 tensors, two tensors sharing one storage and a
strided view (a column) into a storage. The legacy format names storages by memory address, so
legacy.pth differs from run to run in those names only.

Also the tiny model's text encoder as a transformers pytorch_model.bin, for model folders that
have no safetensors file.

Writes tests/fixtures/checkpoints/{zip.pth,legacy.pth,expected.safetensors,
text_encoder/pytorch_model.bin}.
Run from the repository root: /work/venv/bin/python tools/reference/checkpoints.py
"""
import sys
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from safetensors.torch import load_file  # noqa: E402

from common import FIXTURES, REPO, TINY_SD, save_tensors, seed  # noqa: E402

OUT = FIXTURES / "checkpoints"


def main() -> None:
    seed(30)
    shared = torch.randn(4, 6)
    state = OrderedDict(
        [
            ("conv.weight", torch.randn(3, 2, 3, 3)),
            ("bn.num_batches_tracked", torch.tensor(79999, dtype=torch.long)),
            ("half.weight", torch.randn(5).half()),
            ("double.weight", torch.randn(2, 2, dtype=torch.float64)),
            ("shared.top", shared[:2]),
            ("shared.bottom", shared[2:]),
            ("shared.column", shared[:, 1]),
        ]
    )
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(state, OUT / "zip.pth")
    torch.save(state, OUT / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ["zip.pth", "legacy.pth"]:
        print(f"wrote {(OUT / name).relative_to(REPO)}")
    save_tensors(OUT / "expected.safetensors", {name: t.clone() for name, t in state.items()})

    text_encoder = OUT / "text_encoder" / "pytorch_model.bin"
    text_encoder.parent.mkdir(exist_ok=True)
    torch.save(load_file(str(TINY_SD / "text_encoder" / "model.safetensors")), text_encoder)
    print(f"wrote {text_encoder.relative_to(REPO)}")


if __name__ == "__main__":
    main()
