//! Where a step's time goes, op by op: `stableid bench --profile`.
//!
//! While [`record`] runs, every op of [`super`] (forward and backward) that its thread runs
//! waits for its device before and after it runs, so that each op's time is its own even on a GPU,
//! where kernels are otherwise queued and run later. The waits cost time themselves, so a profiled run is slower
//! than a timed one: the shares are what matter. The time a profiled run spends outside these
//! ops (candle's own ops: reshapes, copies, residual additions, the loss, the optimizer, the
//! backward of plain candle ops) is reported as the rest. Phases ([`phase`]: the text encoder,
//! the UNet, the backward...) are timed the same way, around the ops they contain.

use std::cell::{Cell, RefCell};
use std::time::Instant;

use candle_core::{Device, Result};

/// Total time and calls of one kind of op during a recording.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub name: &'static str,
    pub calls: u64,
    pub seconds: f64,
}

/// A recording: the ops' times, most expensive first, the phases' in the order they first ran,
/// and the wall time of the whole run.
#[derive(Debug, Clone)]
pub struct Profile {
    pub ops: Vec<OpTime>,
    pub phases: Vec<OpTime>,
    pub total_seconds: f64,
}

impl Profile {
    /// The time spent outside the profiled ops.
    pub fn rest_seconds(&self) -> f64 {
        (self.total_seconds - self.ops.iter().map(|op| op.seconds).sum::<f64>()).max(0.0)
    }
}

thread_local! {
    /// The recording of this thread: only ops run by the thread that calls [`record`] are timed, so
    /// work on other threads (tests running side by side, a prefetching thread) never mixes in.
    static RECORDING: RefCell<Option<Recording>> = const { RefCell::new(None) };
    /// Whether this thread is inside a timed op (an op built from other timed ops counts once).
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

#[derive(Default)]
struct Recording {
    ops: Vec<OpTime>,
    phases: Vec<OpTime>,
}

/// Runs `work` (which must return once its work is done on `device`) with op timing on for the
/// ops this thread runs.
pub fn record<T>(device: &Device, work: impl FnOnce() -> crate::Result<T>) -> crate::Result<(T, Profile)> {
    device.synchronize()?;
    let outer = RECORDING.replace(Some(Recording::default()));
    let start = Instant::now();
    let result = work();
    let synced = device.synchronize();
    let total_seconds = start.elapsed().as_secs_f64();
    let recording = RECORDING.replace(outer).unwrap_or_default();
    let value = result?;
    synced?;
    let mut ops = recording.ops;
    ops.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    Ok((value, Profile { ops, phases: recording.phases, total_seconds }))
}

fn recording() -> bool {
    RECORDING.with_borrow(Option::is_some)
}

/// Runs one op, timing it under `name` while this thread records.
pub(crate) fn timed<T>(name: &'static str, device: &Device, op: impl FnOnce() -> Result<T>) -> Result<T> {
    if !recording() || INSIDE.get() {
        return op();
    }
    device.synchronize()?;
    INSIDE.set(true);
    let start = Instant::now();
    let result = op();
    let synced = device.synchronize();
    let seconds = start.elapsed().as_secs_f64();
    INSIDE.set(false);
    let value = result?;
    synced?;
    add(name, seconds, |recording| &mut recording.ops);
    Ok(value)
}

/// Runs a phase of a step (made of ops), timing it under `name` while this thread records.
pub fn phase<T, E: From<candle_core::Error>>(
    name: &'static str,
    device: &Device,
    work: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    if !recording() || INSIDE.get() {
        return work();
    }
    device.synchronize()?;
    let start = Instant::now();
    let value = work()?;
    device.synchronize()?;
    add(name, start.elapsed().as_secs_f64(), |recording| &mut recording.phases);
    Ok(value)
}

fn add(name: &'static str, seconds: f64, table: impl FnOnce(&mut Recording) -> &mut Vec<OpTime>) {
    RECORDING.with_borrow_mut(|recording| {
        let Some(recording) = recording else { return };
        let table = table(recording);
        match table.iter_mut().find(|entry| entry.name == name) {
            Some(entry) => {
                entry.calls += 1;
                entry.seconds += seconds;
            }
            None => table.push(OpTime { name, calls: 1, seconds }),
        }
    });
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{phase, record};
    use crate::nn::{linear, silu};

    #[test]
    fn a_recording_counts_forward_and_backward_ops() {
        let device = Device::Cpu;
        let x = candle_core::Var::new(&[[1.0f32, -2.0, 3.0], [0.5, 0.0, -1.0]], &device).unwrap();
        let w = Tensor::new(&[[1.0f32, 0.0, 2.0], [0.0, 1.0, 0.0]], &device).unwrap();
        let (_, profile) = record(&device, || {
            let y = phase("forward", &device, || silu(&linear(x.as_tensor(), &w, None)?))?;
            Ok(phase("backward", &device, || y.sum_all()?.backward())?)
        })
        .unwrap();
        let calls = |name: &str| profile.ops.iter().find(|op| op.name == name).map(|op| op.calls);
        assert_eq!(calls("linear"), Some(1));
        assert_eq!(calls("linear backward"), Some(1));
        assert_eq!(calls("activation"), Some(1));
        assert_eq!(calls("activation backward"), Some(1));
        let phases: Vec<_> = profile.phases.iter().map(|p| (p.name, p.calls)).collect();
        assert_eq!(phases, [("forward", 1), ("backward", 1)]);
        let timed: f64 = profile.ops.iter().map(|op| op.seconds).sum();
        assert!(timed <= profile.total_seconds && profile.rest_seconds() >= 0.0);
        // Outside a recording nothing is counted.
        linear(x.as_tensor(), &w, None).unwrap();
        let (_, empty) = record(&device, || Ok(())).unwrap();
        assert!(empty.ops.is_empty());
    }
}
