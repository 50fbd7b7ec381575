//! PyTorch checkpoints (`torch.save` of a state dict: `.pth`, `pytorch_model.bin`) in both of
//! PyTorch's on-disk formats: the zip archive of PyTorch >= 1.6 (its tensor table parsed by
//! candle) and the legacy format before it. face-parsing.PyTorch's `79999_iter.pth`, the paper's
//! face parser, is a legacy file, as are older `.bin` files on the hub.
//!
//! The legacy format (`torch/serialization.py`, `_legacy_save`) is five pickles back to back, then
//! the storages' bytes: a magic number, the format version (1001), the writer's system info (its
//! byte order), the saved object (each tensor names its storage through a pickle persistent id:
//! `("storage", torch.FloatStorage, key, location, numel, None)`), and the storage keys in the
//! order their data follows, each as a little-endian int64 element count and the raw elements.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use candle_core::pickle::{read_pth_tensor_info, Object, Stack};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::Weights;
use crate::{Error, Result};

/// The first pickle of a legacy file: protocol 2, `LONG1` of 10 bytes holding the magic number
/// 0x1950a86a20f9469cfc6c, `STOP`. Byte 1 (the protocol) may vary.
const LEGACY_MAGIC: [u8; 15] =
    [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];
const LEGACY_FORMAT_VERSION: i32 = 1001;
const ZIP_MAGIC: [u8; 4] = [b'P', b'K', 3, 4];

/// Opens a PyTorch checkpoint holding a state dict. Tensors are read as the model asks for them,
/// converted to `dtype` and moved to `device`. Also returns the tensor names.
pub fn open_checkpoint(path: &Path, dtype: DType, device: &Device) -> Result<(Weights, Vec<String>)> {
    let unreadable = |msg: String| Error::Weights { file: path.to_path_buf(), msg };
    let mut head = [0u8; LEGACY_MAGIC.len()];
    let read = std::fs::File::open(path)?.read(&mut head)?;
    let head = &head[..read];
    let checkpoint = if head.starts_with(&ZIP_MAGIC) {
        Checkpoint::zip(path).map_err(|msg| unreadable(format!("cannot read this PyTorch zip file: {msg}")))?
    } else if head.len() == LEGACY_MAGIC.len() && head[0] == LEGACY_MAGIC[0] && head[2..] == LEGACY_MAGIC[2..] {
        // Safety: memory-mapped read-only; model files are not modified while in use.
        let bytes = unsafe { memmap2::Mmap::map(&std::fs::File::open(path)?)? };
        Checkpoint::legacy(bytes)
            .map_err(|msg| unreadable(format!("cannot read this legacy-format (PyTorch < 1.6) checkpoint: {msg}")))?
    } else {
        return Err(unreadable("not a PyTorch checkpoint (neither the zip format nor the legacy format)".into()));
    };
    let names = checkpoint.tensors.keys().cloned().collect();
    let vb = VarBuilder::from_backend(Box::new(checkpoint), dtype, device.clone());
    Ok((Weights { path: path.to_path_buf(), vb }, names))
}

/// A checkpoint's tensors: where each lies in which storage, and the storages.
struct Checkpoint {
    tensors: HashMap<String, TensorSpec>,
    storages: Storages,
}

enum Storages {
    /// The whole legacy file (memory-mapped) and each storage's byte range in it.
    Legacy { bytes: memmap2::Mmap, ranges: HashMap<String, Range<usize>> },
    /// A zip file, opened once, whose storages are its entries (`archive/data/0`...), read when used.
    Zip(Mutex<ZipArchive>),
}

type ZipArchive = zip::ZipArchive<std::io::BufReader<std::fs::File>>;

/// Where one tensor lies in its storage (in elements).
struct TensorSpec {
    storage: String,
    dtype: DType,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl Checkpoint {
    /// The tensor table of a zip-format file (its pickle parsed by candle).
    fn zip(path: &Path) -> std::result::Result<Self, String> {
        let infos = read_pth_tensor_info(path, false, None).map_err(|e| e.to_string())?;
        let tensors = infos
            .into_iter()
            .map(|info| {
                let spec = TensorSpec {
                    offset: info.layout.start_offset() / info.dtype.size_in_bytes(),
                    shape: info.layout.dims().to_vec(),
                    strides: info.layout.stride().to_vec(),
                    storage: info.path,
                    dtype: info.dtype,
                };
                (info.name, spec)
            })
            .collect();
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
        Ok(Self { tensors, storages: Storages::Zip(Mutex::new(archive)) })
    }

    /// Parses a legacy file, `bytes` being all of it.
    fn legacy(bytes: memmap2::Mmap) -> std::result::Result<Self, String> {
        let mut reader = Cursor::new(&bytes[LEGACY_MAGIC.len()..]);
        let version = next_pickle(&mut reader, "format version")?;
        if version != Object::Int(LEGACY_FORMAT_VERSION) {
            return Err(format!("format version {version:?}, expected {LEGACY_FORMAT_VERSION}"));
        }
        let system = next_pickle(&mut reader, "system info")?;
        let little_endian = dict_entries(system)?
            .into_iter()
            .any(|(key, value)| key == Object::Unicode("little_endian".into()) && value == Object::Bool(true));
        if !little_endian {
            return Err("written on a big-endian machine, which is not supported".into());
        }
        let tensors: HashMap<String, TensorSpec> = match next_pickle(&mut reader, "state dict")? {
            Object::Dict(entries) => entries
                .into_iter()
                .filter_map(|(name, value)| tensor_spec(name, value).transpose())
                .collect::<std::result::Result<_, _>>()?,
            other => {
                return Err(format!("the saved object is not a state dict (a dict of tensors) but {}", kind(&other)))
            }
        };
        let keys = match next_pickle(&mut reader, "storage keys")? {
            Object::List(keys) => keys,
            other => return Err(format!("expected the list of storage keys, found {}", kind(&other))),
        };
        let start = LEGACY_MAGIC.len() + reader.position() as usize;
        let ranges = storage_ranges(&bytes, start, keys, &tensors)?;
        Ok(Self { tensors, storages: Storages::Legacy { bytes, ranges } })
    }

    /// Reads one tensor (on the CPU, in its saved dtype).
    fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let spec = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let tensor = match &self.storages {
            Storages::Legacy { bytes, ranges } => {
                let range = ranges.get(&spec.storage).cloned().unwrap_or_default();
                gather(name, spec, &bytes[range])
            }
            Storages::Zip(archive) => {
                let mut archive = archive.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                read_zip_entry(&mut archive, &spec.storage).and_then(|storage| gather(name, spec, &storage))
            }
        };
        tensor.map_err(candle_core::Error::msg)
    }
}

impl SimpleBackend for Checkpoint {
    fn get(&self, shape: Shape, name: &str, _: Init, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.read(name)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        tensor.to_device(device)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.read(name)?.to_device(device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

fn read_zip_entry(archive: &mut ZipArchive, entry: &str) -> std::result::Result<Vec<u8>, String> {
    let mut entry = archive.by_name(entry).map_err(|e| format!("{entry}: {e}"))?;
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

fn next_pickle(reader: &mut Cursor<&[u8]>, what: &str) -> std::result::Result<Object, String> {
    let mut stack = Stack::empty();
    stack
        .read_loop(reader)
        .and_then(|()| stack.finalize())
        .map_err(|e| format!("{what}: {e} (truncated or corrupt file?)"))
}

fn dict_entries(object: Object) -> std::result::Result<Vec<(Object, Object)>, String> {
    object.dict().map_err(|other| format!("expected a dict, found {}", kind(&other)))
}

/// A tensor's name and description, or `None` for an entry that is no tensor (e.g. `_metadata`).
fn tensor_spec(name: Object, value: Object) -> std::result::Result<Option<(String, TensorSpec)>, String> {
    let Object::Unicode(name) = name else { return Ok(None) };
    let Ok((mut callable, mut args)) = value.reduce() else { return Ok(None) };
    // An nn.Parameter (a whole saved module): `_rebuild_parameter(tensor, requires_grad, hooks)`.
    if is_class(&callable, "torch._utils", "_rebuild_parameter") {
        let tensor = args.tuple().ok().and_then(|mut args| (!args.is_empty()).then(|| args.remove(0)));
        let Some(Ok(reduced)) = tensor.map(Object::reduce) else { return Ok(None) };
        (callable, args) = reduced;
    }
    if !is_class(&callable, "torch._utils", "_rebuild_tensor_v2") {
        return Ok(None);
    }
    let bad = |what: &str| format!("tensor {name}: unexpected {what}");
    // `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)`.
    let mut args = args.tuple().map_err(|_| bad("arguments"))?.into_iter();
    let (Some(storage), Some(offset), Some(shape), Some(strides)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        return Err(bad("arguments"));
    };
    // The persistent id: ("storage", storage type, key, location, numel, view metadata).
    let storage = storage.persistent_load().and_then(Object::tuple).map_err(|_| bad("storage reference"))?;
    let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) = (storage.get(1), storage.get(2)) else {
        return Err(bad("storage reference"));
    };
    let dtype = match class_name.as_str() {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ByteStorage" => DType::U8,
        other => return Err(format!("tensor {name}: storage type {other} is not supported")),
    };
    let spec = TensorSpec {
        storage: key.clone(),
        dtype,
        offset: index(offset).ok_or_else(|| bad("storage offset"))?,
        shape: indices(shape).ok_or_else(|| bad("size"))?,
        strides: indices(strides).ok_or_else(|| bad("stride"))?,
    };
    Ok(Some((name, spec)))
}

fn is_class(object: &Object, module: &str, class: &str) -> bool {
    matches!(object, Object::Class { module_name, class_name } if module_name == module && class_name == class)
}

fn index(object: Object) -> Option<usize> {
    usize::try_from(object.int_or_long().ok()?).ok()
}

fn indices(object: Object) -> Option<Vec<usize>> {
    object.tuple().ok()?.into_iter().map(index).collect()
}

fn kind(object: &Object) -> &'static str {
    match object {
        Object::Dict(_) => "a dict",
        Object::List(_) => "a list",
        Object::Tuple(_) => "a tuple",
        Object::Reduce { .. } | Object::Build { .. } => "a Python object",
        _ => "a plain value",
    }
}

/// Each storage's byte range in the file, its data starting at `start`; a storage's element size
/// is that of the tensors using it.
fn storage_ranges(
    bytes: &[u8],
    start: usize,
    keys: Vec<Object>,
    tensors: &HashMap<String, TensorSpec>,
) -> std::result::Result<HashMap<String, Range<usize>>, String> {
    let element_size: HashMap<&str, usize> =
        tensors.values().map(|spec| (spec.storage.as_str(), spec.dtype.size_in_bytes())).collect();
    let mut position = start;
    let mut ranges = HashMap::new();
    for key in keys {
        let Object::Unicode(key) = key else { return Err("a storage key is not a string".into()) };
        let size = *element_size.get(key.as_str()).ok_or_else(|| format!("storage {key} is used by no tensor"))?;
        let truncated = || format!("storage {key}: the file ends early (truncated?)");
        let count = bytes.get(position..position + 8).ok_or_else(truncated)?;
        let count = u64::from_le_bytes(count.try_into().expect("8 bytes"));
        let data = position + 8;
        let end = usize::try_from(count)
            .ok()
            .and_then(|count| count.checked_mul(size))
            .and_then(|len| data.checked_add(len))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(truncated)?;
        ranges.insert(key, data..end);
        position = end;
    }
    Ok(ranges)
}

/// Copies one tensor out of its storage, following its strides (views saved as such).
fn gather(name: &str, spec: &TensorSpec, storage: &[u8]) -> std::result::Result<Tensor, String> {
    let size = spec.dtype.size_in_bytes();
    let elements = storage.len() / size;
    if spec.shape.len() != spec.strides.len() {
        return Err(format!("tensor {name}: {} sizes but {} strides", spec.shape.len(), spec.strides.len()));
    }
    let count: usize = spec.shape.iter().product();
    let last =
        spec.shape.iter().zip(&spec.strides).map(|(&dim, &stride)| dim.saturating_sub(1) * stride).sum::<usize>();
    if count > 0 && spec.offset + last >= elements {
        return Err(format!("tensor {name} lies outside its storage of {elements} elements"));
    }
    let contiguous = candle_core::Layout::new(spec.shape.as_slice().into(), spec.strides.clone(), 0).is_contiguous();
    if contiguous {
        // In range (checked above) unless empty.
        let bytes = storage.get(spec.offset * size..(spec.offset + count) * size).unwrap_or_default();
        return Tensor::from_raw_buffer(bytes, spec.dtype, &spec.shape, &Device::Cpu)
            .map_err(|e| format!("tensor {name}: {e}"));
    }
    let mut data = Vec::with_capacity(count * size);
    let mut position = vec![0usize; spec.shape.len()];
    for _ in 0..count {
        let element = spec.offset + position.iter().zip(&spec.strides).map(|(i, s)| i * s).sum::<usize>();
        data.extend_from_slice(&storage[element * size..(element + 1) * size]);
        // Next index, last dimension fastest.
        for (i, &dim) in position.iter_mut().zip(&spec.shape).rev() {
            *i += 1;
            if *i < dim {
                break;
            }
            *i = 0;
        }
    }
    Tensor::from_raw_buffer(&data, spec.dtype, &spec.shape, &Device::Cpu).map_err(|e| format!("tensor {name}: {e}"))
}
