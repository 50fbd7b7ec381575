//! Pipelines: what the frozen models produce for a user, with identities in the prompt
//! (text-to-image, steered by ControlNets or not; text-to-video; text-to-3D with its ISM guidance).
//! Each composes the shared components ([`crate::models::stable_diffusion`],
//! [`crate::models::text_to_video`]) with a scheduler; none loads a model itself.

pub mod control;
pub mod ism;
pub mod text_to_3d;
pub mod text_to_image;
pub mod text_to_video;

use candle_core::{Device, Shape, Tensor};
use rand::SeedableRng;

use crate::identity::{token_table_digest, Identity, TOKEN_TABLE_KEY};
use crate::models::stable_diffusion::PromptEncoder;
use crate::random::standard_normal;
use crate::tokenizer::placeholder_token;
use crate::{Error, Result};

pub use text_to_image::{generate, generate_unless_stopped, read_latents, GenerateRequest, Generated};
pub use text_to_video::{generate_video, generate_video_unless_stopped, GeneratedVideo, VideoRequest};

/// Text-encoder features (1, 77, hidden) of `prompt`: in it, `v1* v2*` stand for the first
/// identity, `v3* v4*` for the second, and so on.
pub fn encode_prompt(model: &impl AsRef<PromptEncoder>, prompt: &str, identities: &[Identity]) -> Result<Tensor> {
    let sd = model.as_ref();
    let ids = sd.prompt_ids(prompt)?;
    if ids.identities_used > identities.len() {
        let needed = placeholder_token(2 * ids.identities_used - 1);
        let problem = if identities.is_empty() {
            format!("the prompt uses identity placeholders (up to {needed}) but no identity was given")
        } else {
            format!(
                "the prompt uses {needed}, which needs {} identities: give one per v1* v2* pair",
                ids.identities_used
            )
        };
        return Err(Error::setting("identities", identities.len(), problem));
    }
    sd.encode_ids(&ids, identity_rows(sd, identities)?.as_ref())
}

/// The text features of a denoising loop: those of `prompt`, preceded, when `guided`, by those of
/// `negative_prompt` (the unconditional branch of classifier-free guidance), batch 1 or 2.
pub fn guidance_context(
    model: &impl AsRef<PromptEncoder>,
    prompt: &str,
    negative_prompt: &str,
    identities: &[Identity],
    guided: bool,
) -> Result<Tensor> {
    let cond = encode_prompt(model, prompt, identities)?;
    if !guided {
        return Ok(cond);
    }
    let uncond = encode_prompt(model, negative_prompt, identities)?;
    Ok(Tensor::cat(&[uncond, cond], 0)?)
}

/// The noise prediction of a step: with guidance, `uncond + scale (text - uncond)` from the batch
/// of 2 the [`guidance_context`] gave; without, the prediction itself.
pub fn guide(noise_pred: Tensor, guided: bool, scale: f64) -> Result<Tensor> {
    if !guided {
        return Ok(noise_pred);
    }
    let uncond = noise_pred.narrow(0, 0, 1)?;
    let text = noise_pred.narrow(0, 1, 1)?;
    Ok((&uncond + ((text - &uncond)? * scale)?)?)
}

/// Standard normal noise of `shape` from `seed`: the same seed gives the same image or video on
/// any machine.
pub fn gaussian_noise(shape: impl Into<Shape>, seed: u64, device: &Device) -> Result<Tensor> {
    standard_normal(shape, &mut rand::rngs::StdRng::seed_from_u64(seed), device)
}

/// The identities that were learned on a text encoder whose token-embedding table differs from
/// `model`'s ([`Identity::learned_on`]): they may not look like their person here. Identities that
/// do not record their encoder are not listed.
pub fn identities_from_other_encoders<'a>(
    model: &impl AsRef<PromptEncoder>,
    identities: &'a [Identity],
) -> Result<Vec<&'a Identity>> {
    if identities.iter().all(|i| !i.metadata.contains_key(TOKEN_TABLE_KEY)) {
        return Ok(Vec::new());
    }
    let digest = token_table_digest(model.as_ref().text_encoder().token_embedding())?;
    Ok(identities.iter().filter(|i| i.learned_on(&digest) == Some(false)).collect())
}

/// One warning for each identity learned on a text encoder whose token embeddings differ from
/// `model`'s (`model_name`) ([`identities_from_other_encoders`]): shown, never refused, since the
/// identity still works there, only less recognisably.
pub fn other_encoder_warnings(
    model: &impl AsRef<PromptEncoder>,
    identities: &[Identity],
    model_name: &str,
) -> Result<Vec<String>> {
    Ok(identities_from_other_encoders(model, identities)?
        .into_iter()
        .map(|identity| {
            format!(
                "identity {} was learned on another text encoder than {model_name}'s (their token embeddings \
                 differ): the person may not be recognisable",
                identity.source.display()
            )
        })
        .collect())
}

/// Refuses identities whose vectors are not `text_width` wide (learned for another model family):
/// a cheap check, before `model_name` loads.
pub fn check_identity_widths(identities: &[Identity], text_width: usize, model_name: &str) -> Result<()> {
    for identity in identities {
        if identity.width() != text_width {
            return Err(Error::Input(format!(
                "identity {} has {}-wide vectors but {model_name}'s text encoder is {text_width} wide: it was \
                 learned for another model",
                identity.source.display(),
                identity.width(),
            )));
        }
    }
    Ok(())
}

/// The identities' vectors stacked (2 x n, hidden), each checked against the text encoder's width.
fn identity_rows(sd: &PromptEncoder, identities: &[Identity]) -> Result<Option<Tensor>> {
    if identities.is_empty() {
        return Ok(None);
    }
    for identity in identities {
        if identity.width() != sd.text_width() {
            return Err(Error::Input(format!(
                "identity {} has {}-wide vectors but this model's text encoder is {} wide: it was learned for another model",
                identity.source.display(),
                identity.width(),
                sd.text_width()
            )));
        }
    }
    let rows: Vec<&Tensor> = identities.iter().map(|i| &i.embeddings).collect();
    Ok(Some(Tensor::cat(&rows, 0)?))
}
