//! A safetensors file read tensor by tensor with positioned reads, for [`VarBuilder`]s.
//!
//! candle's memory-mapped reader copies each tensor out of the mapping, and the mapped pages it
//! read stay in the process's resident memory next to the copies: loading a 3.5 GB UNet peaked at
//! twice its size. Here each tensor's bytes are read from the file (through the page cache, which
//! is not the process's memory) into the tensor's own buffer, converted to the wanted dtype on the
//! way, so the peak is the tensors plus the largest one's bytes. The header is validated by the
//! `safetensors` crate, as candle does, on a mapping of which only the header is ever read.
//!
//! [`VarBuilder`]: candle_nn::VarBuilder

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor, WithDType};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;

/// Where one tensor lies in the file, and what it holds.
struct Entry {
    dtype: DType,
    shape: Shape,
    /// Byte range in the file.
    bytes: Range<u64>,
}

/// An open safetensors file and the index of its tensors.
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Entry>,
}

impl SafetensorsFile {
    /// Opens `path` and reads and validates its header (names, dtypes, shapes, offsets that tile
    /// the data exactly as the file's length says).
    pub fn open(path: &Path) -> std::result::Result<Self, String> {
        // Opening a FIFO would wait for a writer: only regular files are read.
        if !std::fs::metadata(path).map_err(|e| format!("cannot open it: {e}"))?.is_file() {
            return Err("not a regular file".into());
        }
        let file = File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
        // Safety: mapped read-only, and only the header is read through the mapping (model files
        // are not modified while in use).
        let mapping = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("cannot map it: {e}"))?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&mapping).map_err(|e| format!("not a safetensors file: {e}"))?;
        let data_start = 8 + header_len as u64;
        let entries = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let dtype =
                    candle_dtype(info.dtype).ok_or_else(|| format!("{name}: unsupported dtype {:?}", info.dtype))?;
                let (start, end) = info.data_offsets;
                let bytes = data_start + start as u64..data_start + end as u64;
                Ok((name, Entry { dtype, shape: Shape::from(info.shape.clone()), bytes }))
            })
            .collect::<std::result::Result<_, String>>()?;
        Ok(Self { path: path.to_path_buf(), file, entries })
    }

    /// The tensors' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Tensor `name` as stored, on the CPU, read straight into the tensor's own buffer.
    fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        match entry.dtype {
            DType::U8 => self.read_as::<u8>(name, entry),
            DType::U32 => self.read_as::<u32>(name, entry),
            DType::I64 => self.read_as::<i64>(name, entry),
            DType::BF16 => self.read_as::<half::bf16>(name, entry),
            DType::F16 => self.read_as::<half::f16>(name, entry),
            DType::F32 => self.read_as::<f32>(name, entry),
            DType::F64 => self.read_as::<f64>(name, entry),
            other => {
                candle_core::bail!("{}: tensor {name} has dtype {other:?}, which is not read", self.path.display())
            }
        }
    }

    /// [`SafetensorsFile::read`] for an entry whose values are `T`s.
    fn read_as<T: WithDType>(&self, name: &str, entry: &Entry) -> candle_core::Result<Tensor> {
        let len = (entry.bytes.end - entry.bytes.start) as usize;
        let count = entry.shape.elem_count();
        if len != count * std::mem::size_of::<T>() {
            candle_core::bail!("{}: tensor {name} has {len} bytes for {count} values", self.path.display())
        }
        let mut values = vec![T::from_f64(0.0); count];
        // SAFETY: the bytes of `values` (plain numbers, for which every bit pattern is a value),
        // exactly `len` of them; file data is little-endian, as the machines candle runs on.
        let bytes = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), len) };
        self.file
            .read_exact_at(bytes, entry.bytes.start)
            .map_err(|e| candle_core::Error::msg(format!("{}: cannot read tensor {name}: {e}", self.path.display())))?;
        Tensor::from_vec(values, entry.shape.clone(), &Device::Cpu)
    }
}

/// The candle dtype of a safetensors dtype, for those candle has.
fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I64 => DType::I64,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

impl SimpleBackend for SafetensorsFile {
    fn get(&self, shape: Shape, name: &str, _: Init, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        if let Some(entry) = self.entries.get(name).filter(|e| e.shape != shape) {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: entry.shape.clone(),
            }
            .bt());
        }
        self.get_unchecked(name, dtype, device)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}
