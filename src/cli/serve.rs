//! `stableid serve`: the web app (`stableid::server`) on the models the other commands take.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use stableid::models::controlnet::OPENPOSE_SD21;
use stableid::models::text_to_video::DEFAULT_VIDEO_MODEL;
use stableid::priors::face_feature::DEFAULT_FACE_ENCODER;
use stableid::server::{ModelChoice, Server, ServerSettings, DEFAULT_BIND};
use stableid::weights::Hub;

use super::{FaceParserArgs, ModelArgs};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid serve                                   # then open http://127.0.0.1:7860/\n  \
    stableid serve --data ~/stableid-data --device cuda --dtype f16\n  \
    stableid serve --bind 0.0.0.0:7860 --token \"$(openssl rand -hex 16)\"   # reachable from other machines\n  \
    stableid serve --pose-model body_pose_model.pth --video-model cerspense/zeroscope_v2_576w\n\n\
Upload photos, see their aligned crops and face/hair masks, learn identities while the loss curve\n\
and preview images come in, download or export them, and generate images (posed by a skeleton\n\
through the pose ControlNet, or not), videos and 3D heads into a gallery that keeps each item's\n\
settings. One job runs at a time; the others wait. Everything is kept in the --data\n\
folder and is there again after a restart. The page uses the JSON API of docs/api.md, which scripts\n\
can use too.")]
pub struct ServeArgs {
    /// Address and port to listen on. Any address but a loopback one (127.0.0.1, ::1) needs --token.
    #[arg(long, default_value = DEFAULT_BIND)]
    pub bind: SocketAddr,
    /// A secret every request must carry (Authorization: Bearer TOKEN, or the page's URL as printed).
    #[arg(long)]
    pub token: Option<String>,
    /// Folder for uploads, identities and images (created if missing; kept across restarts).
    #[arg(long, default_value = "stableid-data")]
    pub data: PathBuf,
    /// Face-recognition ViT: a transformers folder or hub id.
    #[arg(long, default_value = DEFAULT_FACE_ENCODER)]
    pub face_encoder: String,
    #[command(flatten)]
    pub parser: FaceParserArgs,
    /// Celebrity names for the basis, one two-word name per line [default: the shipped list].
    #[arg(long)]
    pub celeb_names: Option<PathBuf>,
    /// The pose ControlNet of posed images: a diffusers ControlNet folder or a hub id (in the hub
    /// cache, or downloaded when the first posed image is made).
    #[arg(long, default_value = OPENPOSE_SD21)]
    pub controlnet: String,
    /// The OpenPose body weights that find poses in photos (non-commercial research use only, CMU's
    /// licence) [default: body_pose_model.pth of lllyasviel/Annotators, from the hub].
    #[arg(long)]
    pub pose_model: Option<PathBuf>,
    /// The text-to-video model: a diffusers folder or a hub id (in the hub cache, or downloaded
    /// when the first video is made).
    #[arg(long, default_value = DEFAULT_VIDEO_MODEL)]
    pub video_model: String,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: ServeArgs, hub: &Hub) -> Result<()> {
    let device = args.model.device()?;
    let models = ModelChoice {
        model: args.model.model.clone(),
        precision: args.model.precision(&device)?,
        device,
        face_encoder: args.face_encoder,
        face_parser: args.parser.kind(),
        face_parser_weights: args.parser.weights().map(str::to_string),
        celeb_names: args.celeb_names,
        controlnet: args.controlnet,
        pose_model: args.pose_model,
        video_model: args.video_model,
        hub: hub.clone(),
    };
    let settings = ServerSettings { bind: args.bind, token: args.token, data: args.data.clone(), models };
    let server = Server::bind(settings)?;
    println!("{}", server.url()?);
    eprintln!("data folder: {}; Ctrl-C stops the server", args.data.display());
    server.run()?;
    Ok(())
}
