"""Dense reference renderer for 3D Gaussian splatting, and the fixtures of tests/splats.rs.

Every Gaussian against every pixel, depth-sorted cumulative product, in float64, with the
constants of Inria's diff-gaussian-rasterization (alpha = min(0.99, o exp(power)), skip alpha <
1/255, stop before T < 1e-4, 0.3 low-pass, 1.3 x fov clamp, 3-sigma radius and 16x16 tile
rectangles, near culling) and LucidDreamer's depth output sum(depth alpha T). The projection
mirrors gsplat's _torch_impl.py (_quat_scale_to_covar_preci, _persp_proj,
_fully_fused_projection). Outputs [5, H, W]: colour C + T bg, depth, final transmittance.
Also writes a PLY with 3DGS's own format code (GaussianModel.save_ply, via plyfile).
"""
import math

import numpy as np
import torch
from plyfile import PlyData, PlyElement
from safetensors.torch import save_file

from common import FIXTURES, REPO

OUT = FIXTURES / "splats"
TILE = 16
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = [1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396]
SH_C3 = [-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435]


def quat_to_rotmat(q):  # [N, 4] (w, x, y, z) -> [N, 3, 3]
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


def sh_colors(means, sh_dc, sh_rest, campos):  # -> [N, 3]
    color = SH_C0 * sh_dc
    if sh_rest is not None:
        d = means - campos
        x, y, z = (d / d.norm(dim=-1, keepdim=True)).unbind(-1)
        xx, yy, zz = x * x, y * y, z * z
        basis = [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
        if sh_rest.shape[1] >= 8:
            basis += [SH_C2[0] * x * y, SH_C2[1] * y * z, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * x * z,
                      SH_C2[4] * (xx - yy)]
        if sh_rest.shape[1] >= 15:
            basis += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * x * y * z, SH_C3[2] * y * (4 * zz - xx - yy),
                      SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                      SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
        color = color + (torch.stack(basis, 1)[:, :, None] * sh_rest).sum(1)
    return torch.clamp(color + 0.5, min=0.0)


def render(means, log_scales, quats, opacity_logits, sh_dc, sh_rest, cam, background, near=0.2):
    R, t = cam["R"], cam["t"]  # world to camera: x_cam = R x + t
    W, H = cam["width"], cam["height"]
    fx = W / (2 * math.tan(cam["fov_x"] / 2))
    fy = H / (2 * math.tan(cam["fov_y"] / 2))
    cx, cy = W / 2, H / 2
    # _quat_scale_to_covar_preci and _world_to_cam.
    M = quat_to_rotmat(quats) * torch.exp(log_scales)[:, None, :]  # R S
    covar = M @ M.transpose(1, 2)
    means_c = means @ R.T + t
    covar_c = R @ covar @ R.T
    tx, ty, depth = means_c.unbind(-1)
    visible = depth > near
    tz = torch.where(visible, depth, torch.ones_like(depth))
    # _persp_proj with the 1.3 fov clamp (cx = W / 2, so the limits are symmetric).
    lim_x = 1.3 * math.tan(cam["fov_x"] / 2)
    lim_y = 1.3 * math.tan(cam["fov_y"] / 2)
    txc = tz * torch.clamp(tx / tz, -lim_x, lim_x)
    tyc = tz * torch.clamp(ty / tz, -lim_y, lim_y)
    O = torch.zeros_like(tz)
    J = torch.stack([fx / tz, O, -fx * txc / tz ** 2, O, fy / tz, -fy * tyc / tz ** 2], -1).reshape(-1, 2, 3)
    cov2d = J @ covar_c @ J.transpose(1, 2) + 0.3 * torch.eye(2, dtype=means.dtype)
    a, b, c = cov2d[:, 0, 0], cov2d[:, 0, 1], cov2d[:, 1, 1]
    det = a * c - b * b
    conic = torch.stack([c / det, -b / det, a / det], -1)
    mean2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], -1)
    opacity = torch.sigmoid(opacity_logits)
    color = sh_colors(means, sh_dc, sh_rest, cam["campos"])
    # Inria's radius and tile rectangle (pixel centres at integers there, +0.5 here).
    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.1))
        radius = torch.ceil(3 * torch.sqrt(lam))
        px, py = mean2d[:, 0] - 0.5, mean2d[:, 1] - 0.5
        gx, gy = math.ceil(W / TILE), math.ceil(H / TILE)
        x0 = torch.clamp(torch.floor((px - radius) / TILE), 0, gx)
        x1 = torch.clamp(torch.floor((px + radius + TILE - 1) / TILE), 0, gx)
        y0 = torch.clamp(torch.floor((py - radius) / TILE), 0, gy)
        y1 = torch.clamp(torch.floor((py + radius + TILE - 1) / TILE), 0, gy)
        drawn = visible & (x0 < x1) & (y0 < y1) & (radius > 0)
    # Dense: [P, N] with Gaussians sorted by depth.
    order = torch.argsort(depth.detach(), stable=True)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=means.dtype), torch.arange(W, dtype=means.dtype), indexing="ij")
    xs, ys = xs.reshape(-1, 1), ys.reshape(-1, 1)
    tile_x, tile_y = torch.floor(xs / TILE), torch.floor(ys / TILE)
    o = order
    dx = mean2d[o, 0][None] - (xs + 0.5)
    dy = mean2d[o, 1][None] - (ys + 0.5)
    A, B, C = conic[o, 0][None], conic[o, 1][None], conic[o, 2][None]
    power = -0.5 * (A * dx * dx + C * dy * dy) - B * dx * dy
    alpha = torch.clamp(opacity[o][None] * torch.exp(power), max=0.99)
    in_tile = (tile_x >= x0[o][None]) & (tile_x < x1[o][None]) & (tile_y >= y0[o][None]) & (tile_y < y1[o][None])
    used = drawn[o][None] & in_tile & (power <= 0) & (alpha >= 1 / 255)
    alpha = torch.where(used, alpha, torch.zeros_like(alpha))
    t_incl = torch.cumprod(1 - alpha, dim=1)
    kept = (t_incl >= 1e-4).to(alpha.dtype).detach()  # compositing stops before T < 1e-4
    alpha = alpha * kept
    t_incl = torch.cumprod(1 - alpha, dim=1)
    t_excl = torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], 1)
    weight = alpha * t_excl
    rgb = weight @ color[o] + t_incl[:, -1:] * background[None]
    dep = weight @ depth[o][:, None]
    image = torch.cat([rgb, dep, t_incl[:, -1:]], 1)  # [P, 5]
    return image.T.reshape(5, H, W), radius * drawn


def look_at(eye, target, up):
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    f = (target - eye) / np.linalg.norm(target - eye)
    r = np.cross(f, up); r /= np.linalg.norm(r)
    d = np.cross(f, r)
    R = np.stack([r, d, f])
    return R, -R @ eye


def scene(seed, n, width, height, sh_rest_k, scale=0.08, opaque=False):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    means = (rand(n, 3) - 0.5) * torch.tensor([3.0, 2.4, 3.0], dtype=torch.float64)
    # Some behind the camera, some at the near plane, some outside the image borders.
    means[: n // 20, 2] = -6.0 + rand(n // 20)
    means[n // 20: n // 10, 0] = 2.2 + rand(n // 20)
    log_scales = math.log(scale) + 0.6 * randn(n, 3)
    quats = randn(n, 4)
    opacity_logits = 1.5 * randn(n)
    opacity_logits[n // 10: n // 6] = 6.0  # near-opaque (alpha hits the 0.99 clamp)
    if opaque:  # layers of opaque Gaussians: compositing stops before T < 1e-4
        opacity_logits = 3.0 + 2.0 * rand(n)
    sh_dc = randn(n, 3)
    sh_rest = 0.3 * randn(n, sh_rest_k, 3) if sh_rest_k else None
    eye = [0.4, -0.3, -4.0]
    R, t = look_at(eye, [0.0, 0.0, 0.0], [0.0, -1.0, 0.0])
    fov_y = 0.9
    fov_x = 2 * math.atan(math.tan(fov_y / 2) * width / height)
    cam = dict(R=torch.tensor(R), t=torch.tensor(t), width=width, height=height, fov_x=fov_x, fov_y=fov_y,
               campos=torch.tensor(eye, dtype=torch.float64))
    params = dict(means=means, log_scales=log_scales, quats=quats, opacity_logits=opacity_logits, sh_dc=sh_dc)
    if sh_rest is not None:
        params["sh_rest"] = sh_rest
    return params, cam


def fixture(name, seed, n, width, height, sh_rest_k, **kind):
    params, cam = scene(seed, n, width, height, sh_rest_k, **kind)
    for p in params.values():
        p.requires_grad_(True)
    background = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    image, radii = render(params["means"], params["log_scales"], params["quats"], params["opacity_logits"],
                          params["sh_dc"], params.get("sh_rest"), cam, background)
    # A fixed random linear loss; its gradients are the fixture's.
    weights = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (image * weights).sum().backward()
    out = {k: v.detach() for k, v in params.items()}
    out.update({f"grad_{k}": v.grad for k, v in params.items()})
    out.update(image=image.detach(), radii=radii, loss_weights=weights, background=background,
               camera_R=cam["R"], camera_t=cam["t"],
               camera_fov=torch.tensor([cam["fov_x"], cam["fov_y"]], dtype=torch.float64))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path),
              metadata=dict(width=str(width), height=str(height)))
    drawn = int((radii > 0).sum())
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KiB; {drawn}/{n} Gaussians drawn, "
          f"{int((image[4] < 1e-3).sum())} of {width * height} pixels with T < 1e-3)")


def save_ply_3dgs(path, xyz, f_dc, f_rest, opacities, scale, rotation):
    """gaussian-splatting/scene/gaussian_model.py GaussianModel.save_ply, on arrays:
    f_dc [N, 1, 3] and f_rest [N, K, 3] transposed to channel-major as 3DGS stores them."""
    normals = np.zeros_like(xyz)
    f_dc = f_dc.transpose(0, 2, 1).reshape(len(xyz), -1)
    f_rest = f_rest.transpose(0, 2, 1).reshape(len(xyz), -1)
    names = ['x', 'y', 'z', 'nx', 'ny', 'nz']
    names += [f'f_dc_{i}' for i in range(f_dc.shape[1])] + [f'f_rest_{i}' for i in range(f_rest.shape[1])]
    names += ['opacity'] + [f'scale_{i}' for i in range(scale.shape[1])] + [f'rot_{i}' for i in range(rotation.shape[1])]
    elements = np.empty(xyz.shape[0], dtype=[(name, 'f4') for name in names])
    attributes = np.concatenate((xyz, normals, f_dc, f_rest, opacities, scale, rotation), axis=1)
    elements[:] = list(map(tuple, attributes))
    PlyData([PlyElement.describe(elements, 'vertex')]).write(str(path))


def ply_fixture():
    rng = np.random.default_rng(7)
    n = 6
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    f_dc = rng.normal(size=(n, 1, 3)).astype(np.float32)
    f_rest = rng.normal(size=(n, 3, 3)).astype(np.float32)  # degree 1
    opacities = rng.normal(size=(n, 1)).astype(np.float32)
    scale = rng.normal(size=(n, 3)).astype(np.float32)
    rotation = rng.normal(size=(n, 4)).astype(np.float32)
    save_ply_3dgs(OUT / "gaussian_model.ply", xyz, f_dc, f_rest, opacities, scale, rotation)
    save_file({"means": torch.from_numpy(xyz), "sh_dc": torch.from_numpy(f_dc[:, 0]),
               "sh_rest": torch.from_numpy(f_rest), "opacity_logits": torch.from_numpy(opacities[:, 0]),
               "log_scales": torch.from_numpy(scale), "rotations": torch.from_numpy(rotation)},
              str(OUT / "gaussian_model.safetensors"))
    print("wrote tests/fixtures/splats/gaussian_model.{ply,safetensors}")

def bench(n, side, views=4, repeats=3):
    """Times the dense renderer's forward + backward on the scene `stableid bench --only splat`
    measures (Gaussians in a ball of radius 0.5, opacity 0.1, cameras at 3.5), float32, CPU."""
    import time
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4 * n, 3, generator=g) - 0.5
    means = p[(p * p).sum(1) <= 0.25][:n].double()
    spacing = (math.pi / 6 / n) ** (1 / 3)
    params = dict(means=means, log_scales=torch.full((n, 3), math.log(spacing), dtype=torch.float64),
                  quats=torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64).repeat(n, 1),
                  opacity_logits=torch.full((n,), math.log(0.1 / 0.9), dtype=torch.float64),
                  sh_dc=(torch.rand(n, 3, generator=g) * 3.4 - 1.7).double())
    params = {k: v.float().requires_grad_(True) for k, v in params.items()}
    cams = []
    for view in range(views):
        az, el = math.radians(360 * view / views), math.radians(15)
        eye = [3.5 * math.cos(el) * math.cos(az), 3.5 * math.cos(el) * math.sin(az), 3.5 * math.sin(el)]
        R, t = look_at(eye, [0, 0, 0], [0, 0, 1])
        cams.append(dict(R=torch.tensor(R).float(), t=torch.tensor(t).float(), width=side, height=side,
                         fov_x=0.55, fov_y=0.55, campos=torch.tensor(eye).float()))
    bg = torch.zeros(3)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for cam in cams:
            image, _ = render(params["means"], params["log_scales"], params["quats"], params["opacity_logits"],
                              params["sh_dc"], None, cam, bg)
            (image[:3] - 0.5).abs().mean().backward()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"dense reference, {n} Gaussians, {side}x{side}, {views} views, forward + backward: "
          f"median {times[len(times) // 2]:.3f} s ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 4 and sys.argv[1] == "--bench":  # splat.py --bench N SIDE
        bench(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit()
    fixture("mixed", seed=1, n=300, width=37, height=29, sh_rest_k=0)
    fixture("sh3", seed=2, n=120, width=33, height=21, sh_rest_k=15)
    fixture("opaque", seed=3, n=200, width=23, height=19, sh_rest_k=3, scale=0.25, opaque=True)
    ply_fixture()
