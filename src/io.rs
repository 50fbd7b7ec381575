//! Reading and writing files safely.
//!
//! Inputs are read whole only when they are regular files of a bounded size, checked before
//! anything is read: a device such as `/dev/zero`, a fifo or a folder is refused at once, and a
//! safetensors file must be exactly as long as its header says. Outputs are written to a
//! temporary name in the same folder and renamed into place, so a crash, a full disk or Ctrl-C
//! never leaves a half-written output, and they only ever replace regular files.

use std::collections::HashMap;
use std::fs::{File, FileType, OpenOptions};
use std::io::{BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;

use crate::{Error, Result};

pub mod chart;
pub mod video;

/// The most a small file read whole may hold: configs, vocabularies, names lists, identity files,
/// latents (the largest of Stable Diffusion's, CLIP's vocab.json, is under 1 MiB).
pub const SMALL_FILE_LIMIT: u64 = 16 << 20;

/// Reads a whole regular file of at most `limit` bytes. What is not a regular file (a device
/// such as `/dev/zero`, a fifo, a folder) and a larger file are refused before anything is read;
/// the error says which (a missing file keeps [`ErrorKind::NotFound`]).
pub fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let (file, size) = open_regular(path, limit)?;
    let mut bytes = Vec::with_capacity(size as usize);
    read_to_size(file, size, &mut bytes)?;
    Ok(bytes)
}

/// [`read_bounded`] for UTF-8 text.
pub fn read_text_bounded(path: &Path, limit: u64) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, limit)?)
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Parses a JSON config file (at most [`SMALL_FILE_LIMIT`] bytes) into `T`, naming the file in
/// any error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text_bounded(path, SMALL_FILE_LIMIT).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::MissingFile {
            what: "config file".into(),
            path: path.to_path_buf(),
            hint: "the model folder is incomplete".into(),
        },
        _ => Error::Config { file: path.to_path_buf(), msg: e.to_string() },
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config { file: path.to_path_buf(), msg: e.to_string() })
}

/// The tensors (on the CPU) and the `__metadata__` of a safetensors file.
pub struct TensorFile {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file of at most `limit` bytes: its 8-byte header length and its header
/// first, then, only if the file is exactly as long as the header says, the tensors. Errors as
/// [`read_bounded`]'s; a malformed file gives [`ErrorKind::InvalidData`] saying what is wrong.
pub fn read_safetensors(path: &Path, limit: u64) -> std::io::Result<TensorFile> {
    let invalid = |msg: String| std::io::Error::new(ErrorKind::InvalidData, msg);
    let not_safetensors = |msg: String| invalid(format!("not a safetensors file ({msg})"));
    let (mut file, size) = open_regular(path, limit)?;
    let mut len = [0u8; 8];
    if size < 8 {
        return Err(not_safetensors(format!("{size} bytes")));
    }
    file.read_exact(&mut len)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > size - 8 {
        return Err(not_safetensors(format!("a header of {header_len} bytes in a file of {size}")));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    bytes.extend_from_slice(&len);
    read_to_size(&mut file, 8 + header_len, &mut bytes)?;
    let header: safetensors::tensor::Metadata =
        serde_json::from_slice(&bytes[8..]).map_err(|e| not_safetensors(format!("unreadable header: {e}")))?;
    let described = 8 + header_len as u128 + header.data_len() as u128;
    if described != size as u128 {
        return Err(not_safetensors(format!("its header describes {described} bytes, the file has {size}")));
    }
    read_to_size(file, size, &mut bytes)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| invalid(format!("unreadable tensors ({e})")))?;
    Ok(TensorFile { tensors, metadata: header.metadata().clone().unwrap_or_default() })
}

/// Opens a regular file of at most `limit` bytes; returns it with its size. The type is checked
/// before opening (opening a fifo would wait for a writer) and again on the opened file.
fn open_regular(path: &Path, limit: u64) -> std::io::Result<(File, u64)> {
    let not_regular = |file_type: FileType| {
        std::io::Error::new(ErrorKind::InvalidInput, format!("{}, not a regular file", file_kind(file_type)))
    };
    let metadata = std::fs::metadata(path)?;
    if !metadata.is_file() {
        return Err(not_regular(metadata.file_type()));
    }
    let file = File::open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_regular(metadata.file_type()));
    }
    let size = metadata.len();
    if size > limit {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("{size} bytes, more than the {} MiB a file of this kind may hold", limit >> 20),
        ));
    }
    Ok((file, size))
}

/// Reads from `file` until `bytes` holds `size` bytes; a file that ends sooner (it shrank while
/// being read) is an error, and nothing past `size` is read.
fn read_to_size(file: impl Read, size: u64, bytes: &mut Vec<u8>) -> std::io::Result<()> {
    let missing = size - bytes.len() as u64;
    if file.take(missing).read_to_end(bytes)? as u64 != missing {
        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "the file ended early (did it change?)"));
    }
    Ok(())
}

/// What a file is, in words.
fn file_kind(file_type: FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_fifo() {
            return "a fifo";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a folder"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Writes a file through `write`, atomically: it appears complete or not at all. Only a regular
/// file is ever replaced: a device (`/dev/full`), a folder, a fifo or a symbolic link at `path`
/// (renaming over a link would replace the link, not the file it points to) is refused before
/// anything is written.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let out_err = |msg: String| Error::Output { path: path.to_path_buf(), msg };
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.is_file() => {
            return Err(out_err(format!(
                "it is {}, and outputs only replace regular files: remove it or choose another path",
                file_kind(metadata.file_type())
            )))
        }
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(out_err(e.to_string())),
        _ => {}
    }
    let tmp = temp_name(path);
    let result = (|| {
        let mut w = BufWriter::new(create_new(&tmp)?);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| out_err(e.to_string()))
}

/// Creates `path`, which must not exist (a link there is not followed); a leftover of an earlier
/// run of the same process id is removed first.
fn create_new(path: &Path) -> std::io::Result<File> {
    let open = || OpenOptions::new().write(true).create_new(true).open(path);
    match open() {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            open()
        }
        result => result,
    }
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

impl From<&image::RgbImage> for RgbImage {
    fn from(image: &image::RgbImage) -> Self {
        Self { width: image.width(), height: image.height(), pixels: image.as_raw().clone() }
    }
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
