"""One step of Interval Score Matching (ISM), with and without Perp-Neg, as LucidDreamer codes it
(EnVision-Research/LucidDreamer 2ecf093: guidance/sd_utils.py `train_step_perpneg`, `train_step`,
`add_noise_with_cfg`, `encode_imgs`; guidance/sd_step.py `ddim_step`; guidance/perpneg_utils.py
`weighted_perpendicular_aggregator`; train.py `get_pos_neg_text_embeddings`,
`adjust_text_embeddings`, `prepare_embeddings`), re-implemented here on the tiny SD model
(tests/fixtures/tiny-sd) with every random draw fixed: the flip, the posterior's noise, the offset
noise and the timestep indices. The renders' gradient comes from torch autograd through the VAE
encoder. Writes tests/fixtures/parity/ism.safetensors and ism.json for tests/ism.rs.

Settings are LucidDreamer's configs/stableid.yaml (guidance 7.5, lambda_guidance 0.1,
denoise_guidance_scale 1, xs_delta_t 200, xs_inv_steps 5, xs_eta 0; Perp-Neg negative_w -2,
front_decay_factor 2, side_decay_factor 10); each case below fixes what `draw` would draw.
"""
import json
import math

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from common import PARITY, TINY_SD, save_tensors, seed

PROMPT = "v1* v2* wearing a hat"
NEGATIVE = "unrealistic, blurry, low quality, out of focus"
INVERSE = ""
GUIDANCE_SCALE = 7.5
GRAD_SCALE = 0.1
XS_DELTA_T = 200
NEGATIVE_W, FRONT_DECAY, SIDE_DECAY = -2.0, 2.0, 10.0
HEIGHT, WIDTH = 32, 48  # 4 x 6 latents

# ind_t / ind_prev_t are indices into the flipped DDIM timesteps (timestep = index + steps_offset).
CASES = [
    # Three inversion steps to s (0 -> 200 -> 400 -> 550), then s -> t; views in both halves.
    dict(name="perp_neg", perp_neg=True, flip=False, ind_t=700, ind_prev_t=550, xs_inv_steps=5,
         azimuths=[10.0, -60.0, 135.0]),
    # ind_prev_t = 0: one inversion "step" of length 0; plain CFG on the view-interpolated prompt.
    dict(name="no_perp_neg", perp_neg=False, flip=True, ind_t=90, ind_prev_t=0, xs_inv_steps=5,
         azimuths=[-170.0, 45.0, 90.0]),
    # Fewer inversion steps than s needs: x_s starts from add_noise at index 550 - 2 x 200 = 150.
    dict(name="short_inversion", perp_neg=True, flip=True, ind_t=600, ind_prev_t=550, xs_inv_steps=2,
         azimuths=[-90.0, 179.0, 0.0]),
]


def ddim_step(scheduler, model_output, timestep, sample, delta_timestep):
    """sd_step.py `ddim_step` with eta 0 for an epsilon model: from `timestep` to
    `timestep - delta_timestep` (a negative delta inverts)."""
    prev_timestep = timestep - delta_timestep
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
    if scheduler.config.clip_sample:
        rng = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-rng, rng)
    # eta = 0: std_dev_t = 0, the whole remaining variance along the predicted noise.
    pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
    prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
    return torch.nan_to_num(prev_sample)


def add_noise_with_cfg(unet, scheduler, timesteps, latents, noise, ind_t, ind_prev_t, inverse_embeddings,
                       delta_t, inv_steps, is_noisy_latent=False):
    """sd_utils.py `add_noise_with_cfg` with cfg <= 1 (the inverse prompt only), eta 0: DDIM
    inversion from index `ind_prev_t` to `ind_t` in steps of `delta_t`, at most `inv_steps`."""
    if is_noisy_latent:
        prev_noisy_lat = latents
    else:
        prev_noisy_lat = scheduler.add_noise(latents, noise, timesteps[ind_prev_t])
    cur_ind_t, cur_noisy_lat = ind_prev_t, prev_noisy_lat
    pred_scores = []
    for _ in range(inv_steps):
        timestep_model_input = timesteps[cur_ind_t].reshape(1, 1).repeat(cur_noisy_lat.shape[0], 1).reshape(-1)
        unet_output = unet(cur_noisy_lat, timestep_model_input, encoder_hidden_states=inverse_embeddings).sample
        pred_scores.append((cur_ind_t, unet_output))
        next_ind_t = min(cur_ind_t + delta_t, ind_t)
        cur_t, next_t = timesteps[cur_ind_t], timesteps[next_ind_t]
        cur_noisy_lat = ddim_step(scheduler, unet_output, cur_t, cur_noisy_lat, -(next_t - cur_t))
        cur_ind_t = next_ind_t
        if cur_ind_t == ind_t:
            break
    return prev_noisy_lat, cur_noisy_lat, pred_scores[::-1]


def pos_neg_text_embeddings(embeddings, azimuth_val):
    """train.py `get_pos_neg_text_embeddings` (negative_w, decay factors of arguments/__init__.py)."""
    if -90 <= azimuth_val < 90:
        r = 1 - azimuth_val / 90 if azimuth_val >= 0 else 1 + azimuth_val / 90
        pos_z = r * embeddings["front"] + (1 - r) * embeddings["side"]
        text_z = torch.cat([pos_z, embeddings["front"], embeddings["side"]], dim=0)
        front_neg_w = 0.0 if r > 0.8 else math.exp(-r * FRONT_DECAY) * NEGATIVE_W
        side_neg_w = 0.0 if r < 0.2 else math.exp(-(1 - r) * SIDE_DECAY) * NEGATIVE_W
        weights = torch.tensor([1.0, front_neg_w, side_neg_w])
    else:
        r = 1 - (azimuth_val - 90) / 90 if azimuth_val >= 0 else 1 + (azimuth_val + 90) / 90
        pos_z = r * embeddings["side"] + (1 - r) * embeddings["back"]
        text_z = torch.cat([pos_z, embeddings["side"], embeddings["front"]], dim=0)
        front_neg_w = NEGATIVE_W
        side_neg_w = 0.0 if r > 0.8 else math.exp(-r * SIDE_DECAY) * NEGATIVE_W / 2
        weights = torch.tensor([1.0, side_neg_w, front_neg_w])
    return text_z, weights, r


def view_interpolated_embedding(embeddings, azimuth):
    """train.py's prompt for a view without Perp-Neg: front-side or side-back interpolation."""
    _, _, r = pos_neg_text_embeddings(embeddings, azimuth)
    start, end = ("front", "side") if -90 <= azimuth < 90 else ("side", "back")
    return r * embeddings[start] + (1 - r) * embeddings[end]


def perpendicular_component(x, y):
    return x - ((torch.mul(x, y).sum()) / max(torch.norm(y) ** 2, 1e-6)) * y


def weighted_perpendicular_aggregator(delta_noise_preds, weights, batch_size):
    """perpneg_utils.py, unchanged in substance."""
    delta_noise_preds = delta_noise_preds.split(batch_size, dim=0)
    weights = weights.split(batch_size, dim=0)
    assert torch.all(weights[0] == 1.0)
    main_positive = delta_noise_preds[0]
    accumulated_output = torch.zeros_like(main_positive)
    for i, complementary_noise_pred in enumerate(delta_noise_preds[1:], start=1):
        idx_non_zero = torch.abs(weights[i]) > 1e-4
        if sum(idx_non_zero) == 0:
            continue
        perp = torch.stack([perpendicular_component(complementary_noise_pred[j], main_positive[j])
                            for j in range(batch_size) if idx_non_zero[j]])
        accumulated_output[idx_non_zero] += weights[i][idx_non_zero].reshape(-1, 1, 1, 1) * perp
    return accumulated_output + main_positive


def ism_step(models, embeddings, case, images, vae_noise, noise):
    """`train_step_perpneg` (Perp-Neg) or `train_step` (without), ISM branch, one step; returns
    the latents' gradient, the renders' gradient and intermediates."""
    vae, unet, scheduler, timesteps = models
    B = images.shape[0]
    h, w = HEIGHT // 8, WIDTH // 8
    images = images.detach().requires_grad_(True)
    pred_rgb = images.flip(-1) if case["flip"] else images  # T.RandomHorizontalFlip, drawn once

    # encode_imgs: posterior.sample() = mean + std * randn, times the scaling factor.
    posterior = vae.encode(2 * pred_rgb - 1).latent_dist
    latents = (posterior.mean + posterior.std * vae_noise) * vae.config.scaling_factor

    # train.py: per view, [uncond, K prompts] stacked on dim 1 -> (1 + K, B, 77, D); weights (K, B).
    text_z_, weights_ = [], []
    for azimuth in case["azimuths"]:
        if case["perp_neg"]:
            text_z_comp, weights, _ = pos_neg_text_embeddings(embeddings, azimuth)
            weights_.append(weights)
        else:
            text_z_comp = view_interpolated_embedding(embeddings, azimuth)
        text_z_.append(torch.cat([embeddings["uncond"], text_z_comp], dim=0))
    text_embeddings = torch.stack(text_z_, dim=1)
    K = text_embeddings.shape[0] - 1
    text_embeddings = text_embeddings.reshape(-1, text_embeddings.shape[-2], text_embeddings.shape[-1])
    text_z_inverse = torch.cat([embeddings["uncond"], embeddings["inverse_text"]], dim=0)
    inverse_text_embeddings = text_z_inverse.unsqueeze(1).repeat(1, B, 1, 1).reshape(-1, *text_z_inverse.shape[-2:])
    # cfg <= 1: add_noise_with_cfg keeps the second half, the inverse prompt.
    inverse_only = inverse_text_embeddings.reshape(2, -1, *inverse_text_embeddings.shape[-2:])[1]

    ind_t, ind_prev_t = case["ind_t"], case["ind_prev_t"]
    current_delta_t = ind_t - ind_prev_t  # what the annealed interval gave (ind_prev_t >= 0 clamps)
    t, prev_t = timesteps[ind_t], timesteps[ind_prev_t]
    with torch.no_grad():
        xs_inv_steps = case["xs_inv_steps"]
        starting_ind = max(ind_prev_t - XS_DELTA_T * xs_inv_steps, 0)
        _, prev_latents_noisy, pred_scores_xs = add_noise_with_cfg(
            unet, scheduler, timesteps, latents.detach(), noise, ind_prev_t, starting_ind, inverse_only,
            XS_DELTA_T, xs_inv_steps)
        _, latents_noisy, pred_scores_xt = add_noise_with_cfg(
            unet, scheduler, timesteps, prev_latents_noisy, noise, ind_t, ind_prev_t, inverse_only,
            current_delta_t, 1, is_noisy_latent=True)
        pred_scores = pred_scores_xt + pred_scores_xs
        target = pred_scores[0][1]

        latent_model_input = latents_noisy[None].repeat(1 + K, 1, 1, 1, 1).reshape(-1, 4, h, w)
        tt = t.reshape(1, 1).repeat(latent_model_input.shape[0], 1).reshape(-1)
        unet_output = unet(latent_model_input, tt, encoder_hidden_states=text_embeddings).sample
        unet_output = unet_output.reshape(1 + K, -1, 4, h, w)
        noise_pred_uncond = unet_output[:1].reshape(-1, 4, h, w)
        noise_pred_text = unet_output[1:].reshape(-1, 4, h, w)
        if case["perp_neg"]:
            weights = torch.stack(weights_, dim=1).reshape(-1)
            delta_noise_preds = noise_pred_text - noise_pred_uncond.repeat(K, 1, 1, 1)
            delta_DSD = weighted_perpendicular_aggregator(delta_noise_preds, weights, B)
        else:
            delta_DSD = noise_pred_text - noise_pred_uncond

    pred_noise = noise_pred_uncond + GUIDANCE_SCALE * delta_DSD
    w_t = ((1 - scheduler.alphas_cumprod[t]) / scheduler.alphas_cumprod[t]) ** 0.5
    grad = w_t * (pred_noise - target)
    grad = torch.nan_to_num(GRAD_SCALE * grad)
    # SpecifyGradient: d loss / d latents = grad.
    (latents * grad.detach()).sum().backward()
    return {
        "latents": latents.detach(), "x_s": prev_latents_noisy, "x_t": latents_noisy, "target": target,
        "pred_noise": pred_noise, "latents_grad": grad, "images_grad": images.grad,
    }, int(t), int(prev_t)


def main():
    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_SD / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(TINY_SD / "text_encoder"))
    unet = UNet2DConditionModel.from_pretrained(str(TINY_SD / "unet"))
    vae = AutoencoderKL.from_pretrained(str(TINY_SD / "vae"))
    for model in (text_encoder, unet, vae):
        model.requires_grad_(False)
    scheduler = DDIMScheduler.from_pretrained(str(TINY_SD), subfolder="scheduler")
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    timesteps = torch.flip(scheduler.timesteps, dims=(0,))

    # StableIdentity's LucidDreamer: the identity written into the v1* v2* rows of the table.
    seed(13)
    identity = torch.randn(2, text_encoder.config.hidden_size)
    tokenizer.add_tokens(["v1*", "v2*"])
    text_encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(["v1*", "v2*"])] = identity

    def text_embeds(prompt):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            return text_encoder(ids)[0]

    embeddings = {"uncond": text_embeds([NEGATIVE]), "inverse_text": text_embeds(INVERSE)}
    for d in ["front", "side", "back"]:
        embeddings[d] = text_embeds([f"{PROMPT}, {d} view"])

    tensors = {"identity": identity}
    cases = []
    B = 3
    for i, case in enumerate(CASES):
        seed(100 + i)
        images = torch.rand(B, 3, HEIGHT, WIDTH)
        vae_noise = torch.randn(B, 4, HEIGHT // 8, WIDTH // 8)
        noise = torch.randn(B, 4, HEIGHT // 8, WIDTH // 8) + 0.1 * torch.randn(1, 4, 1, 1).repeat(B, 1, 1, 1)
        out, t, s = ism_step((vae, unet, scheduler, timesteps), embeddings, case, images, vae_noise, noise)
        name = case["name"]
        tensors[f"{name}.images"] = images
        tensors[f"{name}.vae_noise"] = vae_noise
        tensors[f"{name}.noise"] = noise
        for key, value in out.items():
            tensors[f"{name}.{key}"] = value
        cases.append({**case, "t": t, "s": s})
    save_tensors(PARITY / "ism.safetensors", tensors)
    (PARITY / "ism.json").write_text(json.dumps(
        {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": GUIDANCE_SCALE, "grad_scale": GRAD_SCALE,
         "xs_delta_t": XS_DELTA_T, "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
