//! The metric models together, and what they make of a photo and of the images of an identity:
//! the scores of [`crate::eval::metrics`], and the Inception features FID compares.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::eval::faces::{largest_face_crop, FaceCrop};
use crate::eval::metrics::{face_pairs, ImageScores, MetricRow, PairScores};
use crate::eval::{clip_pixels, levels_tensor, similarity_percent};
use crate::models::clip::{ClipConfig, ClipModel};
use crate::models::facenet::{fixed_image_standardization, InceptionResnetV1};
use crate::models::inception::FidInceptionV3;
use crate::models::lpips::Lpips;
use crate::priors::align::FaceDetector;
use crate::tokenizer::{placeholder_token, ClipTokenizer};
use crate::weights::{transformers_weights, weights_file, Hub, ModelFiles, TRANSFORMERS_WEIGHTS};
use crate::{Error, Result};

/// CLIP the DreamBooth protocol (and so the paper's tables) uses.
pub const DEFAULT_CLIP: &str = "openai/clip-vit-base-patch32";
/// facenet-pytorch's VGGFace2 `InceptionResnetV1` checkpoint, and where it is published.
pub const FACENET_FILE: &str = "20180402-114759-vggface2.pt";
pub const FACENET_SOURCE: &str = "facenet-pytorch's GitHub release v2.2.9 (107 MB)";
/// torchvision's AlexNet (LPIPS' backbone), and where it is published.
pub const ALEXNET_FILE: &str = "alexnet-owt-7be5be79.pth";
pub const ALEXNET_SOURCE: &str = "torchvision's model downloads (244 MB)";
/// pytorch-fid's Inception-v3, and where it is published.
pub const INCEPTION_FILE: &str = "pt_inception-2015-12-05-6726825d.pth";
pub const INCEPTION_SOURCE: &str = "pytorch-fid's GitHub release fid_weights (92 MB)";

/// What CLIP-T compares an image with: its prompt with the identity's placeholder pair `v1* v2*`
/// read as "a person", as the published test notebook names its images.
pub fn clip_t_text(prompt: &str) -> String {
    prompt.replace(&format!("{} {}", placeholder_token(0), placeholder_token(1)), "a person")
}

/// Where the metric models' weights are.
#[derive(Debug, Clone)]
pub struct MetricWeights {
    /// A transformers `CLIPModel` folder (with its tokenizer files), or a hub id in the hub cache.
    pub clip: String,
    pub facenet: PathBuf,
    pub alexnet: PathBuf,
    /// Inception-v3 for FID; `None`: no FID.
    pub inception: Option<PathBuf>,
}

/// Seconds spent per stage, in the order the stages first ran (a JSON object in the report).
#[derive(Debug, Clone, Default)]
pub struct Timings(pub Vec<(String, f64)>);

impl Timings {
    /// Runs `f`, adding its time to `stage`.
    pub fn time<T>(&mut self, stage: &str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.add(stage, start.elapsed().as_secs_f64());
        out
    }

    pub fn add(&mut self, stage: &str, seconds: f64) {
        match self.0.iter_mut().find(|(s, _)| s == stage) {
            Some((_, total)) => *total += seconds,
            None => self.0.push((stage.to_string(), seconds)),
        }
    }

    /// Adds every stage of `other`.
    pub fn merge(&mut self, other: &Timings) {
        for (stage, seconds) in &other.0 {
            self.add(stage, *seconds);
        }
    }
}

/// The models of the metrics, with the face detector that finds their faces.
pub struct MetricModels {
    pub clip: ClipModel,
    pub tokenizer: ClipTokenizer,
    pub facenet: InceptionResnetV1,
    pub lpips: Lpips,
    pub inception: Option<FidInceptionV3>,
    pub detector: FaceDetector,
    pub device: Device,
}

/// What the models make of the input photo: the reference of CLIP-I and Face Sim.
pub struct PhotoFeatures {
    /// (1, projection_dim).
    pub clip: Tensor,
    /// (1, 512).
    pub face: Tensor,
    pub crop: FaceCrop,
}

/// One image to score and the prompt it was made from.
pub struct EvalImage {
    pub file: String,
    /// Index into the prompts.
    pub prompt: usize,
    pub image: RgbImage,
}

/// The scores of one identity's images.
pub struct ScoredImages {
    pub images: Vec<ImageScores>,
    pub pairs: Vec<PairScores>,
    /// One row per prompt, then the mean row (its FID not yet set).
    pub prompts: Vec<MetricRow>,
    pub mean: MetricRow,
    /// The images' face crops, in image order (`None`: no face).
    pub faces: Vec<Option<FaceCrop>>,
}

/// Images per batch through each network.
const BATCH: usize = 8;

impl MetricModels {
    /// Loads the models (f32) on `device`, CLIP from a folder or through `hub`; the detector runs
    /// on the CPU.
    pub fn load(weights: &MetricWeights, hub: &Hub, device: &Device) -> Result<Self> {
        let clip_files = ModelFiles::new("CLIP model", DEFAULT_CLIP)
            .file("config.json")
            .file("vocab.json")
            .file("merges.txt")
            .optional("tokenizer_config.json")
            .optional("special_tokens_map.json")
            .weights(TRANSFORMERS_WEIGHTS.map(String::from));
        let clip_dir = hub.resolve(&weights.clip, &clip_files)?;
        let config: ClipConfig = crate::io::read_json(&clip_dir.join("config.json"))?;
        let clip =
            transformers_weights(&clip_dir, DType::F32, device, "CLIP")?.0.build(|vb| ClipModel::new(vb, &config))?;
        let tokenizer = ClipTokenizer::from_dir(&clip_dir)?;
        let checkpoint = |path: &Path, what: &str| {
            if path.is_file() {
                weights_file(path, DType::F32, device)
            } else {
                Err(Error::MissingFile { what: what.into(), path: path.to_path_buf(), hint: "no such file".into() })
            }
        };
        let facenet = checkpoint(&weights.facenet, "FaceNet weights")?.build(InceptionResnetV1::new)?;
        let heads = Lpips::shipped_heads(DType::F32, device)?;
        let lpips = checkpoint(&weights.alexnet, "AlexNet weights")?.build(|vb| Lpips::new(vb, heads))?;
        let inception = match &weights.inception {
            Some(path) => Some(checkpoint(path, "Inception-v3 weights")?.build(FidInceptionV3::new)?),
            None => None,
        };
        Ok(Self {
            clip,
            tokenizer,
            facenet,
            lpips,
            inception,
            detector: FaceDetector::shipped(&Device::Cpu)?,
            device: device.clone(),
        })
    }

    fn clip_image_size(&self) -> u32 {
        self.clip.config().vision_config.image_size as u32
    }

    /// CLIP image features (n, dim) of `images`.
    fn clip_images<'a>(&self, images: impl Iterator<Item = &'a RgbImage>) -> Result<Tensor> {
        let size = self.clip_image_size();
        let pixels =
            images.map(|image| clip_pixels(image, size, &self.device)).collect::<candle_core::Result<Vec<_>>>()?;
        batched(&pixels, |batch| self.clip.image_features(batch))
    }

    /// FaceNet embeddings (n, 512) of face crops.
    fn facenet<'a>(&self, crops: impl Iterator<Item = &'a RgbImage>) -> Result<Tensor> {
        let inputs = crops
            .map(|crop| fixed_image_standardization(&levels_tensor(crop, &self.device)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        batched(&inputs, |batch| self.facenet.forward(batch))
    }

    /// The photo's CLIP features and face; an input error when no face is found in it.
    pub fn photo_features(&self, photo: &RgbImage, path: &Path) -> Result<PhotoFeatures> {
        let crop = largest_face_crop(&self.detector, photo)?.ok_or_else(|| {
            Error::Face(format!(
                "no face found in the photo {}: Face Sim compares the generated faces with it; use a photo where \
                 the face is clearly visible",
                path.display()
            ))
        })?;
        Ok(PhotoFeatures {
            clip: self.clip_images(std::iter::once(photo))?,
            face: self.facenet(std::iter::once(&crop.crop))?,
            crop,
        })
    }

    /// CLIP text features (n, dim) of the prompts as CLIP-T reads them ([`clip_t_text`]).
    fn clip_texts(&self, prompts: &[String]) -> Result<Tensor> {
        let ids = prompts.iter().map(|p| self.tokenizer.encode(&clip_t_text(p)).ids).collect::<Vec<_>>();
        let (n, len) = (ids.len(), self.tokenizer.max_length());
        let ids = Tensor::from_vec(ids.concat(), (n, len), &self.device)?;
        Ok(self.clip.text_features(&ids)?)
    }

    /// Scores `images` (made from `prompts`) against `photo`; `on_image(done, total)` after each
    /// image's face search. Images without a face are counted, not an error.
    pub fn score(
        &self,
        photo: &PhotoFeatures,
        prompts: &[String],
        images: &[EvalImage],
        timings: &mut Timings,
        on_image: &mut dyn FnMut(usize, usize),
    ) -> Result<ScoredImages> {
        if let Some(bad) = images.iter().find(|i| i.prompt >= prompts.len()) {
            return Err(Error::Internal(format!("image {} has prompt {} of {}", bad.file, bad.prompt, prompts.len())));
        }
        let faces = timings.time("face detection", || {
            images
                .iter()
                .enumerate()
                .map(|(i, image)| {
                    let crop = largest_face_crop(&self.detector, &image.image);
                    on_image(i + 1, images.len());
                    crop
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let (clip_i, clip_t) = timings.time("CLIP", || -> Result<_> {
            let features = self.clip_images(images.iter().map(|i| &i.image))?;
            let texts = self.clip_texts(prompts)?;
            let index = Tensor::from_vec(images.iter().map(|i| i.prompt as u32).collect(), images.len(), &self.device)?;
            let photo = photo.clip.broadcast_as(features.shape())?;
            Ok((
                similarity_percent(&features, &photo)?,
                similarity_percent(&features, &texts.index_select(&index, 0)?)?,
            ))
        })?;
        let face_sim = timings.time("FaceNet", || -> Result<Vec<Option<f32>>> {
            let crops: Vec<&RgbImage> = faces.iter().flatten().map(|f| &f.crop).collect();
            if crops.is_empty() {
                return Ok(vec![None; images.len()]);
            }
            let embeddings = self.facenet(crops.into_iter())?;
            let mut sims = similarity_percent(&embeddings, &photo.face.broadcast_as(embeddings.shape())?)?.into_iter();
            Ok(faces.iter().map(|f| f.as_ref().and_then(|_| sims.next())).collect())
        })?;
        let scores: Vec<ImageScores> = images
            .iter()
            .enumerate()
            .map(|(i, image)| ImageScores {
                file: image.file.clone(),
                prompt: image.prompt,
                clip_i: clip_i[i],
                clip_t: clip_t[i],
                face_sim: face_sim[i],
            })
            .collect();
        let pairs = timings.time("LPIPS", || -> Result<Vec<PairScores>> {
            face_pairs(&scores)
                .into_iter()
                .map(|(a, b)| {
                    let lpips_input = |i: usize| -> Result<Tensor> {
                        let crop = &faces[i].as_ref().expect("pairs have faces").crop;
                        Ok(((levels_tensor(crop, &self.device)? / 127.5)? - 1.0)?)
                    };
                    let distance = self.lpips.forward(&lpips_input(a)?, &lpips_input(b)?)?;
                    Ok(PairScores::new(&scores, a, b, distance.to_vec1::<f32>()?[0]))
                })
                .collect()
        })?;
        let rows = (0..prompts.len()).map(|p| MetricRow::of_prompt(&scores, &pairs, p)).collect();
        let mean = MetricRow::of(scores.iter(), pairs.iter());
        Ok(ScoredImages { images: scores, pairs, prompts: rows, mean, faces })
    }

    /// The Inception features (n, 2048) of `images`; an error when the models were loaded without
    /// Inception.
    pub fn fid_features<'a>(&self, images: impl Iterator<Item = &'a RgbImage>) -> Result<Tensor> {
        let inception = self
            .inception
            .as_ref()
            .ok_or_else(|| Error::Internal("FID features asked of metric models loaded without Inception".into()))?;
        let inputs =
            images.map(|image| levels_tensor(image, &self.device)? / 255.0).collect::<candle_core::Result<Vec<_>>>()?;
        // Images of different sizes: each is resized to 299 inside the network, one at a time.
        let features = inputs.iter().map(|x| inception.forward(x)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&features, 0)?)
    }
}

/// `forward` on `inputs` (each (1, ...), all the same size) in batches of [`BATCH`], concatenated.
fn batched(inputs: &[Tensor], forward: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Tensor> {
    let outputs =
        inputs.chunks(BATCH).map(|chunk| forward(&Tensor::cat(chunk, 0)?)).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&outputs, 0)?)
}
