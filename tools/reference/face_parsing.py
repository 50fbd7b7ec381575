"""Reference outputs of the two face parsers and of the face / hair mask definition.

- SegFormer: transformers' SegformerForSemanticSegmentation (the architecture of
  jonathandinu/face-parsing) with a tiny random config, and its SegformerImageProcessor.
- BiSeNet: the face parser of face-parsing.PyTorch (zllrunning; checkpoint 79999_iter.pth), written
  here from the published architecture (BiSeNet, arXiv 1808.00897, with that repository's choices:
  ResNet-18 features at 1/8 in place of the spatial path, heads at 1/8 and 1/16) and keeping its
  state-dict names, so the real checkpoint loads into `BiSeNet(base=64)`. A tiny-width variant is
  saved with torch.save in both formats (zip, and legacy as the real 79999_iter.pth is).
- Masks: face = every class except background, earring, neck, necklace, cloth, hair, hat;
  hair = hair; computed by class name on a fixed class map, for both class orders.

Writes tests/fixtures/tiny-segformer/, tests/fixtures/tiny-bisenet/ and
tests/fixtures/parity/face_parsing.safetensors.
Run from the repository root: /work/venv/bin/python tools/reference/face_parsing.py
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, PARITY, REPO, save_tensors, seed  # noqa: E402

TINY_SEGFORMER = FIXTURES / "tiny-segformer"
TINY_BISENET = FIXTURES / "tiny-bisenet"

# Class order of face-parsing.PyTorch (CelebAMask-HQ).
BISENET_CLASSES = [
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
]
# Class order of jonathandinu/face-parsing's config.json id2label.
SEGFORMER_CLASSES = [
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
]
NOT_FACE = {"background", "ear_r", "neck", "neck_l", "cloth", "hair", "hat"}

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# Tiny BiSeNet width: the real model has base 64 (ResNet-18 widths 64..512).
TINY_BISENET_BASE = 4


# ---------------------------------------------------------------------------------------------
# BiSeNet (face-parsing.PyTorch layout)


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, ks=3, stride=1, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, a 1x1 conv-BN shortcut where the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class Resnet18(nn.Module):
    def __init__(self, base):
        super().__init__()
        widths = [base, 2 * base, 4 * base, 8 * base]
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = base
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    """Conv, then a channel attention from the global average (1x1 conv, BN, sigmoid)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self, base):
        super().__init__()
        mid = 2 * base
        self.resnet = Resnet18(base)
        self.arm16 = AttentionRefinementModule(4 * base, mid)
        self.arm32 = AttentionRefinementModule(8 * base, mid)
        self.conv_head32 = ConvBNReLU(mid, mid)
        self.conv_head16 = ConvBNReLU(mid, mid)
        self.conv_avg = ConvBNReLU(8 * base, mid, ks=1, padding=0)

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        avg_up = F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_up = F.interpolate(self.arm32(feat32) + avg_up, feat16.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(feat32_up)
        feat16_up = F.interpolate(self.arm16(feat16) + feat32_up, feat8.shape[2:], mode="nearest")
        feat16_up = self.conv_head16(feat16_up)
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, ks=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, cin, mid, n_classes):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    def __init__(self, n_classes=19, base=64):
        super().__init__()
        self.cp = ContextPath(base)
        self.ffm = FeatureFusionModule(4 * base, 4 * base)
        self.conv_out = BiSeNetOutput(4 * base, 4 * base, n_classes)
        self.conv_out16 = BiSeNetOutput(2 * base, base, n_classes)
        self.conv_out32 = BiSeNetOutput(2 * base, base, n_classes)

    def forward(self, x):
        """Main-head logits at the input size (the auxiliary heads only serve training)."""
        h, w = x.shape[2:]
        feat8, feat_cp8, _ = self.cp(x)
        out = self.conv_out(self.ffm(feat8, feat_cp8))
        return F.interpolate(out, (h, w), mode="bilinear", align_corners=True)


# ---------------------------------------------------------------------------------------------


def rescale_weights(model: nn.Module) -> None:
    """Redraws every matrix / kernel with variance 1 / fan-in: the default small initialisations
    make a random network's output almost constant over the image, and so its class map too."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)


def randomize_batch_norms(model: nn.Module) -> None:
    """Gives every batch norm non-trivial statistics and affine parameters (eval mode uses them)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
                m.weight.copy_(1.0 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))


def test_image() -> tuple[torch.Tensor, np.ndarray]:
    """A smooth 64x64 RGB image (uint8) and its 512x512 version (each pixel an 8x8 block)."""
    seed(0)
    coarse = F.interpolate(torch.rand(1, 3, 16, 16), size=(64, 64), mode="bicubic", align_corners=False)
    small = (coarse.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    big = small.repeat_interleave(8, dim=0).repeat_interleave(8, dim=1).numpy()
    return small, big


def segformer(tensors: dict, big: np.ndarray) -> None:
    seed(10)
    config = SegformerConfig(
        num_encoder_blocks=3,
        depths=[1, 1, 2],
        sr_ratios=[4, 2, 1],
        hidden_sizes=[8, 16, 24],
        patch_sizes=[7, 3, 3],
        strides=[4, 2, 2],
        num_attention_heads=[1, 2, 3],
        mlp_ratios=[4, 4, 2],
        decoder_hidden_size=16,
        id2label={i: name for i, name in enumerate(SEGFORMER_CLASSES)},
        label2id={name: i for i, name in enumerate(SEGFORMER_CLASSES)},
    )
    model = SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        # Non-zero biases and norm affines, so that a dropped bias or a swapped weight shows.
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
        rescale_weights(model)
        randomize_batch_norms(model)
    model.save_pretrained(TINY_SEGFORMER)
    processor = SegformerImageProcessor()
    processor.save_pretrained(TINY_SEGFORMER)

    with torch.no_grad():
        # The network alone, on a small non-square input.
        x = torch.randn(1, 3, 48, 64)
        tensors["segformer.pixel_values"] = x
        tensors["segformer.logits"] = model(pixel_values=x).logits
        # The whole parser at 512: image processor, network, upsampled argmax.
        pixel_values = processor(images=Image.fromarray(big), return_tensors="pt").pixel_values
        logits = model(pixel_values=pixel_values).logits
        class_map = processor.post_process_semantic_segmentation(
            SimpleLogits(logits), target_sizes=[(512, 512)]
        )[0]
        upsampled = F.interpolate(logits, size=(512, 512), mode="bilinear", align_corners=False)
    tensors["segformer.pixel_values_512_sub16"] = pixel_values[:, :, ::16, ::16]
    tensors["segformer.upsampled_logits_sub32"] = upsampled[:, :, ::32, ::32]
    tensors["segformer.class_map_sub4"] = class_map[::4, ::4].to(torch.uint8)
    report_margin("segformer", upsampled[:, :, ::4, ::4])


class SimpleLogits:
    """The one field of the model output that post-processing reads."""

    def __init__(self, logits):
        self.logits = logits


def bisenet(tensors: dict, big: np.ndarray) -> None:
    seed(20)
    model = BiSeNet(n_classes=len(BISENET_CLASSES), base=TINY_BISENET_BASE).eval()
    rescale_weights(model)
    randomize_batch_norms(model)
    TINY_BISENET.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), TINY_BISENET / "model.pth")
    print(f"wrote {(TINY_BISENET / 'model.pth').relative_to(REPO)}")
    # The same weights in PyTorch's pre-1.6 (legacy) format, under the name of the real checkpoint,
    # which is such a file. The legacy format names storages by memory address: the file's bytes
    # differ from run to run, its tensors do not.
    legacy = TINY_BISENET / "legacy" / "79999_iter.pth"
    legacy.parent.mkdir(exist_ok=True)
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    print(f"wrote {legacy.relative_to(REPO)}")

    with torch.no_grad():
        x = torch.randn(1, 3, 32, 40)
        tensors["bisenet.pixel_values"] = x
        tensors["bisenet.logits"] = model(x)
        # The paper's preprocessing: ToTensor (scale to [0, 1]) and ImageNet normalisation.
        pixel_values = torch.from_numpy(big).permute(2, 0, 1)[None].float() / 255.0
        pixel_values = (pixel_values - IMAGENET_MEAN) / IMAGENET_STD
        logits = model(pixel_values)
    tensors["bisenet.class_map_sub4"] = logits[0].argmax(0)[::4, ::4].to(torch.uint8)
    report_margin("bisenet", logits[:, :, ::4, ::4])


def report_margin(name: str, logits: torch.Tensor) -> None:
    """Prints the smallest gap between the two best classes at the stored pixels: comparing class
    maps exactly is robust when it is well above the 1e-4 tolerance of the logits."""
    top2 = logits[0].topk(2, dim=0).values
    print(f"{name}: smallest top-2 logit margin {(top2[0] - top2[1]).min().item():.2e}, "
          f"classes present {logits[0].argmax(0).unique().tolist()}")


def masks(tensors: dict) -> None:
    """The mask definition on a fixed class map, for both class orders (names, never indices)."""
    seed(30)
    class_map = torch.randint(0, 19, (24, 32))
    tensors["masks.class_map"] = class_map.to(torch.uint8)
    for label, names in [("bisenet", BISENET_CLASSES), ("segformer", SEGFORMER_CLASSES)]:
        face_ids = [i for i, n in enumerate(names) if n not in NOT_FACE]
        tensors[f"masks.{label}.face"] = torch.isin(class_map, torch.tensor(face_ids)).float()
        tensors[f"masks.{label}.hair"] = (class_map == names.index("hair")).float()


def main() -> None:
    tensors = {}
    small, big = test_image()
    tensors["image_64"] = small
    segformer(tensors, big)
    bisenet(tensors, big)
    masks(tensors)
    save_tensors(PARITY / "face_parsing.safetensors", tensors)


if __name__ == "__main__":
    main()
