//! Writing outputs safely: every file is written to a temporary name in the same folder and
//! renamed into place, so a crash, a full disk or Ctrl-C never leaves a half-written output.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Writes a file through `write`, atomically: it appears complete or not at all.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let out_err = |e: std::io::Error| Error::Output { path: path.to_path_buf(), msg: e.to_string() };
    let tmp = temp_name(path);
    let result = (|| {
        let mut w = BufWriter::new(File::create(&tmp)?);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(out_err)
}

fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// An 8-bit RGB image.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    /// Row-major RGB bytes, `width * height * 3` of them.
    pub pixels: Vec<u8>,
}

/// Writes `image` as a PNG carrying `text` (keyword, value) pairs as UTF-8 text chunks.
pub fn write_png(path: &Path, image: &RgbImage, text: &[(&str, String)]) -> Result<()> {
    write_atomically(path, |w| {
        let mut encoder = png::Encoder::new(w, image.width, image.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            encoder.add_itxt_chunk(key.to_string(), value.clone()).map_err(std::io::Error::other)?;
        }
        let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
        writer.write_image_data(&image.pixels).map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)
    })
}

/// Reads the text chunks (tEXt, zTXt, iTXt) of a PNG file.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = File::open(path)?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader =
        decoder.read_info().map_err(|e| Error::Input(format!("{}: not a readable PNG ({e})", path.display())))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())).collect();
    for chunk in &info.utf8_text {
        if let Ok(text) = chunk.get_text() {
            out.push((chunk.keyword.clone(), text));
        }
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |w| w.write_all(bytes))
}
