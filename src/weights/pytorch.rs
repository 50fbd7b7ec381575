//! PyTorch checkpoints (`torch.save` of a state dict: `.pth`, `pytorch_model.bin`) in both of
//! PyTorch's on-disk formats: the zip archive of PyTorch >= 1.6 and the legacy format before it.
//! face-parsing.PyTorch's `79999_iter.pth`, the paper's face parser, is a legacy file, as are
//! older `.bin` files on the hub.
//!
//! The legacy format (`torch/serialization.py`, `_legacy_save`) is five pickles back to back, then
//! the storages' bytes: a magic number, the format version (1001), the writer's system info (its
//! byte order), the saved object (each tensor names its storage through a pickle persistent id:
//! `("storage", torch.FloatStorage, key, location, numel, None)`), and the storage keys in the
//! order their data follows, each as a little-endian int64 element count and the raw elements.
//! The zip format holds the saved object as `<folder>/data.pkl` and each storage as the entry
//! `<folder>/data/<key>`. Both pickles are read by [`pickle`], which never executes anything; a
//! training checkpoint that keeps the state dict under `state_dict` is read as the state dict.
//!
//! Nothing in a file is trusted: every size, stride and offset is checked against the data that
//! is really there before a byte is copied or allocated, so a damaged file is an error that names
//! the file and the tensor.

use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::Weights;
use crate::{Error, Result};

mod pickle;

use pickle::{Id, Pickle, Value};

/// The first pickle of a legacy file: protocol 2, `LONG1` of 10 bytes holding the magic number
/// 0x1950a86a20f9469cfc6c, `STOP`. Byte 1 (the protocol) may vary.
const LEGACY_MAGIC: [u8; 15] =
    [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];
const LEGACY_FORMAT_VERSION: i64 = 1001;
const ZIP_MAGIC: [u8; 4] = [b'P', b'K', 3, 4];
/// Largest `data.pkl` read from a zip file; a state dict's takes about 100 bytes per tensor.
const MAX_ZIP_PICKLE_BYTES: u64 = 64 << 20;

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
    /// A zip file, opened once, whose storages are its entries (`archive/data/0`...), read when
    /// used, and the file's length.
    Zip { archive: Mutex<ZipArchive>, file_len: usize },
}

type ZipArchive = zip::ZipArchive<std::io::BufReader<std::fs::File>>;

/// Where one tensor lies in its storage (in elements).
struct TensorSpec {
    storage: String,
    dtype: DType,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
    /// How many bytes of its storage it needs, from the start (set by [`TensorSpec::check`]).
    end: usize,
}

impl TensorSpec {
    /// Checks that the tensor lies within a storage of `storage_bytes` bytes and covers no storage
    /// element twice, so that its elements can be copied without overflow and never take more
    /// memory than the storage holds. Returns the bytes it needs from the start of its storage.
    fn check(&self, name: &str, storage_bytes: usize) -> std::result::Result<usize, String> {
        if self.shape.len() != self.strides.len() {
            return Err(format!("tensor {name}: {} sizes but {} strides", self.shape.len(), self.strides.len()));
        }
        let outside = || {
            format!(
                "tensor {name} (sizes {:?}, strides {:?}, offset {}) lies outside its storage of {storage_bytes} \
                 bytes (a damaged file?)",
                self.shape, self.strides, self.offset
            )
        };
        let count = self.shape.iter().try_fold(1usize, |n, &dim| n.checked_mul(dim)).ok_or_else(outside)?;
        if count == 0 {
            return Ok(0);
        }
        // The last element's index, one past it, and that in bytes.
        let last = self
            .shape
            .iter()
            .zip(&self.strides)
            .try_fold(self.offset, |at, (&dim, &stride)| at.checked_add((dim - 1).checked_mul(stride)?))
            .ok_or_else(outside)?;
        let size = self.dtype.size_in_bytes();
        let end = last.checked_add(1).and_then(|end| end.checked_mul(size)).ok_or_else(outside)?;
        if end > storage_bytes {
            return Err(outside());
        }
        if count > last - self.offset + 1 {
            return Err(format!(
                "tensor {name}: sizes {:?} with strides {:?} repeat elements of its storage (a view made by \
                 expand()?), which is not supported; save tensor.contiguous() instead",
                self.shape, self.strides
            ));
        }
        Ok(end)
    }
}

impl Checkpoint {
    /// The tensor table of a zip-format file.
    fn zip(path: &Path) -> std::result::Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let file_len = usize::try_from(file.metadata().map_err(|e| e.to_string())?.len()).unwrap_or(usize::MAX);
        let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
        let pickle_name = archive
            .file_names()
            .find(|name| name.as_ref().is_ok_and(|name| name.ends_with("/data.pkl") || name == "data.pkl"))
            .ok_or("it holds no data.pkl (is it a PyTorch checkpoint?)")?
            .map_err(|e| e.to_string())?
            .into_owned();
        let folder = pickle_name.strip_suffix("data.pkl").expect("found by its suffix");
        let mut bytes = Vec::new();
        archive
            .by_name(&pickle_name)
            .map_err(|e| format!("{pickle_name}: {e}"))?
            .take(MAX_ZIP_PICKLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{pickle_name}: {e}"))?;
        if bytes.len() as u64 > MAX_ZIP_PICKLE_BYTES {
            return Err(format!(
                "{pickle_name} is larger than {} MiB, far more than a state dict takes",
                MAX_ZIP_PICKLE_BYTES >> 20
            ));
        }
        let (pickle, _) = Pickle::parse(&bytes).map_err(|e| format!("{pickle_name}: {e} (a damaged file?)"))?;
        let mut tensors = state_dict(&pickle)?;
        let mut sizes: HashMap<String, usize> = HashMap::new();
        for (name, spec) in &mut tensors {
            spec.storage = format!("{folder}data/{}", spec.storage);
            let size = match sizes.get(&spec.storage) {
                Some(&size) => size,
                None => {
                    let entry =
                        archive.by_name(&spec.storage).map_err(|e| format!("tensor {name}: {}: {e}", spec.storage))?;
                    let size = usize::try_from(entry.size()).unwrap_or(usize::MAX);
                    sizes.insert(spec.storage.clone(), size);
                    size
                }
            };
            spec.end = spec.check(name, size)?;
        }
        Ok(Self { tensors, storages: Storages::Zip { archive: Mutex::new(archive), file_len } })
    }

    /// Parses a legacy file, `bytes` being all of it.
    fn legacy(bytes: memmap2::Mmap) -> std::result::Result<Self, String> {
        let mut at = LEGACY_MAGIC.len();
        let mut next_pickle = |what: &str| {
            let (pickle, len) =
                Pickle::parse(&bytes[at..]).map_err(|e| format!("{what}: {e} (truncated or corrupt file?)"))?;
            at += len;
            Ok::<_, String>(pickle)
        };
        let version = next_pickle("format version")?;
        if version.int(version.root()) != Some(LEGACY_FORMAT_VERSION) {
            return Err(format!("the format version is not {LEGACY_FORMAT_VERSION}"));
        }
        let system = next_pickle("system info")?;
        let little_endian = match system.get(system.root()) {
            Value::Dict(entries) => {
                system.lookup(entries, "little_endian").is_some_and(|v| matches!(system.get(v), Value::Bool(true)))
            }
            _ => false,
        };
        if !little_endian {
            return Err("written on a big-endian machine, which is not supported".into());
        }
        let object = next_pickle("state dict")?;
        let mut tensors = state_dict(&object)?;
        let keys = next_pickle("storage keys")?;
        let ranges = storage_ranges(&bytes, at, &keys, &object)?;
        for (name, spec) in &mut tensors {
            let range = ranges
                .get(&spec.storage)
                .ok_or_else(|| format!("tensor {name}: its storage {} is not in the file", spec.storage))?;
            spec.end = spec.check(name, range.len())?;
        }
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
                // Both checked when the file was opened.
                let storage = &bytes[ranges[&spec.storage].clone()];
                gather(spec, &storage[..spec.end]).map_err(|e| e.to_string())
            }
            Storages::Zip { archive, file_len } => {
                let mut archive = archive.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                read_zip_entry(&mut archive, &spec.storage, spec.end, *file_len)
                    .and_then(|storage| gather(spec, &storage).map_err(|e| e.to_string()))
            }
        };
        tensor.map_err(|e| candle_core::Error::msg(format!("tensor {name}: {e}")))
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

/// The first `len` bytes of a zip entry; `file_len` (the archive's size) bounds what is allocated
/// before the data is there.
fn read_zip_entry(
    archive: &mut ZipArchive,
    entry: &str,
    len: usize,
    file_len: usize,
) -> std::result::Result<Vec<u8>, String> {
    let entry_file = archive.by_name(entry).map_err(|e| format!("{entry}: {e}"))?;
    let mut bytes = Vec::with_capacity(len.min(file_len));
    entry_file.take(len as u64).read_to_end(&mut bytes).map_err(|e| format!("{entry}: {e}"))?;
    if bytes.len() < len {
        return Err(format!("{entry}: the data ends early (truncated?)"));
    }
    Ok(bytes)
}

/// The tensors of the saved object: the entries of a dict that are tensors, or, when it has none,
/// those of its `state_dict` entry (training checkpoints: `{"state_dict": ..., "epoch": ...}`).
fn state_dict(pickle: &Pickle) -> std::result::Result<HashMap<String, TensorSpec>, String> {
    let root = pickle.root();
    let Value::Dict(entries) = pickle.get(root) else {
        return Err(format!("the saved object is not a state dict (a dict of tensors) but {}", pickle.kind(root)));
    };
    let mut tensors = tensor_entries(pickle, entries)?;
    if tensors.is_empty() {
        if let Some(Value::Dict(nested)) = pickle.lookup(entries, "state_dict").map(|id| pickle.get(id)) {
            tensors = tensor_entries(pickle, nested)?;
        }
    }
    if tensors.is_empty() {
        return Err("the saved dict holds no tensors (is it a state dict?)".into());
    }
    Ok(tensors)
}

fn tensor_entries(pickle: &Pickle, entries: &[(Id, Id)]) -> std::result::Result<HashMap<String, TensorSpec>, String> {
    entries.iter().filter_map(|&(name, value)| tensor_spec(pickle, name, value).transpose()).collect()
}

/// A tensor's name and description, or `None` for an entry that is no tensor (e.g. `_metadata`).
fn tensor_spec(p: &Pickle, name: Id, value: Id) -> std::result::Result<Option<(String, TensorSpec)>, String> {
    let (Value::Str(name), &Value::Call { mut callable, mut args }) = (p.get(name), p.get(value)) else {
        return Ok(None);
    };
    let bad = |what: &str| format!("tensor {name}: unexpected {what}");
    if p.is_global(callable, "torch._utils", "_rebuild_parameter") {
        // An nn.Parameter (a whole saved module): `_rebuild_parameter(tensor, requires_grad, hooks)`.
        let tensor = p.tuple(args).and_then(|args| args.first()).map(|&tensor| p.get(tensor));
        let Some(&Value::Call { callable: c, args: a }) = tensor else { return Err(bad("parameter")) };
        (callable, args) = (c, a);
    } else if p.is_global(callable, "torch._tensor", "_rebuild_from_type_v2") {
        // A tensor subclass: `_rebuild_from_type_v2(rebuild, type, rebuild_args, state)`.
        let Some(&[rebuild, _, rebuild_args, ..]) = p.tuple(args) else { return Err(bad("arguments")) };
        (callable, args) = (rebuild, rebuild_args);
    }
    if !p.is_global(callable, "torch._utils", "_rebuild_tensor_v2") {
        return Ok(None);
    }
    // `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)`.
    let Some(&[storage, offset, shape, strides, ..]) = p.tuple(args) else { return Err(bad("arguments")) };
    let malformed = || format!("tensor {name}: its storage reference is not {STORAGE_REFERENCE} (a damaged file?)");
    let Value::PersistentId(storage) = *p.get(storage) else { return Err(malformed()) };
    let (dtype, key) = storage_reference(p, storage).ok_or_else(malformed)??;
    let index = |id: Id| p.int(id).and_then(|v| usize::try_from(v).ok());
    let indices = |id: Id| p.tuple(id)?.iter().map(|&v| index(v)).collect::<Option<Vec<_>>>();
    let spec = TensorSpec {
        storage: key.to_string(),
        dtype,
        offset: index(offset).ok_or_else(|| bad("storage offset"))?,
        shape: indices(shape).ok_or_else(|| bad("size"))?,
        strides: indices(strides).ok_or_else(|| bad("stride"))?,
        end: 0,
    };
    Ok(Some((name.clone(), spec)))
}

/// What a storage's persistent id holds, for messages.
const STORAGE_REFERENCE: &str = "(\"storage\", storage type, key, location, size)";

/// The element type and key of a storage's persistent id, `("storage", torch.FloatStorage, key,
/// location, numel)` (legacy files add the view metadata); `None` if it is not one.
fn storage_reference(p: &Pickle, id: Id) -> Option<std::result::Result<(DType, &str), String>> {
    let &[kind, class, key, _, _, ..] = p.tuple(id)? else { return None };
    let (Value::Str(kind), Value::Global { module, name: class }, Value::Str(key)) =
        (p.get(kind), p.get(class), p.get(key))
    else {
        return None;
    };
    if kind != "storage" || module != "torch" {
        return None;
    }
    let dtype = match class.as_str() {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ByteStorage" => DType::U8,
        other => return Some(Err(format!("storage {key}: storage type {other} is not supported"))),
    };
    Some(Ok((dtype, key)))
}

/// Each storage's byte range in a legacy file, their data starting at `start` in the order of
/// `keys` (the last pickle); each storage's element size is that of its type where the saved
/// `object` refers to it.
fn storage_ranges(
    bytes: &[u8],
    start: usize,
    keys: &Pickle,
    object: &Pickle,
) -> std::result::Result<HashMap<String, Range<usize>>, String> {
    let Value::List(key_ids) = keys.get(keys.root()) else {
        return Err(format!("expected the list of storage keys, found {}", keys.kind(keys.root())));
    };
    let mut element_size: HashMap<&str, usize> = HashMap::new();
    for value in object.values() {
        if let &Value::PersistentId(id) = value {
            let (dtype, key) = storage_reference(object, id)
                .ok_or_else(|| format!("a storage reference is not {STORAGE_REFERENCE} (a damaged file?)"))??;
            element_size.insert(key, dtype.size_in_bytes());
        }
    }
    let mut position = start;
    let mut ranges = HashMap::new();
    for &key in key_ids {
        let Value::Str(key) = keys.get(key) else { return Err("a storage key is not a string".into()) };
        let size = *element_size.get(key.as_str()).ok_or_else(|| format!("storage {key} is used by no tensor"))?;
        let truncated = || format!("storage {key}: the file ends early (truncated?)");
        let count = bytes.get(position..).and_then(|rest| rest.first_chunk::<8>()).ok_or_else(truncated)?;
        let data = position + 8;
        let end = usize::try_from(u64::from_le_bytes(*count))
            .ok()
            .and_then(|count| count.checked_mul(size))
            .and_then(|len| data.checked_add(len))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(truncated)?;
        ranges.insert(key.clone(), data..end);
        position = end;
    }
    Ok(ranges)
}

/// Copies one tensor out of the start of its storage, following its strides (views saved as
/// such); the layout was checked against the storage by [`TensorSpec::check`].
fn gather(spec: &TensorSpec, storage: &[u8]) -> candle_core::Result<Tensor> {
    let size = spec.dtype.size_in_bytes();
    let count: usize = spec.shape.iter().product();
    if count == 0 {
        return Tensor::from_raw_buffer(&[], spec.dtype, &spec.shape, &Device::Cpu);
    }
    let contiguous = candle_core::Layout::new(spec.shape.as_slice().into(), spec.strides.clone(), 0).is_contiguous();
    if contiguous {
        let bytes = &storage[spec.offset * size..(spec.offset + count) * size];
        return Tensor::from_raw_buffer(bytes, spec.dtype, &spec.shape, &Device::Cpu);
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
    Tensor::from_raw_buffer(&data, spec.dtype, &spec.shape, &Device::Cpu)
}
