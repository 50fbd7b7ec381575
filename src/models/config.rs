//! The checks behind every model config's `validate`: each rejection names the config, the key
//! and its value, e.g. "unet config: `center_input_sample` = true is not supported (only Stable
//! Diffusion 1.x/2.x UNets are)".

use std::fmt::{Debug, Display};

use candle_core::{Error, Result};

/// The checks of one config struct.
pub(crate) struct ConfigChecks {
    /// Starts every message, e.g. `"unet config"`.
    pub name: &'static str,
    /// What the model supports, shown after a value it does not, e.g. `"only Stable Diffusion
    /// 1.x/2.x UNets are"`.
    pub supported: &'static str,
}

impl ConfigChecks {
    /// "{name}: `{field}` = {value:?} {problem}".
    pub fn invalid(&self, field: &str, value: &dyn Debug, problem: impl Display) -> Error {
        Error::Msg(format!("{}: `{field}` = {value:?} {problem}", self.name))
    }

    /// "{name}: `{field}` = {value:?} is not supported ({supported})".
    pub fn unsupported(&self, field: &str, value: &dyn Debug) -> Error {
        self.invalid(field, value, format_args!("is not supported ({})", self.supported))
    }

    /// Rejects `value` unless it is `supported`.
    pub fn expect_eq<T: PartialEq + Debug>(&self, field: &str, value: &T, supported: &T) -> Result<()> {
        if value == supported {
            Ok(())
        } else {
            Err(self.unsupported(field, value))
        }
    }

    /// Rejects any value of an optional key.
    pub fn expect_unset<T: Debug>(&self, field: &str, value: &Option<T>) -> Result<()> {
        match value {
            Some(v) => Err(self.unsupported(field, v)),
            None => Ok(()),
        }
    }

    /// Rejects `value` unless it is non-zero and divides `whole`, the value of key `whole_field`.
    pub fn expect_divides(&self, field: &str, value: usize, whole_field: &str, whole: usize) -> Result<()> {
        if value != 0 && whole.is_multiple_of(value) {
            Ok(())
        } else {
            Err(self.invalid(field, &value, format_args!("does not divide `{whole_field}` = {whole}")))
        }
    }

    /// Checks that the per-block lists `(key, length)` (at least one) have the same non-zero
    /// length, and returns it.
    pub fn expect_same_lengths(&self, lists: &[(&str, usize)]) -> Result<usize> {
        let (first, n) = lists[0];
        if n != 0 && lists.iter().all(|&(_, len)| len == n) {
            return Ok(n);
        }
        let mut counts = vec![format!("`{first}` ({n} entries)")];
        counts.extend(lists[1..].iter().map(|(field, len)| format!("`{field}` ({len})")));
        let (last, rest) = counts.split_last().expect("at least one list");
        Err(Error::Msg(format!("{}: {} and {last} must have the same non-zero length", self.name, rest.join(", "))))
    }
}
