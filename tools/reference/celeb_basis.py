"""Reference data for the celebrity-name basis (src/priors/celeb_basis.rs).

Writes tests/fixtures/parity/celeb_basis.safetensors with
- `shipped_ids` (n, 2): the CLIP token ids of every name in assets/celeb_names.txt, from transformers'
  CLIPTokenizer on the real vocabulary (tests/fixtures/tokenizer/), cross-checked against open_clip's
  own tokenizer; the script fails if any shipped name is not exactly two tokens;
- `tiny_ids` (k, 2), `tiny_mean` (2, hidden), `tiny_std` (2, hidden): a few two-word "names" that the
  tiny tokenizer (tests/fixtures/tiny-sd/tokenizer) splits into two tokens, and the per-position mean
  and unbiased std (in f64) of their rows of the tiny text encoder's token-embedding table.
The tiny names themselves are in the metadata (`tiny_names`, a JSON list).
Run from the repository root: /work/venv/bin/python tools/reference/celeb_basis.py
"""
import json
import sys
from pathlib import Path

import open_clip
import torch
from safetensors import safe_open
from transformers import CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, PARITY, REPO, TINY_SD, save_tensors  # noqa: E402

# Words the tiny vocabulary holds as whole tokens, paired into stand-in "names".
TINY_NAMES = ["great king", "new man", "love art", "red son", "time king", "great love", "new age"]


def read_names(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def two_token_ids(tokenizer: CLIPTokenizer, name: str) -> list[int]:
    tokens = tokenizer.tokenize(name)
    assert len(tokens) == 2, f"{name!r} splits into {tokens}"
    return tokenizer.convert_tokens_to_ids(tokens)


def shipped_ids() -> torch.Tensor:
    folder = FIXTURES / "tokenizer"
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    open_clip_tokenize = open_clip.get_tokenizer("ViT-H-14")
    names = read_names(REPO / "assets" / "celeb_names.txt")
    assert len(names) >= 300 and len(set(names)) == len(names), "need >= 300 distinct names"
    ids = []
    for name in names:
        pair = two_token_ids(tokenizer, name)
        # open_clip: BOS, tokens, EOS, zero padding.
        assert open_clip_tokenize([name])[0, 1:4].tolist() == pair + [tokenizer.eos_token_id], name
        ids.append(pair)
    return torch.tensor(ids, dtype=torch.int64)


def tiny_basis() -> dict:
    folder = TINY_SD / "tokenizer"
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    ids = torch.tensor([two_token_ids(tokenizer, name) for name in TINY_NAMES], dtype=torch.int64)
    with safe_open(str(TINY_SD / "text_encoder" / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embeddings.token_embedding.weight"))
        table = f.get_tensor(key).double()
    rows = table[ids]  # (names, 2, hidden)
    return {"tiny_ids": ids, "tiny_mean": rows.mean(dim=0), "tiny_std": rows.std(dim=0, unbiased=True)}


def main() -> None:
    tensors = {"shipped_ids": shipped_ids(), **tiny_basis()}
    save_tensors(PARITY / "celeb_basis.safetensors", tensors, metadata={"tiny_names": json.dumps(TINY_NAMES)})


if __name__ == "__main__":
    main()
