//! Writing videos: H.264 in MP4 (what browsers and phones play; encoded by OpenH264 built from
//! source, muxed by the `mp4` crate, no system ffmpeg), animated GIF, or a folder of PNG frames.
//! Each is written whole under a temporary name and renamed into place.

use std::io::{Seek, Write};
use std::path::Path;

use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;

use super::{write_atomically, write_png, RgbImage};
use crate::{Error, Result};

/// Bits per second per pixel at one frame per second: ~4 Mbit/s for 256 x 256 at 8 fps, enough
/// that the frames stay within a few levels of the PNGs.
const BITS_PER_PIXEL_FRAME: u32 = 8;

/// How a video is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoFormat {
    /// H.264 in an MP4 container.
    Mp4,
    /// Animated GIF (256 colours per frame).
    Gif,
    /// A folder of numbered PNG frames.
    Png,
}

impl VideoFormat {
    pub const NAMES: [&'static str; 3] = ["mp4", "gif", "png"];

    /// The file extension, none for a folder of frames.
    pub fn extension(&self) -> Option<&'static str> {
        match self {
            Self::Mp4 => Some("mp4"),
            Self::Gif => Some("gif"),
            Self::Png => None,
        }
    }
}

impl std::str::FromStr for VideoFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mp4" => Ok(Self::Mp4),
            "gif" => Ok(Self::Gif),
            "png" => Ok(Self::Png),
            _ => Err(format!("unknown video format {s:?}: expected one of {}", Self::NAMES.join(", "))),
        }
    }
}

/// Writes `frames` (same size, even sides for MP4) at `fps` frames per second to `path` in
/// `format`; PNG frames carry `text` in their metadata.
pub fn write_video(
    path: &Path,
    frames: &[RgbImage],
    fps: u32,
    format: VideoFormat,
    text: &[(&str, String)],
) -> Result<()> {
    if frames.is_empty() || fps == 0 {
        return Err(Error::Internal(format!(
            "a video needs frames and a frame rate ({} frames at {fps} fps)",
            frames.len()
        )));
    }
    match format {
        VideoFormat::Mp4 => write_atomically(path, |w| encode_mp4(w, frames, fps).map_err(std::io::Error::other)),
        VideoFormat::Gif => write_atomically(path, |w| encode_gif(w, frames, fps).map_err(std::io::Error::other)),
        VideoFormat::Png => write_png_folder(path, frames, text),
    }
}

/// H.264 (OpenH264, one IDR frame first) in an MP4 track whose timescale is the frame rate.
fn encode_mp4<W: Write + Seek>(out: &mut W, frames: &[RgbImage], fps: u32) -> std::result::Result<(), String> {
    let (width, height) = (frames[0].width as usize, frames[0].height as usize);
    if width % 2 != 0 || height % 2 != 0 || width > u16::MAX as usize || height > u16::MAX as usize {
        return Err(format!("H.264 needs even frame sides of at most {} pixels, not {width} x {height}", u16::MAX));
    }
    let bitrate = BITS_PER_PIXEL_FRAME.saturating_mul((width * height) as u32).saturating_mul(fps);
    let config =
        EncoderConfig::new().max_frame_rate(FrameRate::from_hz(fps as f32)).bitrate(BitRate::from_bps(bitrate));
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| e.to_string())?;
    let mut samples = Vec::with_capacity(frames.len());
    let (mut sps, mut pps) = (None, None);
    for frame in frames {
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(&frame.pixels, (width, height)));
        let stream = encoder.encode(&yuv).map_err(|e| e.to_string())?.to_vec();
        // Annex B (start codes) to MP4's length-prefixed NAL units; parameter sets go to the header.
        let mut sample = Vec::with_capacity(stream.len());
        let mut is_sync = false;
        for nal in annex_b_units(&stream) {
            match nal[0] & 0x1f {
                7 => sps = sps.or_else(|| Some(nal.to_vec())),
                8 => pps = pps.or_else(|| Some(nal.to_vec())),
                kind => {
                    is_sync |= kind == 5;
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
            }
        }
        samples.push((sample, is_sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err("the H.264 encoder gave no parameter sets".into());
    };
    let brand = |s: &str| s.parse::<mp4::FourCC>().map_err(|e| e.to_string());
    let mp4_config = mp4::Mp4Config {
        major_brand: brand("isom")?,
        minor_version: 512,
        compatible_brands: vec![brand("isom")?, brand("iso2")?, brand("avc1")?, brand("mp41")?],
        timescale: 1000,
    };
    let mut writer = mp4::Mp4Writer::write_start(out, &mp4_config).map_err(|e| e.to_string())?;
    writer
        .add_track(&mp4::TrackConfig {
            track_type: mp4::TrackType::Video,
            timescale: fps,
            language: "und".into(),
            media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
                width: width as u16,
                height: height as u16,
                seq_param_set: sps,
                pic_param_set: pps,
            }),
        })
        .map_err(|e| e.to_string())?;
    for (i, (bytes, is_sync)) in samples.into_iter().enumerate() {
        let sample =
            mp4::Mp4Sample { start_time: i as u64, duration: 1, rendering_offset: 0, is_sync, bytes: bytes.into() };
        writer.write_sample(1, &sample).map_err(|e| e.to_string())?;
    }
    writer.write_end().map_err(|e| e.to_string())
}

/// The NAL units of an Annex B byte stream (each after a 00 00 01 or 00 00 00 01 start code).
fn annex_b_units(stream: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i..i + 3] == [0, 0, 1] {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(k, &start)| {
            let mut end = starts.get(k + 1).map_or(stream.len(), |&next| next - 3);
            // A four-byte start code's leading zero belongs to no unit.
            while end > start && stream[end - 1] == 0 && k + 1 < starts.len() {
                end -= 1;
            }
            &stream[start..end]
        })
        .filter(|unit| !unit.is_empty())
        .collect()
}

/// An endlessly looping GIF, each frame quantised to its own 256 colours.
fn encode_gif<W: Write>(out: &mut W, frames: &[RgbImage], fps: u32) -> std::result::Result<(), String> {
    let (width, height) = (frames[0].width, frames[0].height);
    let (Ok(w), Ok(h)) = (u16::try_from(width), u16::try_from(height)) else {
        return Err(format!("GIF frames are at most {} pixels a side, not {width} x {height}", u16::MAX));
    };
    let mut encoder = gif::Encoder::new(out, w, h, &[]).map_err(|e| e.to_string())?;
    encoder.set_repeat(gif::Repeat::Infinite).map_err(|e| e.to_string())?;
    // GIF delays are in hundredths of a second.
    let delay = (100.0 / fps as f64).round().max(1.0) as u16;
    for image in frames {
        let mut frame = gif::Frame::from_rgb_speed(w, h, &image.pixels, 10);
        frame.delay = delay;
        encoder.write_frame(&frame).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `dir/frame-NNNN.png`, written in a temporary sibling folder renamed into place at the end.
fn write_png_folder(dir: &Path, frames: &[RgbImage], text: &[(&str, String)]) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("frames");
    let partial = dir.with_file_name(format!(".{name}.partial"));
    let output_error = |e: std::io::Error| Error::Output { path: dir.to_path_buf(), msg: e.to_string() };
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(output_error)?;
    }
    std::fs::create_dir(&partial).map_err(output_error)?;
    let written = frames
        .iter()
        .enumerate()
        .try_for_each(|(i, frame)| write_png(&partial.join(format!("frame-{i:04}.png")), frame, text));
    let result = written.and_then(|()| std::fs::rename(&partial, dir).map_err(output_error));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    result
}
