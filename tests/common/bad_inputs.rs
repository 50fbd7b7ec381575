//! Bad input files made on the fly, for the cases of issue 18 and the mutation test: image
//! headers claiming huge sizes, a huge valid PNG, and PyTorch checkpoints written opcode by opcode
//! in both of torch.save's formats (as `tools/reference/checkpoints.py` makes them with PyTorch).

use std::io::Write;
use std::path::Path;

/// CRC-32 (ISO-HDLC, as in PNG chunks).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Recomputes the CRC of every PNG chunk whose length fits the file, so that a change to the
/// data reaches the decoder instead of failing its checksum.
pub fn fix_png_crcs(png: &mut [u8]) {
    let mut at = 8;
    while let Some(len) = png.get(at..at + 4).map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize) {
        let Some(crc_at) = (at + 8).checked_add(len).filter(|&end| end + 4 <= png.len()) else { return };
        let crc = crc32(&png[at + 4..crc_at]);
        png[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
        at = crc_at + 4;
    }
}

/// `png` with the width and height in its header replaced (the CRC fixed).
pub fn png_claiming(png: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = png.to_vec();
    assert_eq!(&out[12..16], b"IHDR");
    out[16..20].copy_from_slice(&width.to_be_bytes());
    out[20..24].copy_from_slice(&height.to_be_bytes());
    fix_png_crcs(&mut out);
    out
}

/// `jpeg` with its frame header (SOF) claiming `width` x `height`, and saying the image is
/// progressive (SOF2) if `progressive`.
pub fn jpeg_claiming(jpeg: &[u8], width: u16, height: u16, progressive: bool) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let mut at = 2;
    loop {
        assert_eq!(out[at], 0xFF, "a marker at {at}");
        let marker = out[at + 1];
        if (0xC0..=0xC2).contains(&marker) {
            if progressive {
                out[at + 1] = 0xC2;
            }
            out[at + 5..at + 7].copy_from_slice(&height.to_be_bytes());
            out[at + 7..at + 9].copy_from_slice(&width.to_be_bytes());
            return out;
        }
        at += 2 + usize::from(u16::from_be_bytes([out[at + 2], out[at + 3]]));
    }
}

/// Writes a valid PNG of `width` x `height` in one colour (1-bit grey), row by row: a few MB on
/// disk and in memory whatever its size.
pub fn write_flat_png(path: &Path, width: u32, height: u32) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::One);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    let row = vec![0u8; width.div_ceil(8) as usize];
    for _ in 0..height {
        stream.write_all(&row).unwrap();
    }
    stream.finish().unwrap();
}

/// A pickle written opcode by opcode (protocol 2, as torch.save writes it).
pub struct Pickler(pub Vec<u8>);

impl Pickler {
    pub fn new() -> Self {
        Self(vec![0x80, 2])
    }

    pub fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.op(b"X").op(&(s.len() as u32).to_le_bytes()).op(s.as_bytes())
    }

    /// An integer as Python pickles it: BININT1, BININT2, BININT or LONG1.
    pub fn int(&mut self, v: i64) -> &mut Self {
        match v {
            0..=0xFF => self.op(&[b'K', v as u8]),
            0x100..=0xFFFF => self.op(b"M").op(&(v as u16).to_le_bytes()),
            _ if i32::try_from(v).is_ok() => self.op(b"J").op(&(v as i32).to_le_bytes()),
            _ => self.op(&[0x8a, 8]).op(&v.to_le_bytes()),
        }
    }

    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b"c").op(module.as_bytes()).op(b"\n").op(name.as_bytes()).op(b"\n")
    }

    /// A tuple of integers.
    pub fn ints(&mut self, values: &[i64]) -> &mut Self {
        self.op(b"(");
        for &v in values {
            self.int(v);
        }
        self.op(b"t")
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` of a
    /// `FloatStorage`; `persistent_id` lists the fields after the storage type (key, location,
    /// numel and, in legacy files, the view metadata).
    pub fn tensor(&mut self, spec: &TensorSpec, persistent_id: &[PidField]) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"(");
        self.op(b"(").str("storage").global("torch", "FloatStorage");
        for field in persistent_id {
            match field {
                PidField::Key => self.str(spec.key),
                PidField::Location => self.str("cpu"),
                PidField::Numel => self.int(spec.shape.iter().product()),
                PidField::NoView => self.op(b"N"),
            };
        }
        self.op(b"tQ").int(spec.offset).ints(&spec.shape).ints(&spec.strides);
        self.op(&[0x89]).global("collections", "OrderedDict").op(b")R").op(b"tR")
    }

    pub fn stop(&mut self) -> Vec<u8> {
        self.op(b".");
        self.0.clone()
    }
}

impl Default for Pickler {
    fn default() -> Self {
        Self::new()
    }
}

/// The fields of a storage's persistent id after `("storage", torch.FloatStorage`.
#[derive(Clone, Copy)]
pub enum PidField {
    Key,
    Location,
    /// The tensor's element count (its storage's, if it is the whole storage).
    Numel,
    NoView,
}

/// The persistent id of the zip format: key, location, numel.
pub const ZIP_PID: [PidField; 3] = [PidField::Key, PidField::Location, PidField::Numel];
/// The persistent id of the legacy format: key, location, numel, view metadata.
pub const LEGACY_PID: [PidField; 4] = [PidField::Key, PidField::Location, PidField::Numel, PidField::NoView];

/// One f32 tensor in a storage.
pub struct TensorSpec<'a> {
    pub name: &'a str,
    pub key: &'a str,
    pub offset: i64,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
}

/// The pickle of a state dict (an `OrderedDict`) of `tensors`, under the key `state_dict` of a
/// training checkpoint's dict (with an epoch number) if `nested`.
pub fn state_dict_pickle(tensors: &[TensorSpec], persistent_id: &[PidField], nested: bool) -> Vec<u8> {
    let mut p = Pickler::new();
    if nested {
        p.op(b"}(").str("epoch").int(7).str("state_dict");
    }
    p.global("collections", "OrderedDict").op(b")R(");
    for spec in tensors {
        p.str(spec.name).tensor(spec, persistent_id);
    }
    p.op(b"u");
    if nested {
        p.op(b"u");
    }
    p.stop()
}

/// A legacy-format checkpoint: magic number, format version, system info, `object` (a pickle)
/// and the f32 storages in order.
pub fn legacy_checkpoint(object: &[u8], storages: &[(&str, &[f32])]) -> Vec<u8> {
    let mut out = vec![0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];
    out.extend(Pickler::new().int(1001).stop());
    out.extend(Pickler::new().op(b"}(").str("little_endian").op(&[0x88]).op(b"u").stop());
    out.extend_from_slice(object);
    let mut keys = Pickler::new();
    keys.op(b"](");
    for (key, _) in storages {
        keys.str(key);
    }
    out.extend(keys.op(b"e").stop());
    for (_, data) in storages {
        out.extend((data.len() as u64).to_le_bytes());
        out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    }
    out
}

/// A zip-format checkpoint: `archive/data.pkl` holding `object` and the f32 storages as
/// `archive/data/<key>`, stored uncompressed as PyTorch does.
pub fn zip_checkpoint(object: &[u8], storages: &[(&str, &[f32])]) -> Vec<u8> {
    let mut entries = vec![("archive/data.pkl".to_string(), object.to_vec())];
    for (key, data) in storages {
        entries.push((format!("archive/data/{key}"), data.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    entries.push(("archive/version".to_string(), b"3\n".to_vec()));
    zip_of(&entries)
}

/// The entries of a zip file, in order.
pub fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut entry = archive.by_index(i).unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            (entry.name().unwrap().to_string(), data)
        })
        .collect()
}

/// A zip file of `entries`, stored uncompressed.
pub fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        zip.start_file(name.as_str(), options).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}
