//! The OpenPose body network (Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part
//! Affinity Fields", CVPR 2017) as controlnet_aux 0.0.10 has it (`open_pose/model.py`,
//! `bodypose_model`, a port of CMU's Caffe model): a VGG-19 trunk cut after `conv4_2` with two CPM
//! layers, then six stages of two branches each, L1 (38 part-affinity-field channels: x and y of
//! 19 limbs) and L2 (19 heat maps: 18 keypoints and the background). Every stage after the first
//! reads the previous stage's two outputs and the trunk's features (38 + 19 + 128 = 185 channels).
//!
//! Parameter names are those of `body_pose_model.pth` (lllyasviel/Annotators), which stores the
//! layers without their block: `conv1_1.weight`, `conv5_1_CPM_L1.weight`,
//! `Mconv1_stage2_L2.bias`, ... A conversion that kept the state dict's block prefixes
//! (`model0.conv1_1.weight`, `model2_1.Mconv1_stage2_L1.weight`) loads too.
//!
//! One quirk is kept on purpose: controlnet_aux lists `Mconv7_stage6_L1` twice among the layers
//! without a ReLU and never `Mconv7_stage6_L2`, so the final heat maps pass through a ReLU.
//!
//! The weights are CMU's, licensed for non-commercial research only (controlnet_aux ships the
//! licence as `open_pose/LICENSE`); this tool never bundles nor downloads them.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{Conv2d, Conv2dConfig};

/// A convolution of the network, `relu` after it or not.
#[derive(Debug, Clone)]
struct Layer {
    conv: Conv2d,
    relu: bool,
}

/// `(name, in, out, kernel, relu)` of one layer; padding is `kernel / 2`.
type LayerSpec = (String, usize, usize, usize, bool);

/// Layers and 2x2 max pools in order, as one `nn.Sequential` of controlnet_aux.
#[derive(Debug, Clone)]
enum Step {
    Conv(Layer),
    Pool,
}

#[derive(Debug, Clone)]
struct Block {
    steps: Vec<Step>,
}

impl Block {
    /// `specs` in order; `None` stands for a 2x2 max pool of stride 2.
    fn new(vb: &VarBuilder, prefix: &str, specs: Vec<Option<LayerSpec>>) -> Result<Self> {
        let vb = if prefix.is_empty() { vb.clone() } else { vb.pp(prefix) };
        let steps = specs
            .into_iter()
            .map(|spec| match spec {
                None => Ok(Step::Pool),
                Some((name, c_in, c_out, kernel, relu)) => {
                    let config = Conv2dConfig { padding: kernel / 2, stride: 1 };
                    Ok(Step::Conv(Layer { conv: Conv2d::new(vb.pp(name), c_in, c_out, kernel, config)?, relu }))
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self { steps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for step in &self.steps {
            x = match step {
                Step::Pool => x.max_pool2d(2)?,
                Step::Conv(layer) => {
                    let y = layer.conv.forward(&x)?;
                    if layer.relu {
                        y.relu()?
                    } else {
                        y
                    }
                }
            };
        }
        Ok(x)
    }
}

fn layer(name: &str, c_in: usize, c_out: usize, kernel: usize, relu: bool) -> Option<LayerSpec> {
    Some((name.to_string(), c_in, c_out, kernel, relu))
}

/// Channels of the part affinity fields (branch L1) and of the heat maps (branch L2).
pub const PAF_CHANNELS: usize = 38;
pub const HEATMAP_CHANNELS: usize = 19;
/// Channels of the trunk's features, which every stage after the first reads again.
const FEATURE_CHANNELS: usize = 128;
/// The network's output has one cell per `STRIDE` x `STRIDE` input pixels.
pub const STRIDE: usize = 8;

/// controlnet_aux's `bodypose_model`.
#[derive(Debug, Clone)]
pub struct BodyPoseModel {
    /// `model0`: the VGG trunk and `conv4_3_CPM`, `conv4_4_CPM`.
    trunk: Block,
    /// `model{s}_1` for stages s = 1..=6: the part affinity fields.
    paf_stages: Vec<Block>,
    /// `model{s}_2`: the heat maps.
    heatmap_stages: Vec<Block>,
}

impl BodyPoseModel {
    /// From `body_pose_model.pth`'s tensors (flat names), or from a state dict with the block
    /// prefixes (`model0.conv1_1.weight`).
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let prefixed = !vb.contains_tensor("conv1_1.weight") && vb.contains_tensor("model0.conv1_1.weight");
        let block = |name: &str, specs| Block::new(&vb, if prefixed { name } else { "" }, specs);
        let trunk = block(
            "model0",
            vec![
                layer("conv1_1", 3, 64, 3, true),
                layer("conv1_2", 64, 64, 3, true),
                None,
                layer("conv2_1", 64, 128, 3, true),
                layer("conv2_2", 128, 128, 3, true),
                None,
                layer("conv3_1", 128, 256, 3, true),
                layer("conv3_2", 256, 256, 3, true),
                layer("conv3_3", 256, 256, 3, true),
                layer("conv3_4", 256, 256, 3, true),
                None,
                layer("conv4_1", 256, 512, 3, true),
                layer("conv4_2", 512, 512, 3, true),
                layer("conv4_3_CPM", 512, 256, 3, true),
                layer("conv4_4_CPM", 256, FEATURE_CHANNELS, 3, true),
            ],
        )?;
        let mut paf_stages = Vec::new();
        let mut heatmap_stages = Vec::new();
        for (branch, out, stages) in [(1, PAF_CHANNELS, &mut paf_stages), (2, HEATMAP_CHANNELS, &mut heatmap_stages)] {
            let f = FEATURE_CHANNELS;
            stages.push(block(
                &format!("model1_{branch}"),
                vec![
                    layer(&format!("conv5_1_CPM_L{branch}"), f, 128, 3, true),
                    layer(&format!("conv5_2_CPM_L{branch}"), 128, 128, 3, true),
                    layer(&format!("conv5_3_CPM_L{branch}"), 128, 128, 3, true),
                    layer(&format!("conv5_4_CPM_L{branch}"), 128, 512, 1, true),
                    layer(&format!("conv5_5_CPM_L{branch}"), 512, out, 1, false),
                ],
            )?);
            for s in 2..=6 {
                let name = |i: usize| format!("Mconv{i}_stage{s}_L{branch}");
                let input = PAF_CHANNELS + HEATMAP_CHANNELS + f;
                // The quirk of the module docs: only stage 6's heat maps keep their ReLU.
                let last_relu = s == 6 && branch == 2;
                stages.push(block(
                    &format!("model{s}_{branch}"),
                    vec![
                        layer(&name(1), input, 128, 7, true),
                        layer(&name(2), 128, 128, 7, true),
                        layer(&name(3), 128, 128, 7, true),
                        layer(&name(4), 128, 128, 7, true),
                        layer(&name(5), 128, 128, 7, true),
                        layer(&name(6), 128, 128, 1, true),
                        layer(&name(7), 128, out, 1, last_relu),
                    ],
                )?);
            }
        }
        Ok(Self { trunk, paf_stages, heatmap_stages })
    }

    /// `x` (batch, 3, h, w): BGR pixels `/ 256 - 0.5`, h and w multiples of [`STRIDE`]. Returns
    /// stage 6's part affinity fields (batch, 38, h / 8, w / 8) and heat maps (batch, 19, h / 8,
    /// w / 8), in that order (`Mconv7_stage6_L1`, `Mconv7_stage6_L2`).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let features = self.trunk.forward(x)?;
        let mut paf = self.paf_stages[0].forward(&features)?;
        let mut heat = self.heatmap_stages[0].forward(&features)?;
        for (paf_stage, heat_stage) in self.paf_stages.iter().zip(&self.heatmap_stages).skip(1) {
            let input = Tensor::cat(&[&paf, &heat, &features], 1)?;
            paf = paf_stage.forward(&input)?;
            heat = heat_stage.forward(&input)?;
        }
        Ok((paf, heat))
    }
}
