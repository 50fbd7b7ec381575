//! PLY files in the layout of Inria's 3DGS (`GaussianModel.save_ply` / `load_ply`), which splat
//! viewers open: one `vertex` element of little-endian floats
//! `x y z nx ny nz f_dc_0..2 f_rest_0..(3K-1) opacity scale_0..2 rot_0..3`, with `f_rest`
//! channel-major (all coefficients of red, then green, then blue) and `nx ny nz` zero.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::gaussians::Gaussians;
use crate::{Error, Result};

/// Larger files are refused before reading (about 17 million degree-3 Gaussians).
const MAX_PLY_BYTES: u64 = 4 << 30;

fn property_names(sh_rest: usize) -> Vec<String> {
    let mut names: Vec<String> = ["x", "y", "z", "nx", "ny", "nz"].map(String::from).to_vec();
    names.extend((0..3).map(|i| format!("f_dc_{i}")));
    names.extend((0..3 * sh_rest).map(|i| format!("f_rest_{i}")));
    names.push("opacity".into());
    names.extend((0..3).map(|i| format!("scale_{i}")));
    names.extend((0..4).map(|i| format!("rot_{i}")));
    names
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
}

/// Writes `gaussians` as a 3DGS PLY (f32), atomically, with `metadata` as header comments
/// (`comment KEY: VALUE`, one line each), which PLY readers skip.
pub fn write_ply(path: &Path, gaussians: &Gaussians, metadata: &[(&str, String)]) -> Result<()> {
    let n = gaussians.len()?;
    let k = gaussians.sh_rest.as_ref().map_or(0, |rest| rest.dims()[1]);
    let means = rows(&gaussians.means)?;
    let scales = rows(&gaussians.log_scales)?;
    let rotations = rows(&gaussians.rotations)?;
    let opacities = gaussians.opacity_logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    let dc = rows(&gaussians.sh_dc)?;
    // [N, K, 3] -> [N, 3, K] flattened: channel-major, as 3DGS stores it.
    let rest = match &gaussians.sh_rest {
        Some(rest) => rows(&rest.transpose(1, 2)?.flatten_from(1)?)?,
        None => vec![Vec::new(); n],
    };
    let names = property_names(k);
    let mut header = "ply\nformat binary_little_endian 1.0\n".to_string();
    for (key, value) in metadata {
        let one_line = |text: &str| text.replace(['\n', '\r'], " ");
        header.push_str(&format!("comment {}: {}\n", one_line(key), one_line(value)));
    }
    header.push_str(&format!("element vertex {n}\n"));
    for name in &names {
        header.push_str(&format!("property float {name}\n"));
    }
    header.push_str("end_header\n");
    crate::io::write_atomically(path, |out| {
        out.write_all(header.as_bytes())?;
        for i in 0..n {
            let row = means[i].iter().chain(&[0.0; 3]).chain(&dc[i]).chain(&rest[i]);
            let row = row.chain(std::iter::once(&opacities[i])).chain(&scales[i]).chain(&rotations[i]);
            for value in row {
                out.write_all(&value.to_le_bytes())?;
            }
        }
        Ok(())
    })
}

#[derive(Clone, Copy)]
enum Scalar {
    F32,
    F64,
}

/// The `comment KEY: VALUE` lines of a PLY's header, as [`write_ply`] writes them.
pub fn ply_metadata(path: &Path) -> Result<Vec<(String, String)>> {
    use std::io::Read;
    // The header comes first and is short: read no more than its share.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(1 << 20).read_to_end(&mut bytes))
        .map_err(|e| Error::Input(format!("{}: cannot read the PLY: {e}", path.display())))?;
    let end = bytes.windows(11).position(|w| w == b"end_header\n").unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end])
        .lines()
        .filter_map(|line| line.strip_prefix("comment ")?.split_once(": "))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect())
}

/// Reads a 3DGS PLY into f32 Gaussians on `device`, refusing files that are not 3DGS PLYs (naming
/// the missing properties), that hold no Gaussians, or whose parameters are not finite.
pub fn read_ply(path: &Path, device: &Device) -> Result<Gaussians> {
    let bad = |msg: String| Error::Input(format!("{}: {msg}", path.display()));
    let bytes = crate::io::read_bounded(path, MAX_PLY_BYTES).map_err(|e| bad(format!("cannot read the PLY: {e}")))?;
    let header_end = bytes
        .windows(11)
        .position(|w| w == b"end_header\n")
        .ok_or_else(|| bad("not a PLY file (no end_header line)".into()))?;
    let header = std::str::from_utf8(&bytes[..header_end]).map_err(|_| bad("not a PLY file (binary header)".into()))?;
    let body = &bytes[header_end + 11..];
    let mut lines = header.lines();
    if lines.next() != Some("ply") {
        return Err(bad("not a PLY file (it does not start with `ply`)".into()));
    }
    let (mut count, mut properties, mut in_vertex, mut seen_element) = (None, Vec::new(), false, false);
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["format", "binary_little_endian", _] => {}
            ["format", other, _] => return Err(bad(format!("PLY format {other}: only binary_little_endian is read"))),
            ["element", name, n] => {
                in_vertex = *name == "vertex";
                if in_vertex && seen_element {
                    return Err(bad("the vertex element must come first".into()));
                }
                seen_element = true;
                if in_vertex {
                    count = Some(n.parse::<usize>().map_err(|_| bad(format!("bad vertex count {n}")))?);
                }
            }
            ["property", kind, name] if in_vertex => {
                let scalar = match *kind {
                    "float" | "float32" => Scalar::F32,
                    "double" | "float64" => Scalar::F64,
                    other => return Err(bad(format!("property {name} is {other}; 3DGS PLYs hold floats"))),
                };
                properties.push((name.to_string(), scalar));
            }
            _ => {}
        }
    }
    let n = count.ok_or_else(|| bad("no vertex element: not a 3DGS PLY".into()))?;
    let rest_count = properties.iter().filter(|(name, _)| name.starts_with("f_rest_")).count();
    let k = rest_count / 3;
    if rest_count % 3 != 0 || ![0, 3, 8, 15].contains(&k) {
        return Err(bad(format!("{rest_count} f_rest properties; 3DGS files have 0, 9, 24 or 45")));
    }
    let wanted: Vec<String> = property_names(k).into_iter().filter(|name| !name.starts_with('n')).collect();
    let missing: Vec<&str> =
        wanted.iter().filter(|name| !properties.iter().any(|(p, _)| p == *name)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(bad(format!("not a 3DGS PLY: missing vertex properties {}", missing.join(" "))));
    }
    if n == 0 {
        return Err(bad("the PLY holds no Gaussians".into()));
    }
    let row_bytes: usize = properties.iter().map(|(_, s)| if matches!(s, Scalar::F32) { 4 } else { 8 }).sum();
    if body.len() < n * row_bytes {
        return Err(bad(format!(
            "truncated: {} Gaussians need {} bytes, the file has {}",
            n,
            n * row_bytes,
            body.len()
        )));
    }
    // Offsets of the wanted properties within a row.
    let mut offsets = Vec::with_capacity(wanted.len());
    for name in &wanted {
        let mut offset = 0;
        for (p, scalar) in &properties {
            if p == name {
                offsets.push((offset, *scalar));
                break;
            }
            offset += if matches!(scalar, Scalar::F32) { 4 } else { 8 };
        }
    }
    let mut values = vec![0f32; n * wanted.len()];
    for (i, row) in body[..n * row_bytes].chunks_exact(row_bytes).enumerate() {
        for (j, &(offset, scalar)) in offsets.iter().enumerate() {
            values[i * wanted.len() + j] = match scalar {
                Scalar::F32 => f32::from_le_bytes(row[offset..offset + 4].try_into().expect("4 bytes")),
                Scalar::F64 => f64::from_le_bytes(row[offset..offset + 8].try_into().expect("8 bytes")) as f32,
            };
        }
    }
    let non_finite = values.iter().filter(|v| !v.is_finite()).count();
    if non_finite > 0 {
        return Err(bad(format!("{non_finite} parameters are NaN or infinite; refusing to load")));
    }
    let table = Tensor::from_vec(values, (n, wanted.len()), device)?;
    // Columns after dropping the normals: x y z, f_dc (3), f_rest (3K), opacity, scale (3), rot (4).
    let at = |start: usize, len: usize| table.narrow(1, start, len)?.contiguous();
    let rest_end = 6 + 3 * k;
    Ok(Gaussians {
        means: at(0, 3)?,
        sh_dc: at(3, 3)?,
        sh_rest: (k > 0).then(|| at(6, 3 * k)?.reshape((n, 3, k))?.transpose(1, 2)?.contiguous()).transpose()?,
        opacity_logits: at(rest_end, 1)?.squeeze(1)?,
        log_scales: at(rest_end + 1, 3)?,
        rotations: at(rest_end + 4, 4)?,
    })
}
