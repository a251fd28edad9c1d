//! What strategies report (each step's metrics, a run's summary) as named numbers: one
//! definition per report, from which its crossing of the plugin boundary and its
//! place in the run directory's JSON follow. A new field is added in one place and
//! changes no ABI type.

use crate::{Error, Result};

/// A field of a report: how it becomes a named number and back.
pub trait NamedValue: Sized {
    /// `None`: the field is absent (an optional value not measured).
    fn to_value(&self) -> Option<f64>;
    fn from_value(value: Option<f64>, name: &str) -> Result<Self>;
}

fn missing(name: &str) -> Error {
    Error::invalid(format!("report field `{name}` is missing"))
}

impl NamedValue for f64 {
    fn to_value(&self) -> Option<f64> {
        Some(*self)
    }
    fn from_value(value: Option<f64>, name: &str) -> Result<f64> {
        value.ok_or_else(|| missing(name))
    }
}

impl NamedValue for u64 {
    fn to_value(&self) -> Option<f64> {
        Some(*self as f64)
    }
    fn from_value(value: Option<f64>, name: &str) -> Result<u64> {
        let v = value.ok_or_else(|| missing(name))?;
        if !(v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(64)) {
            return Err(Error::invalid(format!("report field `{name}` is {v}, not a count")));
        }
        Ok(v as u64)
    }
}

impl NamedValue for Option<f64> {
    fn to_value(&self) -> Option<f64> {
        *self
    }
    fn from_value(value: Option<f64>, _name: &str) -> Result<Option<f64>> {
        Ok(value)
    }
}

/// Defines a report struct and its `to_values` / `from_values`.
macro_rules! report {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty),*
        }

        impl $name {
            /// Every field as a named number (an absent optional one left out).
            pub fn to_values(&self) -> Vec<(String, f64)> {
                let mut out = Vec::new();
                $(
                    if let Some(v) = $crate::report::NamedValue::to_value(&self.$field) {
                        out.push((stringify!($field).to_string(), v));
                    }
                )*
                out
            }

            /// The report back from [`Self::to_values`]; a missing field is an error
            /// naming it, an unknown one is ignored (a newer plugin's extra field).
            pub fn from_values(values: &[(String, f64)]) -> $crate::Result<$name> {
                let get = |n: &str| values.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
                Ok($name {
                    $(
                        $field: $crate::report::NamedValue::from_value(
                            get(stringify!($field)),
                            concat!(stringify!($name), ".", stringify!($field)),
                        )?,
                    )*
                })
            }
        }
    };
}

pub(crate) use report;

#[cfg(test)]
mod tests {
    use crate::{StepMetrics, TrainSummary};

    #[test]
    fn reports_round_trip_through_named_values() {
        let m = StepMetrics {
            step: 3,
            epoch: 1,
            loss: 2.5,
            lr: 1e-3,
            samples_per_sec: 10.0,
            grad_norm: f64::NAN,
            val_loss: None,
        };
        let back = StepMetrics::from_values(&m.to_values()).unwrap();
        assert_eq!((back.step, back.val_loss), (3, None));
        assert!(back.grad_norm.is_nan());
        let with_val = StepMetrics { val_loss: Some(1.25), grad_norm: 0.5, ..m };
        assert_eq!(StepMetrics::from_values(&with_val.to_values()).unwrap(), with_val);
        let e = TrainSummary::from_values(&[("steps".into(), 1.0)]).unwrap_err().to_string();
        assert!(e.contains("TrainSummary.epochs"), "{e}");
        let e = StepMetrics::from_values(&[("step".into(), -1.0)]).unwrap_err().to_string();
        assert!(e.contains("not a count"), "{e}");
    }
}
