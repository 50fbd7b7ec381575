//! The memory probe of the measurements: the resident set size on the CPU, device memory in use
//! on CUDA.

use candle_core::Device;

use crate::Result;

/// Memory in use and its peak: the resident set size on the CPU (Linux's VmRSS / VmHWM, the
/// peak reset through /proc/self/clear_refs), device memory in use on CUDA.
pub(super) enum MemoryProbe {
    Rss,
    #[cfg(feature = "cuda")]
    Cuda(cuda_memory::Sampler),
}

impl MemoryProbe {
    pub(super) fn new(device: &Device) -> Result<Self> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => Ok(Self::Cuda(cuda_memory::Sampler::new(cuda.cuda_stream().context().clone())?)),
            _ => Ok(Self::Rss),
        }
    }

    pub(super) fn description(&self) -> &'static str {
        match self {
            Self::Rss => "resident set size (VmRSS; peak VmHWM, reset before each measurement)",
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => cuda_memory::DESCRIPTION,
        }
    }

    pub(super) fn current(&mut self) -> Result<Option<u64>> {
        match self {
            Self::Rss => Ok(proc_status_bytes("VmRSS:")),
            #[cfg(feature = "cuda")]
            Self::Cuda(sampler) => Ok(Some(sampler.current()?)),
        }
    }

    pub(super) fn reset_peak(&mut self) -> Result<()> {
        match self {
            // "5" resets the peak resident set size to the current one (proc(5)); where that is
            // not allowed, the peak stays the process's.
            Self::Rss => {
                let _ = std::fs::write("/proc/self/clear_refs", "5");
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Self::Cuda(sampler) => Ok(sampler.reset()?),
        }
    }

    pub(super) fn peak(&mut self) -> Result<Option<u64>> {
        match self {
            Self::Rss => Ok(proc_status_bytes("VmHWM:")),
            #[cfg(feature = "cuda")]
            Self::Cuda(sampler) => Ok(Some(sampler.peak()?)),
        }
    }
}

/// A `kB` field of /proc/self/status, in bytes (None where there is no such file).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(feature = "cuda")]
mod cuda_memory {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use candle_core::cuda::cudarc::driver::CudaContext;

    pub const DESCRIPTION: &str =
        "device memory in use (total - free, as nvidia-smi counts it: CUDA context and memory pools included; peak sampled every millisecond)";

    /// Device memory in use, for every process on the device.
    fn used(context: &CudaContext) -> candle_core::Result<u64> {
        let (free, total) = context.mem_get_info().map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok((total - free) as u64)
    }

    /// The driver has no peak counter: a thread samples the memory in use and keeps the maximum.
    pub struct Sampler {
        context: Arc<CudaContext>,
        peak: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Sampler {
        pub fn new(context: Arc<CudaContext>) -> candle_core::Result<Self> {
            let peak = Arc::new(AtomicU64::new(used(&context)?));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = std::thread::spawn({
                let (context, peak, stop) = (context.clone(), peak.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(now) = used(&context) {
                            peak.fetch_max(now, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            });
            Ok(Self { context, peak, stop, thread: Some(thread) })
        }

        pub fn current(&self) -> candle_core::Result<u64> {
            used(&self.context)
        }

        pub fn reset(&self) -> candle_core::Result<()> {
            self.peak.store(used(&self.context)?, Ordering::Relaxed);
            Ok(())
        }

        pub fn peak(&self) -> candle_core::Result<u64> {
            Ok(self.peak.load(Ordering::Relaxed).max(used(&self.context)?))
        }
    }

    impl Drop for Sampler {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}
