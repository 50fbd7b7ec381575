//! `stableid export` and `stableid inspect`: identity files for other tools, and what a file holds.

use std::path::PathBuf;

use anyhow::{bail, Result};
use stableid::identity::{ExportFormat, Identity};

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    stableid export me.safetensors --format diffusers --out me-ti.safetensors\n  \
    # diffusers: pipe.load_textual_inversion(\"me-ti.safetensors\", token=\"<me>\"), then prompt \"<me> as an astronaut\"\n  \
    stableid export me.safetensors --format a1111 --out embeddings/me.safetensors\n  \
    # AUTOMATIC1111 / ComfyUI: put it in the embeddings folder, prompt \"me as an astronaut\" / \"embedding:me\"")]
pub struct ExportArgs {
    /// Identity file (from `stableid learn`).
    pub identity: PathBuf,
    /// Target format: diffusers (load_textual_inversion) or a1111 (AUTOMATIC1111 and ComfyUI).
    #[arg(long, value_parser = parse_format)]
    pub format: ExportFormat,
    /// Where to write the embedding.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
}

fn parse_format(s: &str) -> Result<ExportFormat, String> {
    s.parse()
}

pub fn export(args: ExportArgs) -> Result<()> {
    if args.out.exists() && !args.force {
        bail!("{} already exists: pass --force to overwrite it", args.out.display());
    }
    Identity::load(&args.identity)?.export(&args.out, args.format)?;
    println!("{}", args.out.display());
    Ok(())
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  stableid inspect me.safetensors\n  stableid inspect me.safetensors --json")]
pub struct InspectArgs {
    /// Identity file.
    pub identity: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    // A damaged file is shown too, saying what is wrong with it.
    let identity = Identity::load_unchecked(&args.identity)?;
    let non_finite = identity.non_finite_values()?;
    let norms: Vec<f32> = identity.embeddings.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
    let mut metadata: Vec<_> = identity.metadata.iter().collect();
    metadata.sort();
    if args.json {
        let summary = serde_json::json!({
            "shape": identity.embeddings.dims(),
            "norms": norms,
            "non_finite_values": non_finite,
            "metadata": identity.metadata,
        });
        println!("{summary}");
    } else {
        println!("{}: {} vectors of width {}", args.identity.display(), identity.embeddings.dim(0)?, identity.width());
        println!("norms: v1* {:.4}, v2* {:.4}", norms[0], norms[1]);
        if non_finite > 0 {
            println!(
                "not usable: {non_finite} of its {} values are NaN or infinite (generate and export refuse it)",
                identity.embeddings.elem_count()
            );
        }
        for (key, value) in metadata {
            println!("{key}: {value}");
        }
    }
    Ok(())
}
